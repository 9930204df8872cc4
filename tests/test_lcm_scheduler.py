"""Folders saved with diffusers' LCMScheduler (LCM-distilled SD, LCM-LoRA): the ``lcm`` grid,
the LCMTarget boundary condition and the stored defaults, against LatentConsistencyModelPipeline
and StableDiffusionPipeline + LCMScheduler from the same seed."""

import numpy as np
import pytest
import torch

import destatic
from destatic.io import CheckpointError
from destatic.pipelines import save
from destatic.process import LCMTarget, VPDiscrete, consistency_coefficients
from destatic.process.schedulers import process_from_scheduler_config, scheduler_config_from_process
from destatic.sampling import make_sigmas
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")


def _folder(tmp, *, distilled: bool):
    """A tiny SD folder with an LCMScheduler: a U-Net embedding the guidance scale
    (time_cond_proj_dim, an LCM-distilled checkpoint) or a plain one (LCM-LoRA style)."""
    unet, vae, text, tokenizer = tiny_sd.components(tmp)
    if distilled:
        torch.manual_seed(3)
        config = dict(tiny_sd.UNET, sample_size=8, time_cond_proj_dim=32)
        unet = tiny_sd.perturb(diffusers.UNet2DConditionModel(**config)).eval()
    cls = (
        diffusers.LatentConsistencyModelPipeline if distilled else diffusers.StableDiffusionPipeline
    )
    kwargs = {} if distilled else {"requires_safety_checker": False}
    reference = cls(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.LCMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        **kwargs,
    )
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(tmp / "pipeline", safe_serialization=True)
    return tmp / "pipeline", reference


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("lcm"), distilled=True)


