"""Image → image (SDEdit strength) and inpainting (the known region as a denoiser wrapper)."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import destatic
from destatic.lab import GaussianMixture
from destatic.pipelines.inputs import as_image_batch
from destatic.pipelines.stages import strength_sigmas
from destatic.sampling import KnownRegion, make_sigmas, sample
from tests.test_pipeline import SCHEDULERS, SD, scheduler_sigmas, sd_folder  # noqa: F401


@pytest.fixture(scope="module")
def emoji():
    return destatic.load()


def picture(seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g)


def test_strength_keeps_the_tail_of_the_grid():
    sigmas = torch.linspace(10, 0, 11)
    assert torch.equal(strength_sigmas(sigmas, 1.0), sigmas)
    assert torch.equal(strength_sigmas(sigmas, 0.5), sigmas[5:])
    assert len(strength_sigmas(sigmas, 0.35)) == 4  # int(10 · 0.35) = 3 steps
    with pytest.raises(ValueError, match="runs no step"):
        strength_sigmas(sigmas, 0.05)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        strength_sigmas(sigmas, 1.5)


def test_known_region_stays_on_its_noise_path_exactly():
    """Exact mixture denoiser, Euler: the kept coordinates end exactly at x0."""
    mixture = GaussianMixture.standard(2)
    sigmas = make_sigmas("karras", 12, 0.01, 20.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2, 1, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(64, 2, 1, 1, generator=g, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 2, 1, 1)  # draw dim 0, keep 1

    def denoiser(x, sigma):
        return mixture.denoise(x.flatten(1), sigma).view_as(x)

    out = sample("euler", KnownRegion(denoiser, x0, mask), x0 + sigmas[0] * noise, sigmas)
    torch.testing.assert_close(out[:, 1], x0[:, 1], rtol=0, atol=1e-12)
    assert (out[:, 0] - x0[:, 0]).abs().mean() > 0.1  # the drawn dimension moved


def test_strength_one_ignores_the_image_and_small_strength_keeps_it(emoji):
    kwargs = {"steps": 10, "sampler": "euler", "seed": 3, "guidance": 3.0}
    plain = emoji.generate("pizza", **kwargs)
    image = picture()
    full = emoji.generate("pizza", image=image, strength=1.0, **kwargs)
    torch.testing.assert_close(full, plain)  # σ₀ = ∞: nothing of the image survives
    light = emoji.generate("pizza", image=image, strength=0.1, **kwargs)
    heavy = emoji.generate("pizza", image=image, strength=0.7, **kwargs)
    assert (light - image).abs().mean() < (heavy - image).abs().mean()
    assert (light - image).abs().mean() < (plain - image).abs().mean() / 2


def test_inpainting_keeps_the_unmasked_pixels(emoji):
    image = picture(1)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1  # repaint the centre
    kwargs = {"steps": 8, "sampler": "dpmpp_2m", "seed": 0, "guidance": 3.0}
    out = emoji.generate("red heart", image=image, mask=mask, **kwargs)
    keep = mask == 0
    torch.testing.assert_close(
        out[keep.expand_as(out)], image[keep.expand_as(image)], atol=2e-6, rtol=0
    )
    assert (out - image)[..., 8:24, 8:24].abs().mean() > 0.05
    everything = emoji.generate("red heart", image=image, mask=torch.ones(1, 1, 32, 32), **kwargs)
    torch.testing.assert_close(everything, emoji.generate("red heart", **kwargs))
    pil = emoji(
        "red heart",
        image=Image.fromarray(np.uint8(image[0].permute(1, 2, 0) * 255)),
        mask=Image.fromarray(np.uint8(mask[0, 0] * 255)),
        **kwargs,
    )
    assert pil[0].size == (32, 32)


def test_image_and_mask_errors(emoji):
    image = picture()
    with pytest.raises(ValueError, match="need an input image"):
        emoji.generate("x", steps=2, mask=torch.ones(1, 1, 32, 32))
    with pytest.raises(ValueError, match="need an input image"):
        emoji.generate("x", steps=2, strength=0.5)
    with pytest.raises(ValueError, match="the mask is 16×16 but the image is 32×32"):
        emoji.generate("x", steps=2, image=image, mask=torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        emoji.generate("x", steps=2, image=image * 2)
    with pytest.raises(ValueError, match="got 2 images for 3 images"):
        emoji.generate(["a", "b", "c"], steps=2, image=torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="2 channels"):
        as_image_batch(torch.rand(1, 2, 8, 8), "image", channels=3)


def test_image_to_image_matches_diffusers(sd_folder):  # noqa: F811
    """StableDiffusionImg2ImgPipeline (DDIM and Euler), same latents, noise and strength."""
    folder, reference = sd_folder
    ours = destatic.load(folder)
    image = picture(2, 16)
    init = ours.encode(image)  # the posterior mean: handed to diffusers as latents
    steps, strength = 10, 0.6
    for sampler in ("ddim", "euler"):
        name, config, _ = SCHEDULERS[sampler]
        scheduler = getattr(diffusers, name)(**SD, **config)
        pipe = diffusers.StableDiffusionImg2ImgPipeline(
            **{**reference.components, "scheduler": scheduler}
        )
        pipe.set_progress_bar_config(disable=True)
        expected = pipe(
            "a red apple",
            image=init,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(4),
            output_type="np",
        ).images
        scheduler.set_timesteps(steps)
        got = ours.generate(
            "a red apple",
            image=image,
            strength=strength,
            sampler=sampler,
            sigmas=scheduler_sigmas(scheduler),
            guidance=3.0,
            seed=4,
        )
        np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5, rtol=0)
    assert math.isfinite(float(got.sum()))


def test_inpainting_model_matches_diffusers(tmp_path):
    """A 9-channel (SD-inpainting-style) tiny U-Net: StableDiffusionInpaintPipeline, DDIM,
    guidance 3, the same noise and masked-image latents."""
    from tests import tiny_sd

    _, vae, text, tokenizer = tiny_sd.components(tmp_path)
    torch.manual_seed(1)
    unet9 = diffusers.UNet2DConditionModel(**dict(tiny_sd.UNET, sample_size=8, in_channels=9))
    tiny_sd.perturb(unet9)
    name, config, _ = SCHEDULERS["ddim"]
    scheduler = getattr(diffusers, name)(**SD, **config)
    reference = diffusers.StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet9.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(tmp_path / "inpaint", safe_serialization=True)
    ours = destatic.load(tmp_path / "inpaint")
    assert ours.inpainting_model and ours.latent_channels == 4
    image = picture(3, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 6:14] = 1
    masked_latents = ours.encode(image * (1 - mask) + 0.5 * mask)
    steps = 8
    scheduler.set_timesteps(steps)
    sigmas = scheduler_sigmas(scheduler)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    start = float(sigmas[0])
    expected = reference(
        "a red apple",
        image=image,
        mask_image=mask,
        masked_image_latents=masked_latents,
        num_inference_steps=steps,
        guidance_scale=3.0,
        latents=z * start / math.sqrt(1 + start**2),
        height=16,
        width=16,
        output_type="np",
    ).images
    got = ours.generate(
        "a red apple", image=image, mask=mask, sampler="ddim", sigmas=sigmas, guidance=3.0, noise=z
    )
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5, rtol=0)
    text_only = ours.generate("x", steps=2, width=16, height=16)  # everything repainted
    assert text_only.shape == (1, 3, 16, 16)
