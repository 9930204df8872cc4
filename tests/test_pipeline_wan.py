"""Wan 2.1 text→video folders: the transformer and the causal video VAE against diffusers'
WanTransformer3DModel and AutoencoderKLWan, the UMT5 embedding against WanPipeline.encode_prompt,
and the same frames as diffusers' WanPipeline from the same latents with its UniPC scheduler
(``uni_pc``) and with FlowMatchEuler (``euler``)."""

from __future__ import annotations

import json
import shutil
import string

import numpy as np
import pytest
import torch

import destatic
from destatic.io import CheckpointError
from destatic.models.wan import WanConfig, WanTransformer3DModel
from destatic.models.wan_text import UMT5TextEncoder
from destatic.models.wan_vae import AutoencoderKLWan, WanVAEConfig
from destatic.pipelines import save
from destatic.pipelines.families.wan import wan_latent_frames
from destatic.process.flow_sigmas import IntegerTimestepFlow
from destatic.process.schedulers import process_from_scheduler_config
from tests import tiny_sd
from tests.test_pipeline_sd3 import _flow_sigmas

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

# 2 heads of 12 channels: rotary parts (t, h, w) = (4, 4, 4); text width = UMT5's d_model
TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
# 8× in space, 4× in time, as Wan 2.1's VAE; 3 channels per level
TINY_VAE = dict(
    base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
    temperal_downsample=[False, True, True],
)  # fmt: skip
UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
# 9 frames of 32 × 16 px: latents (1, 16, 3, 4, 2), 3 × 2 × 1 tokens
SIZE = {"height": 32, "width": 16, "num_frames": 9}
PROMPT, NEGATIVE = "a red apple", "blurry"