def _same_start(sigma_max: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(z for destatic's ``noise=``, latents for diffusers): destatic starts at σ₀·z in σ-space,
    which is VP's √(1-ᾱ)·z; diffusers' VP schedulers start at z itself (init_noise_sigma 1), so
    it is handed z·σ₀/√(1+σ₀²). The fresh draws of both come from the same seed."""
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return z, z * (sigma_max / (1 + sigma_max**2) ** 0.5)


def _config(**options) -> dict:
    return {**diffusers.LCMScheduler(**options).config, "_class_name": "LCMScheduler"}


def test_lcm_grid_is_lcm_scheduler_timesteps():
    process = VPDiscrete()
    for steps in (1, 2, 3, 4, 7, 8, 50):
        scheduler = diffusers.LCMScheduler()
        scheduler.set_timesteps(steps)
        sigmas = make_sigmas("lcm", steps, process=process)
        assert sigmas[-1] == 0 and len(sigmas) == steps + 1
        t = process.sigma_to_t(sigmas[:-1])
        torch.testing.assert_close(t, scheduler.timesteps.double(), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="lcm grid"):
        make_sigmas("lcm", 51, process=process)


def test_lcm_grid_with_strength_is_lcm_scheduler_timesteps():
    """Image → image on the lcm grid: LCMScheduler.set_timesteps(steps, strength=s) keeps the
    first ⌊50·s⌋ distillation timesteps and picks all ``steps`` from them."""
    process = VPDiscrete()
    for strength in (0.08, 0.3, 0.5, 0.63, 0.8, 1.0):
        for steps in (1, 2, 4, 7):
            if steps > int(50 * strength):
                with pytest.raises(ValueError, match=r"lcm grid takes 1 … \d+ steps"):
                    make_sigmas("lcm", steps, process=process, strength=strength)
                continue
            scheduler = diffusers.LCMScheduler()
            scheduler.set_timesteps(steps, strength=strength)
            sigmas = make_sigmas("lcm", steps, process=process, strength=strength)
            t = process.sigma_to_t(sigmas[:-1])
            torch.testing.assert_close(t, scheduler.timesteps.double(), rtol=0, atol=1e-9)
    t = process.sigma_to_t(make_sigmas("lcm", 4, process=process, strength=0.5)[:-1])
    assert t.round().tolist() == [499, 379, 259, 139]  # not the full grid's tail [499, 259]
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        make_sigmas("lcm", 4, process=process, strength=1.5)


@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_distilled_img2img_same_image_as_latent_consistency_img2img(distilled, strength):
    """LatentConsistencyModelImg2ImgPipeline from the same latents and seed: the initial noise
    and every fresh draw between steps come from the seed's generator in the same order."""
    from tests.test_image_to_image import picture

    folder, reference = distilled
    ours = destatic.load(folder)
    pipe = diffusers.LatentConsistencyModelImg2ImgPipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    image = picture(2, 16)
    expected = pipe(
        "a red apple",
        image=ours.encode(image),  # the posterior mean, as latents: no sampled encoding
        strength=strength,
        num_inference_steps=4,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(4),
        output_type="np",
    ).images
    got = ours.generate("a red apple", image=image, strength=strength, guidance=6.0, seed=4)
    got = got.permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape and expected.std() > 0.01
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    print(f"lcm img2img strength {strength}: max abs diff {np.abs(got - expected).max():.2e}")
    # other samplers keep the tail of the full grid (diffusers' StableDiffusionImg2ImgPipeline)
    tail = ours.generate("a red apple", image=image, strength=strength, sampler="euler", seed=4)
    assert (torch.from_numpy(got).permute(0, 3, 1, 2) - tail).abs().max() > 1e-3


def test_lcm_target_is_lcm_scheduler_step():
    """One LCMScheduler.step (denoised, at each grid timestep) = our Denoiser's x̂0, in σ-space:
    the boundary condition uses the current timestep and acts on the VP-scaled sample."""
    cfg = _config()
    process, target = process_from_scheduler_config(cfg)
    assert isinstance(target, LCMTarget) and target.base.name == "epsilon"
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, generator=g, dtype=torch.float64).unbind(0)
    for t in (999, 259, 19, 3, 0):  # small t: c_skip is visible
        scheduler = diffusers.LCMScheduler()
        scheduler.set_timesteps(4)
        scheduler._step_index = 3  # the last step: no fresh noise
        sigma = float(process.sigma_table()[t])
        x = x0 + sigma * eps  # σ-space state; the scheduler sees x_t = x/√(1+σ²)
        x_t = (x / (1 + sigma**2) ** 0.5).float()
        want = scheduler.step(eps.float(), t, x_t, return_dict=False)[1].double()
        c_skip, c_out = target.coefficients(torch.tensor(sigma, dtype=torch.float64))
        got = c_skip * x + c_out * eps
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32 scheduler
    cs, co = consistency_coefficients(torch.tensor(259.0), 0.5, 10.0)
    assert 0 < cs < 1e-7 and abs(co - 1) < 1e-7  # tiny but kept: the boundary condition


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_distilled_folder_same_image_as_latent_consistency_pipeline(distilled, steps):
    folder, reference = distilled
    ours = destatic.load(folder)
    assert isinstance(ours.target, LCMTarget) and ours.guidance_embedded
    d = ours.sampling_defaults
    assert (d["sampler"], d["steps"], d["grid"], d["guidance"]) == ("lcm", 4, "lcm", 8.5)
    z, latents = _same_start(ours.process.sigma_max)
    expected = reference(
        "a red apple",
        num_inference_steps=steps,
        guidance_scale=6.0,
        latents=latents,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images
    kwargs = {"steps": steps, "seed": 7, "width": 16, "height": 16, "noise": z}
    image = ours.generate("a red apple", guidance=6.0, **kwargs)
    got = image.permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape and expected.std() > 0.01
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    print(f"lcm distilled {steps} steps: max abs diff {np.abs(got - expected).max():.2e}")
    other = ours.generate("a red apple", guidance=2.0, **kwargs)
    assert (other - image).abs().max() > 1e-3  # the embedded guidance scale is read
    if steps > 1:  # the fresh draws between steps matter: another seed misses by far
        reseeded = ours.generate("a red apple", guidance=6.0, **{**kwargs, "seed": 8})
        assert (reseeded - image).abs().max() > 1e-3


def test_lora_style_folder_same_image_as_sd_pipeline_with_lcm_scheduler(tmp_path):
    folder, reference = _folder(tmp_path, distilled=False)
    ours = destatic.load(folder)
    assert not ours.guidance_embedded
    assert ours.sampling_defaults["guidance"] == 1.0  # LCM-LoRA: no classifier-free guidance
    z, latents = _same_start(ours.process.sigma_max, seed=1)
    expected = reference(
        "a red apple",
        num_inference_steps=3,
        guidance_scale=1.0,
        latents=latents,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images
    image = ours.generate("a red apple", steps=3, seed=5, width=16, height=16, noise=z)
    got = image.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    print(f"lcm lora-style 3 steps: max abs diff {np.abs(got - expected).max():.2e}")


def test_save_round_trip_keeps_lcm_scheduler(distilled, tmp_path):
    ours = destatic.load(distilled[0])
    save(ours, tmp_path / "ours")
    again = destatic.load(tmp_path / "ours")
    assert again.target == ours.target and again.process == ours.process
    kwargs = {"seed": 1, "width": 16, "height": 16}
    torch.testing.assert_close(ours.generate("a cat", **kwargs), again.generate("a cat", **kwargs))
    config = scheduler_config_from_process(ours.process, ours.target)
    diffusers.LCMScheduler.from_config(config)  # diffusers reads it back
    assert config["_class_name"] == "LCMScheduler" and config["timestep_scaling"] == 10.0


def test_unsupported_lcm_options_are_clear_errors(tmp_path):
    from destatic.process.schedulers import scheduler_sampling_defaults

    cfg = _config(original_inference_steps=25)
    with pytest.raises(CheckpointError, match="original_inference_steps"):
        scheduler_sampling_defaults(cfg, True)
    with pytest.raises(CheckpointError, match="timestep_scaling"):
        process_from_scheduler_config({**cfg, "timestep_scaling": 0})
