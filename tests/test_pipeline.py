"""The text-to-image pipeline: same image as diffusers' StableDiffusionPipeline, save → load
round trip, and clear errors."""

import math

import numpy as np
import pytest
import torch

import destatic
from destatic.pipelines import save
from destatic.sampling import make_sigmas
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD 1.x pipeline saved by diffusers (safetensors), and the diffusers pipeline."""
    tmp = tmp_path_factory.mktemp("sd")
    unet, vae, text, tokenizer = tiny_sd.components(tmp)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing="leading",
    )
    reference = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(tmp / "pipeline", safe_serialization=True)
    return tmp / "pipeline", reference


def test_same_image_as_diffusers_stable_diffusion_pipeline(sd_folder):
    folder, reference = sd_folder
    ours = destatic.load(folder)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = make_sigmas("leading", 10, process=ours.process, offset=1)  # DDIM's SD timesteps
    start = float(sigmas[0])
    expected = reference(
        "a red apple",
        negative_prompt="blurry",
        num_inference_steps=10,
        guidance_scale=5.0,
        latents=z * start / math.sqrt(1 + start**2),  # DDIM's state is x/√(1+σ²)
        height=16,
        width=16,
        output_type="np",
    ).images
    image = ours.generate(
        "a red apple",
        negative_prompt="blurry",
        sampler="ddim",
        sigmas=sigmas,
        guidance=5.0,
        noise=z,
        height=16,
        width=16,
    )
    got = image.permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)


def test_save_load_round_trip_and_pil_output(sd_folder, tmp_path):
    folder, _ = sd_folder
    pipe = destatic.load(folder)
    save(pipe, tmp_path / "ours")
    again = destatic.load(tmp_path / "ours")
    kwargs = {"steps": 4, "sampler": "dpmpp_2m", "guidance": 3.0, "seed": 7, "width": 16}
    a = pipe.generate("a cat", height=16, **kwargs)
    b = again.generate("a cat", height=16, **kwargs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    images = again(["a cat", "a dog"], height=16, num_images=2, **kwargs)
    assert len(images) == 4 and images[0].size == (16, 16) and images[0].mode == "RGB"


def test_seed_gives_the_same_image_alone_or_in_a_batch(sd_folder):
    pipe = destatic.load(sd_folder[0])
    kwargs = {"steps": 3, "sampler": "euler_ancestral", "width": 16, "height": 16}
    batch = pipe.generate(["x", "y", "z"], seed=[5, 6, 7], **kwargs)
    alone = pipe.generate("y", seed=6, **kwargs)
    torch.testing.assert_close(batch[1:2], alone)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 15, "height": 16}, "multiple of 2"),
        ({"sampler": "dpm++"}, "unknown sampler"),
        ({"grid": "karas"}, "unknown grid"),
        ({"seed": [1, 2]}, "seeds"),
    ],
)
def test_bad_generation_settings(sd_folder, kwargs, message):
    pipe = destatic.load(sd_folder[0])
    with pytest.raises(ValueError, match=message):
        pipe.generate("a cat", steps=2, **{"width": 16, "height": 16, **kwargs})


def test_missing_folder_is_a_clear_error(tmp_path):
    from destatic.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match=r"model_index\.json"):
        destatic.load(tmp_path / "nope")