def _umt5():
    """A tiny random UMT5EncoderModel (width 32) and a character-level T5 tokenizer."""
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(c, -1.0) for c in string.ascii_lowercase + string.digits + " ▁.,!?'-"]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    config = UMT5Config(
        vocab_size=len(vocab), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return UMT5EncoderModel(config).eval(), tokenizer


def _pipeline(components: dict, scheduler):
    pipe = diffusers.WanPipeline(**components, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """Tiny random WanPipelines saved by diffusers: (UniPC folder, its pipeline, FlowMatchEuler
    folder, its pipeline) — the same weights in both."""
    tmp = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    encoder, tokenizer = _umt5()
    components = dict(
        tokenizer=tokenizer,
        text_encoder=tiny_sd.perturb(encoder).eval(),
        transformer=tiny_sd.perturb(diffusers.WanTransformer3DModel(**TINY_WAN)).eval(),
        vae=tiny_sd.perturb(diffusers.AutoencoderKLWan(**TINY_VAE)).eval(),
    )
    unipc = _pipeline(components, diffusers.UniPCMultistepScheduler(**UNIPC))
    unipc.save_pretrained(tmp / "unipc", safe_serialization=True)
    euler = _pipeline(components, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    shutil.copytree(tmp / "unipc", tmp / "euler")
    shutil.rmtree(tmp / "euler" / "scheduler")
    euler.scheduler.save_pretrained(tmp / "euler" / "scheduler")
    return tmp / "unipc", unipc, tmp / "euler", euler


@torch.no_grad()
def test_transformer_matches_diffusers(wan):
    reference = wan[1].transformer
    ours = WanTransformer3DModel(WanConfig.from_diffusers(dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 16, 3, 4, 6, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([999.0, 3.5])
    expected = reference(x, t, ctx).sample
    got = ours(x, t, ctx)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    ctx[1, 3:] = 0.0  # the text reaches every token
    assert (ours(x, t, ctx) - got)[1].abs().max() > 1e-3


@torch.no_grad()
def test_vae_matches_diffusers(wan):
    reference = wan[1].vae
    ours = AutoencoderKLWan(WanVAEConfig.from_diffusers(dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 16, 3, 2, 3, generator=g)
    expected = reference.decode(z).sample  # diffusers decodes one latent frame at a time
    assert expected.shape == (2, 3, 9, 16, 24)
    torch.testing.assert_close(ours.decode(z), expected, rtol=0, atol=1e-5)
    clip = torch.rand(1, 3, 9, 16, 24, generator=g) * 2 - 1
    posterior = reference.encode(clip).latent_dist  # 1 frame, then 4 at a time
    torch.testing.assert_close(ours.encode(clip).mean, posterior.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.encode(clip).logvar, posterior.logvar, rtol=0, atol=1e-5)
    # diffusion-space latents: (z - mean) / std per channel, as WanPipeline decodes
    mean = torch.tensor(reference.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(reference.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(ours.images_from_latents(z), reference.decode(z * std + mean).sample)
    normalised = ours.latents_from_images(clip, sample=False)
    torch.testing.assert_close(normalised, (posterior.mean - mean) / std, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="1 \\+ 4·k frames"):
        ours.encode(clip[:, :, :8])


def test_latent_frames_follow_diffusers():
    assert [wan_latent_frames(f) for f in (1, 5, 9, 81)] == [1, 2, 3, 21]
    with pytest.warns(UserWarning, match="drawing 13 frames"):
        assert wan_latent_frames(12) == 4  # diffusers: 12 // 4 · 4 + 1 = 13 frames
    with pytest.raises(ValueError, match="positive integer"):
        wan_latent_frames(0)


@torch.no_grad()
def test_loads_as_wan_and_encodes_like_diffusers(wan):
    pipe = destatic.load(wan[0])
    assert pipe.family.name == "wan" and pipe.family.media == "video"
    assert isinstance(pipe.network, WanTransformer3DModel)
    assert isinstance(pipe.autoencoder, AutoencoderKLWan)
    assert isinstance(pipe.text_encoder, UMT5TextEncoder) and pipe.text_encoder.max_length == 512
    assert isinstance(pipe.process, IntegerTimestepFlow) and pipe.process.shift == 3.0
    defaults = pipe.sampling_defaults
    assert defaults == {"steps": 50, "sampler": "uni_pc", "grid": "sgm_uniform", "guidance": 5.0}
    assert pipe.latent_shape(1, 16, 32, 9) == (1, 16, 3, 4, 2)
    assert pipe.latent_shape(1, 16, 32) == (1, 16, 21, 4, 2)  # 81 frames by default
    embeds, negative = wan[1].encode_prompt(PROMPT, NEGATIVE, max_sequence_length=512)
    cond = pipe.conditioning([PROMPT])["context"]
    assert cond.shape == (1, 512, 32) and cond[0, 20:].abs().max() == 0  # zeroed padding
    torch.testing.assert_close(cond, embeds, rtol=0, atol=1e-5)
    uncond = pipe.conditioning([NEGATIVE], negative=True)["context"]
    torch.testing.assert_close(uncond, negative, rtol=0, atol=1e-5)


def _diffusers_frames(reference, z: torch.Tensor, steps: int) -> np.ndarray:
    frames = reference(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=5.0,
        latents=z,
        output_type="np",
        **SIZE,
    ).frames
    return np.asarray(frames)  # (B, F, H, W, C)


@pytest.mark.parametrize(("sampler", "folder", "reference"), [("uni_pc", 0, 1), ("euler", 2, 3)])
@torch.no_grad()
def test_same_frames_as_diffusers_wan_pipeline(wan, sampler, folder, reference):
    z = torch.randn(1, 16, 3, 4, 2, generator=torch.Generator().manual_seed(3))
    expected = _diffusers_frames(wan[reference], z, steps=4)
    assert expected.shape == (1, 9, 32, 16, 3)
    sigmas = _flow_sigmas(wan[reference].scheduler)  # after the call's set_timesteps(4)
    pipe = destatic.load(wan[folder])
    clip = pipe.generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        sampler=sampler,
        sigmas=sigmas,
        guidance=5.0,
        noise=z,
        **SIZE,
    )
    got = clip.permute(0, 2, 3, 4, 1).numpy()  # (B, C, F, H, W) → (B, F, H, W, C)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.01  # the frames are not flat


@torch.no_grad()
def test_default_grid_draws_diffusers_frames(wan):
    """The family's defaults (``uni_pc`` on ``sgm_uniform``, starting at t = 1 - 10⁻⁶) are
    diffusers' UniPC run: no sigmas passed."""
    z = torch.randn(1, 16, 3, 4, 2, generator=torch.Generator().manual_seed(4))
    expected = _diffusers_frames(wan[1], z, steps=5)
    pipe = destatic.load(wan[0])
    clip = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=5, noise=z, **SIZE)
    np.testing.assert_allclose(clip.permute(0, 2, 3, 4, 1).numpy(), expected, atol=1e-5, rtol=0)
    labels = pipe.process.noise_label(_flow_sigmas(wan[1].scheduler)[:-1].double())
    assert labels.tolist() == wan[1].scheduler.timesteps.tolist()  # ⌊1000·t⌋, 999 first


@torch.no_grad()
def test_save_load_round_trip(wan, tmp_path):
    """``save`` writes a WanPipeline folder (UniPC with flow sigmas kept) that destatic and
    diffusers both load back to the same frames."""
    pipe = destatic.load(wan[0])
    save(pipe, tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    again = destatic.load(tmp_path / "saved")
    assert again.family.name == "wan" and again.process == pipe.process
    z = torch.randn(1, 16, 3, 4, 2, generator=torch.Generator().manual_seed(5))
    kwargs = dict(negative_prompt=NEGATIVE, steps=3, noise=z, **SIZE)
    clip = again.generate(PROMPT, **kwargs)
    assert torch.equal(clip, pipe.generate(PROMPT, **kwargs))
    reference = diffusers.WanPipeline.from_pretrained(tmp_path / "saved")
    reference.set_progress_bar_config(disable=True)
    expected = _diffusers_frames(reference, z, steps=3)
    np.testing.assert_allclose(clip.permute(0, 2, 3, 4, 1).numpy(), expected, atol=1e-5, rtol=0)


def test_bad_configs_fail_in_one_line():
    base = {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True}
    with pytest.raises(CheckpointError, match="prediction_type 'flow_prediction'"):
        process_from_scheduler_config({**base, "prediction_type": "epsilon"})
    with pytest.raises(CheckpointError, match="flow_shift"):
        process_from_scheduler_config(
            {**base, "prediction_type": "flow_prediction", "flow_shift": 0}
        )
    with pytest.raises(ValueError, match="image_dim and added_kv_proj_dim go together"):
        WanConfig.from_diffusers({**TINY_WAN, "image_dim": 1280})  # image→video needs both
    with pytest.raises(ValueError, match="is_residual"):
        WanVAEConfig.from_diffusers({**TINY_VAE, "is_residual": True})  # Wan 2.2's VAE
