"""PixArt-α folders: the adaLN-single transformer (micro-conditions, learned variance) against
diffusers' PixArtTransformer2DModel, and the same image as diffusers' PixArtAlphaPipeline (T5
tokens with their mask) with DPM-Solver++ 2M and DDIM."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import destatic
from destatic.models.pixart import PixArt, PixArtConfig
from destatic.models.text import T5TextEncoder
from tests import tiny_sd
from tests.test_pipeline import SCHEDULERS, scheduler_sigmas
from tests.test_pipeline_dit import LINEAR

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
SIZE = {"height": 16, "width": 24}


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """A tiny random diffusers PixArtAlphaPipeline, perturbed, saved as safetensors."""
    tmp = tmp_path_factory.mktemp("pixart")
    torch.manual_seed(0)
    transformer = tiny_sd.perturb(diffusers.PixArtTransformer2DModel(**TINY_PIXART)).eval()
    vae = tiny_sd.perturb(diffusers.AutoencoderKL(**dict(tiny_sd.VAE, sample_size=16))).eval()
    t5, tokenizer = tiny_sd.t5_encoder_and_tokenizer(d_model=32)
    scheduler = diffusers.DPMSolverMultistepScheduler(**LINEAR, **SCHEDULERS["dpmpp_2m"][1])
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_sd.perturb(t5).eval(),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    folder = tmp / "pixart"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


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


def test_loads_as_pixart_and_encodes_like_diffusers(pixart):
    folder, reference = pixart
    pipe = destatic.load(folder)
    assert pipe.family.name == "pixart-alpha" and pipe.sampling_defaults["guidance"] == 4.5
    assert isinstance(pipe.network, PixArt) and isinstance(pipe.text_encoder, T5TextEncoder)
    embeds, mask, negative, negative_mask = reference.encode_prompt(
        "a red apple", negative_prompt="", clean_caption=False
    )
    cond = pipe.conditioning(["a red apple"], **SIZE)
    uncond = pipe.conditioning([""], negative=True, **SIZE)
    # the reloaded T5 differs from the in-memory one by float noise only
    torch.testing.assert_close(cond["context"], embeds, rtol=0, atol=1e-5)
    assert torch.equal(cond["context_mask"], mask.bool()) and 3 < mask.sum() < 120
    torch.testing.assert_close(uncond["context"], negative, rtol=0, atol=1e-5)
    assert torch.equal(uncond["context_mask"], negative_mask.bool())
    assert cond["added_cond"]["resolution"].tolist() == [[16.0, 24.0]]
    assert torch.equal(cond["added_cond"]["aspect_ratio"], torch.tensor([[16 / 24]]))


@pytest.mark.parametrize(
    ("sampler", "name"), [("dpmpp_2m", "DPMSolverMultistepScheduler"), ("ddim", "DDIMScheduler")]
)
def test_same_image_as_diffusers_pixart_pipeline(pixart, sampler, name):
    """A 24×16 image, guidance 4.5 (the family default, PixArtAlphaPipeline's), 6 steps, from
    the same VP-state latents z (destatic's x = σ₀·noise is √(1+σ₀²)·z); diffusers without
    resolution binning and caption cleaning."""
    folder, reference = pixart
    scheduler = getattr(diffusers, name)(**LINEAR, **SCHEDULERS[sampler][1])
    pipe = diffusers.PixArtAlphaPipeline(**{**reference.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    steps = 6
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    expected = pipe(
        "a red apple",
        num_inference_steps=steps,
        latents=z,
        clean_caption=False,
        use_resolution_binning=False,
        output_type="np",
        **SIZE,
    ).images
    scheduler.set_timesteps(steps)
    sigmas = scheduler_sigmas(scheduler)
    start = float(sigmas[0])
    ours = destatic.load(folder)
    noise = z * math.sqrt(1 + start**2) / start
    got = ours.generate("a red apple", sampler=sampler, sigmas=sigmas, noise=noise, **SIZE)
    got = got.permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape == (1, 16, 24, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


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
