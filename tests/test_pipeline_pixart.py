"""PixArt-α and PixArt-Σ folders: the adaLN-single transformer (micro-conditions, learned
variance) against diffusers' PixArtTransformer2DModel, the same image as diffusers'
PixArtAlphaPipeline / PixArtSigmaPipeline (T5 tokens with their mask: 120 / 300) with DPM-Solver++
2M and DDIM, and ``save`` writing folders that destatic and diffusers both load back."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import destatic
from destatic.models.pixart import PixArt, PixArtConfig
from destatic.models.text import T5TextEncoder
from destatic.pipelines import save
from tests import tiny_sd
from tests.test_pipeline import SCHEDULERS
from tests.test_pipeline_dit import LINEAR, same_latents

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

# sample_size 128: the 1024-px model's micro-conditions and position squeeze (scale 2), drawn
# here at 16×24 px (8×12 latents); width 24 = 2 heads · 12 (a multiple of 3 for the sizes)
TINY_PIXART = dict(
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    cross_attention_dim=24,
    caption_channels=32,
    sample_size=128,
    patch_size=2,
)
# PixArt-Σ's 1024-px model: sample_size 128 and positions squeezed by 2 as α's, but no
# micro-conditions (its config says so), so any width (16 = 2 · 8); SDXL's autoencoder scale
TINY_SIGMA = dict(
    TINY_PIXART, attention_head_dim=8, cross_attention_dim=16, use_additional_conditions=False
)
SDXL_VAE = dict(tiny_sd.VAE, sample_size=16, scaling_factor=0.13025)
SIZE = {"height": 16, "width": 24}
# fixture → (family, diffusers pipeline class name, T5 tokens)
VARIANTS = {
    "pixart": ("pixart-alpha", "PixArtAlphaPipeline", 120),
    "sigma": ("pixart-sigma", "PixArtSigmaPipeline", 300),
}


def _tiny(tmp, name: str, transformer: dict, vae: dict):
    """A tiny random diffusers pipeline ``name``, perturbed, saved as safetensors."""
    torch.manual_seed(0)
    network = tiny_sd.perturb(diffusers.PixArtTransformer2DModel(**transformer)).eval()
    t5, tokenizer = tiny_sd.t5_encoder_and_tokenizer(d_model=32)
    scheduler = diffusers.DPMSolverMultistepScheduler(**LINEAR, **SCHEDULERS["dpmpp_2m"][1])
    pipe = getattr(diffusers, name)(
        tokenizer=tokenizer,
        text_encoder=tiny_sd.perturb(t5).eval(),
        vae=tiny_sd.perturb(diffusers.AutoencoderKL(**vae)).eval(),
        transformer=network,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    folder = tmp / name
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


def build_pixart(tmp):
    """A tiny PixArtAlphaPipeline (micro-conditioned 1024-px model) under ``tmp``."""
    vae = dict(tiny_sd.VAE, sample_size=16)
    return _tiny(tmp, "PixArtAlphaPipeline", TINY_PIXART, vae)


def build_sigma(tmp):
    """A tiny PixArtSigmaPipeline (SDXL's autoencoder scale, no micro-conditions) under ``tmp``."""
    return _tiny(tmp, "PixArtSigmaPipeline", TINY_SIGMA, SDXL_VAE)


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    return build_pixart(tmp_path_factory.mktemp("pixart"))


@pytest.fixture(scope="module")
def sigma(tmp_path_factory):
    return build_sigma(tmp_path_factory.mktemp("sigma"))


@torch.no_grad()
def test_transformer_matches_diffusers(pixart):
    reference = pixart[1].transformer
    ours = PixArt(PixArtConfig.from_diffusers(dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert ours.config.use_additional_conditions and ours.config.interpolation_scale == 2
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, 32, generator=g)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])
    t = torch.tensor([999, 3])
    added = {"resolution": torch.tensor([[16.0, 24], [64, 32]]), "aspect_ratio": torch.ones(2, 1)}
    expected = reference(
        x,
        encoder_hidden_states=ctx,
        encoder_attention_mask=mask,
        timestep=t,
        added_cond_kwargs=added,
    ).sample
    got = ours(x, t.float(), ctx, mask, added, variance=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert ours(x, t, ctx, mask, added).shape == (2, 4, 8, 12)  # ε alone
    ctx[1, 3:] = 9.0  # masked tokens change nothing
    torch.testing.assert_close(ours(x, t, ctx, mask, added, variance=True), got, rtol=0, atol=1e-6)
    other = {**added, "aspect_ratio": torch.full((2, 1), 2.0)}
    assert (ours(x, t, ctx, mask, other, variance=True) - got).abs().max() > 1e-3  # micro-cond


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loads_as_pixart_and_encodes_like_diffusers(request, variant):
    folder, reference = request.getfixturevalue(variant)
    family, _, tokens = VARIANTS[variant]
    pipe = destatic.load(folder)
    assert pipe.family.name == family and pipe.sampling_defaults["guidance"] == 4.5
    assert isinstance(pipe.network, PixArt) and isinstance(pipe.text_encoder, T5TextEncoder)
    assert pipe.text_encoder.max_length == tokens
    assert pipe.autoencoder.config.scaling_factor == reference.vae.config.scaling_factor
    embeds, mask, negative, negative_mask = reference.encode_prompt(
        "a red apple", negative_prompt="", clean_caption=False
    )
    assert embeds.shape[1] == tokens
    cond = pipe.conditioning(["a red apple"], **SIZE)
    uncond = pipe.conditioning([""], negative=True, **SIZE)
    # the reloaded T5 differs from the in-memory one by float noise only
    torch.testing.assert_close(cond["context"], embeds, rtol=0, atol=1e-5)
    assert torch.equal(cond["context_mask"], mask.bool()) and 3 < mask.sum() < 120
    torch.testing.assert_close(uncond["context"], negative, rtol=0, atol=1e-5)
    assert torch.equal(uncond["context_mask"], negative_mask.bool())
    if variant == "sigma":  # PixArtSigmaPipeline passes no micro-conditions
        assert "added_cond" not in cond and pipe.network.config.interpolation_scale == 2
        return
    assert cond["added_cond"]["resolution"].tolist() == [[16.0, 24.0]]
    assert torch.equal(cond["added_cond"]["aspect_ratio"], torch.tensor([[16 / 24]]))


def _diffusers_image(pipe, z: torch.Tensor, steps: int) -> np.ndarray:
    """``pipe``'s image of "a red apple" from latents z, without resolution binning and caption
    cleaning, at its default guidance 4.5."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red apple",
        num_inference_steps=steps,
        latents=z,
        clean_caption=False,
        use_resolution_binning=False,
        output_type="np",
        **SIZE,
    ).images


def _image(pipe, sampler: str, sigmas: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    got = pipe.generate("a red apple", sampler=sampler, sigmas=sigmas, noise=noise, **SIZE)
    return got.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    ("sampler", "name"), [("dpmpp_2m", "DPMSolverMultistepScheduler"), ("ddim", "DDIMScheduler")]
)
def test_same_image_as_diffusers_pixart_pipeline(request, variant, sampler, name):
    """A 24×16 image, guidance 4.5 (the family default, the diffusers pipelines'), 6 steps,
    from the same VP-state latents z (destatic's x = σ₀·noise is √(1+σ₀²)·z)."""
    folder, reference = request.getfixturevalue(variant)
    scheduler = getattr(diffusers, name)(**LINEAR, **SCHEDULERS[sampler][1])
    pipe = type(reference)(**{**reference.components, "scheduler": scheduler})
    sigmas, z, noise = same_latents(scheduler, 6, seed=2, shape=(1, 4, 8, 12))
    expected = _diffusers_image(pipe, z, 6)
    got = _image(destatic.load(folder), sampler, sigmas, noise)
    assert got.shape == expected.shape == (1, 16, 24, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_loads_back_in_destatic_and_diffusers(request, variant, tmp_path):
    """``save(load(folder))`` is a folder of the same diffusers pipeline class: destatic draws
    the same image from it, and diffusers loads it and, with the scheduler saved (DPM-Solver++
    on the same β schedule), draws destatic's ``dpmpp_2m`` image. A T5 length other than the
    pipeline's is kept in ``destatic_max_sequence_length``."""
    folder, reference = request.getfixturevalue(variant)
    family, pipeline_class, tokens = VARIANTS[variant]
    pipe = destatic.load(folder)
    save(pipe, tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class and "destatic_max_sequence_length" not in index
    again = destatic.load(tmp_path / "saved")
    assert again.family.name == family and again.text_encoder.max_length == tokens
    kwargs = {"steps": 3, "seed": 1, **SIZE}
    assert torch.equal(again.generate("a cat", **kwargs), pipe.generate("a cat", **kwargs))
    loaded = type(reference).from_pretrained(tmp_path / "saved")
    assert torch.equal(loaded.scheduler.alphas_cumprod, reference.scheduler.alphas_cumprod)
    sigmas, z, noise = same_latents(loaded.scheduler, 5, seed=4, shape=(1, 4, 8, 12))
    expected = _diffusers_image(loaded, z, 5)
    got = _image(again, "dpmpp_2m", sigmas, noise)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    pipe.text_encoder.max_length = 64
    save(pipe, tmp_path / "short")
    assert destatic.load(tmp_path / "short").text_encoder.max_length == 64


def test_hub_name_loads_as_pixart(pixart, tmp_path):
    """PixArt-alpha/PixArt-XL-2-* call the transformer ``Transformer2DModel``."""
    folder = tmp_path / "hub"
    shutil.copytree(pixart[0], folder)
    config = folder / "transformer" / "config.json"
    cfg = json.loads(config.read_text())
    extra = {"num_vector_embeds": None, "only_cross_attention": False}
    config.write_text(json.dumps({**cfg, "_class_name": "Transformer2DModel", **extra}))
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "Transformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = destatic.load(folder)
    assert pipe.family.name == "pixart-alpha" and isinstance(pipe.network, PixArt)
