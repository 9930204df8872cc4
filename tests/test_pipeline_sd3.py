"""SD3 pipeline folders: same image as diffusers' StableDiffusion3Pipeline (CLIP-L + CLIP-G, no
T5) with destatic's Euler sampler, and a save → load round trip."""

import numpy as np
import pytest
import torch

import destatic
from destatic.models import MMDiT, SD3TextEncoder
from destatic.pipelines import save
from destatic.process import RectifiedFlow
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """A tiny SD3 pipeline saved by diffusers (safetensors), and the diffusers pipeline."""
    tmp = tmp_path_factory.mktemp("sd3")
    reference = tiny_sd.sd3_pipeline(tmp)
    reference.save_pretrained(tmp / "pipeline", safe_serialization=True)
    return tmp / "pipeline", reference


def _flow_sigmas(scheduler) -> torch.Tensor:
    """diffusers' flow times t (shift applied, t=1 first) as σ = t/(1-t), ending with 0."""
    t = scheduler.sigmas.double()
    return torch.where(t >= 1, torch.full_like(t, float("inf")), t / (1 - t))


def assert_same_image(reference, ours, seed: int) -> float:
    """4 Euler steps with guidance 4 and a negative prompt from the same latents: ``ours``
    draws ``reference``'s (a diffusers SD3 pipeline's) image to 1e-5; returns the max gap."""
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    kwargs = {"negative_prompt": "blurry", "height": 16, "width": 16}
    expected = reference(
        "a red apple",
        num_inference_steps=4,
        guidance_scale=4.0,
        latents=z,
        output_type="np",
        **kwargs,
    ).images
    image = ours.generate(
        "a red apple",
        sampler="euler",
        sigmas=_flow_sigmas(reference.scheduler),
        guidance=4.0,
        noise=z,
        **kwargs,
    )
    got = image.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    return float(np.abs(got - expected).max())


def test_loads_as_mmdit_with_sd3_text_encoder_and_rectified_flow(sd3_folder):
    pipe = destatic.load(sd3_folder[0])
    assert isinstance(pipe.network, MMDiT)
    assert isinstance(pipe.text_encoder, SD3TextEncoder) and pipe.text_encoder.t5 is None
    assert pipe.process == RectifiedFlow(shift=3.0) and pipe.target == "flow"
    embedding = pipe.text_encoder.encode(["a red apple", "x"])
    assert embedding.tokens.shape == (2, 77 + 256, 64)
    assert embedding.pooled.shape == (2, 24)


def test_encode_prompt_matches_diffusers(sd3_folder):
    folder, reference = sd3_folder
    encoder = destatic.load(folder).text_encoder
    embeds, _, pooled, _ = reference.encode_prompt(
        "a red apple", None, None, do_classifier_free_guidance=False
    )
    ours = encoder.encode("a red apple")
    torch.testing.assert_close(ours.tokens, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)


def test_same_image_as_diffusers_stable_diffusion_3_pipeline(sd3_folder):
    folder, reference = sd3_folder
    ours = destatic.load(folder)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"negative_prompt": "blurry", "height": 16, "width": 16}
    expected = reference(
        "a red apple",
        num_inference_steps=6,
        guidance_scale=4.0,
        latents=z,  # flow state at t = 1 is the unit noise
        output_type="np",
        **kwargs,
    ).images
    sigmas = _flow_sigmas(reference.scheduler)  # after the call's set_timesteps(6)
    assert len(sigmas) == 7 and sigmas[0] == float("inf") and sigmas[-1] == 0
    # the static shift: diffusers' t are linspace(1, t_min, 6) shifted, t' = 3t/(1 + 2t), where
    # t_min is the already-shifted training minimum (so the last step is shifted twice); in σ,
    # σ = 3·u/(1-u). No use_dynamic_shifting here (that is Flux's resolution-dependent shift).
    t_min = 3.0 * 1e-3 / (1 + 2.0 * 1e-3)
    u = torch.linspace(1, t_min, 6, dtype=torch.float64)
    torch.testing.assert_close(sigmas[1:-1], 3.0 * u[1:] / (1 - u[1:]), rtol=1e-5, atol=0)
    image = ours.generate(
        "a red apple", sampler="euler", sigmas=sigmas, guidance=4.0, noise=z, **kwargs
    )
    got = image.permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_save_load_round_trip(sd3_folder, tmp_path):
    pipe = destatic.load(sd3_folder[0])
    save(pipe, tmp_path / "ours")
    again = destatic.load(tmp_path / "ours")
    assert isinstance(again.text_encoder, SD3TextEncoder)
    kwargs = {
        "steps": 3,
        "sampler": "dpmpp_2m",
        "grid": "normal",
        "guidance": 3.0,
        "seed": 1,
        "width": 16,
    }
    a = pipe.generate("a cat", height=16, **kwargs)
    b = again.generate("a cat", height=16, **kwargs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_with_t5_encoder_same_embedding_and_image(tmp_path):
    reference = tiny_sd.sd3_pipeline(tmp_path, seed=1)
    t5, t5_tokenizer = tiny_sd.t5_encoder_and_tokenizer(d_model=64)
    reference.text_encoder_3, reference.tokenizer_3 = t5, t5_tokenizer
    reference.register_modules(text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    reference.save_pretrained(tmp_path / "pipeline", safe_serialization=True)
    ours = destatic.load(tmp_path / "pipeline")
    assert ours.text_encoder.t5 is not None
    embeds, negative, pooled, _ = reference.encode_prompt(
        "a red apple", None, None, negative_prompt="blurry", max_sequence_length=256
    )
    got = ours.text_encoder.encode("a red apple")
    assert got.tokens.shape == (1, 77 + 256, 64)
    # CLIP part bit-exact; the reloaded T5 differs from the in-memory one by ~1e-6 (float noise)
    torch.testing.assert_close(got.tokens[:, :77], embeds[:, :77], rtol=0, atol=0)
    torch.testing.assert_close(got.tokens, embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.pooled, pooled, rtol=0, atol=0)
    torch.testing.assert_close(
        ours.text_encoder.encode("blurry").tokens, negative, rtol=0, atol=1e-5
    )

    assert_same_image(reference, ours, seed=2)
    save(ours, tmp_path / "ours")
    assert destatic.load(tmp_path / "ours").text_encoder.t5 is not None
