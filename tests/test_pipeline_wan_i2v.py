"""Wan 2.1 image→video folders: the image-reading transformer against diffusers'
WanTransformer3DModel (``image_dim``, ``added_kv_proj_dim``), the condition and CLIP tokens
against WanImageToVideoPipeline's, the same frames as that pipeline from the same latents
(UniPC ``uni_pc`` and FlowMatchEuler ``euler``), the one-line error without an image, and the
VAE's chunked (streamed) decode and encode against the whole clip at once."""

from __future__ import annotations

import importlib
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import destatic
from destatic.models.wan import WanConfig, WanTransformer3DModel
from destatic.models.wan_text import WanImagePromptEncoder
from destatic.models.wan_vae import AutoencoderKLWan, WanVAEConfig
from destatic.pipelines import GenerationRequest, save
from destatic.pipelines.families.wan import wan_image_mask
from destatic.pipelines.stages import prepare_inputs
from tests import tiny_sd
from tests.test_pipeline_sd3 import _flow_sigmas
from tests.test_pipeline_wan import NEGATIVE, PROMPT, SIZE, TINY_VAE, TINY_WAN, UNIPC, _umt5

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

# 16 + 4 + 16 channels in; CLIP tokens 16 wide embedded to the hidden size (24)
TINY_I2V = {**TINY_WAN, "in_channels": 36, "image_dim": 16, "added_kv_proj_dim": 24}
# a 32-px CLIP of 8-px patches: 1 + 16 tokens
TINY_CLIP = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
    image_size=32, patch_size=8,
)  # fmt: skip


def _clip():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    model = tiny_sd.perturb(CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP))).eval()
    size = TINY_CLIP["image_size"]
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return model, processor


def _pipeline(components: dict, scheduler):
    pipe = diffusers.WanImageToVideoPipeline(**components, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wan_i2v(tmp_path_factory):
    """Tiny random WanImageToVideoPipelines saved by diffusers: (UniPC folder, its pipeline,
    FlowMatchEuler folder, its pipeline), the same weights in both."""
    tmp = tmp_path_factory.mktemp("wan_i2v")
    torch.manual_seed(0)
    encoder, tokenizer = _umt5()
    image_encoder, image_processor = _clip()
    components = dict(
        tokenizer=tokenizer,
        text_encoder=tiny_sd.perturb(encoder).eval(),
        transformer=tiny_sd.perturb(diffusers.WanTransformer3DModel(**TINY_I2V)).eval(),
        vae=tiny_sd.perturb(diffusers.AutoencoderKLWan(**TINY_VAE)).eval(),
        image_encoder=image_encoder,
        image_processor=image_processor,
    )
    unipc = _pipeline(components, diffusers.UniPCMultistepScheduler(**UNIPC))
    unipc.save_pretrained(tmp / "unipc", safe_serialization=True)
    euler = _pipeline(components, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    shutil.copytree(tmp / "unipc", tmp / "euler")
    shutil.rmtree(tmp / "euler" / "scheduler")
    euler.scheduler.save_pretrained(tmp / "euler" / "scheduler")
    # the I2V pipeline calls ftfy.fix_text unguarded; destatic does not run ftfy (wan_text)
    module = importlib.import_module(type(unipc).__module__)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "ftfy", SimpleNamespace(fix_text=str), raising=False)
        yield tmp / "unipc", unipc, tmp / "euler", euler


def _image(seed: int = 0):
    """A random RGB picture of the clip's size (16 × 32)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (SIZE["height"], SIZE["width"], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("positions", [None, 34])  # 34: first-last-frame, 2 × 17 tokens
@torch.no_grad()
def test_image_transformer_matches_diffusers(positions):
    torch.manual_seed(1)
    config = {**TINY_I2V, "pos_embed_seq_len": positions}
    reference = tiny_sd.perturb(diffusers.WanTransformer3DModel(**config)).eval()
    ours = WanTransformer3DModel(WanConfig.from_diffusers(dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 36, 3, 4, 6, generator=g), torch.randn(2, 512, 32, generator=g)
    image = torch.randn(2 if positions is None else 4, 17, 16, generator=g)
    t = torch.tensor([999.0, 3.5])
    expected = reference(x, t, ctx, encoder_hidden_states_image=image).sample
    got = ours(x[:, :16], t, ctx, image_context=image, condition=x[:, 16:])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    other = ours(x[:, :16], t, ctx, image_context=image.flip(0), condition=x[:, 16:])
    assert (other - got).abs().max() > 1e-3  # the image tokens reach the output
    with pytest.raises(ValueError, match="needs image_context"):
        ours(x[:, :16], t, ctx, condition=x[:, 16:])
    with pytest.raises(ValueError, match="reads 36 channels"):
        ours(x[:, :16], t, ctx, image_context=image)


@torch.no_grad()
def test_condition_and_image_tokens_match_diffusers(wan_i2v):
    """Mask channels, first-frame latents and CLIP tokens as WanImageToVideoPipeline builds
    them (``prepare_latents``, ``encode_image``)."""
    reference, image = wan_i2v[1], _image()
    pipe = destatic.load(wan_i2v[0])
    assert pipe.family.name == "wan_i2v" and pipe.family.media == "video"
    assert isinstance(pipe.text_encoder, WanImagePromptEncoder)
    pixels = reference.video_processor.preprocess(image, height=32, width=16)
    z = torch.zeros(2, 16, 3, 4, 2)
    _, expected = reference.prepare_latents(pixels, 2, 16, 32, 16, 9, torch.float32, "cpu", None, z)
    request = GenerationRequest([PROMPT] * 2, image=image, **SIZE).resolved(pipe)
    inputs = prepare_inputs(request, pipe.default_size, 2)
    got = pipe.family.image_conditioning(pipe, request, inputs)
    assert got["condition"].shape == (2, 20, 3, 4, 2)
    torch.testing.assert_close(got["condition"], expected, rtol=0, atol=1e-5)
    assert wan_image_mask(3, 1, 1).flatten().tolist() == [1, 0, 0] * 4
    tokens = reference.encode_image(image, "cpu")  # (1, 17, 16)
    torch.testing.assert_close(got["image_context"], tokens.expand(2, -1, -1), rtol=0, atol=1e-5)


def _diffusers_frames(reference, z: torch.Tensor, steps: int) -> np.ndarray:
    frames = reference(
        image=_image(),
        prompt=PROMPT,
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
def test_same_frames_as_diffusers_wan_i2v_pipeline(wan_i2v, sampler, folder, reference):
    z = torch.randn(1, 16, 3, 4, 2, generator=torch.Generator().manual_seed(3))
    expected = _diffusers_frames(wan_i2v[reference], z, steps=4)
    assert expected.shape == (1, 9, 32, 16, 3)
    sigmas = _flow_sigmas(wan_i2v[reference].scheduler)  # after the call's set_timesteps(4)
    pipe = destatic.load(wan_i2v[folder])
    clip = pipe.generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        image=_image(),
        sampler=sampler,
        sigmas=sigmas,
        guidance=5.0,
        noise=z,
        num_frames=SIZE["num_frames"],
    )
    got = clip.permute(0, 2, 3, 4, 1).numpy()  # (B, C, F, H, W) → (B, F, H, W, C)
    print(f"{sampler}: max |ours - diffusers| = {np.abs(got - expected).max():.2e}")
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.01  # the frames are not flat
    other = pipe.generate(PROMPT, negative_prompt=NEGATIVE, image=_image(1), sampler=sampler,
                          sigmas=sigmas, noise=z, num_frames=9)  # fmt: skip
    assert (other - clip).abs().max() > 1e-3  # the image steers the clip


@torch.no_grad()
def test_default_grid_and_save_round_trip(wan_i2v, tmp_path):
    """The defaults draw diffusers' frames (no sigmas passed); ``save`` writes a
    WanImageToVideoPipeline folder, CLIP included, that destatic and diffusers both load back
    to the same frames."""
    z = torch.randn(1, 16, 3, 4, 2, generator=torch.Generator().manual_seed(4))
    expected = _diffusers_frames(wan_i2v[1], z, steps=3)
    pipe = destatic.load(wan_i2v[0])
    kwargs = dict(negative_prompt=NEGATIVE, image=_image(), steps=3, noise=z, num_frames=9)
    clip = pipe.generate(PROMPT, **kwargs)
    np.testing.assert_allclose(clip.permute(0, 2, 3, 4, 1).numpy(), expected, atol=1e-5, rtol=0)
    save(pipe, tmp_path / "saved")
    again = destatic.load(tmp_path / "saved")
    assert again.family.name == "wan_i2v"
    assert torch.equal(again.generate(PROMPT, **kwargs), clip)
    reference = diffusers.WanImageToVideoPipeline.from_pretrained(tmp_path / "saved")
    reference.set_progress_bar_config(disable=True)
    frames = _diffusers_frames(reference, z, steps=3)
    np.testing.assert_allclose(clip.permute(0, 2, 3, 4, 1).numpy(), frames, atol=1e-5, rtol=0)


def test_missing_image_fails_in_one_line(wan_i2v):
    pipe = destatic.load(wan_i2v[0])
    with pytest.raises(ValueError, match=r"image→video: give the first frame as image=") as e:
        pipe.generate(PROMPT, steps=1, num_frames=9, width=16, height=32)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no mask or strength"):
        pipe.generate(PROMPT, image=_image(), strength=0.5, steps=2, num_frames=9)


@torch.no_grad()
def test_chunked_vae_is_the_whole_clip():
    """Decoding one latent frame at a time (or 2) with each causal convolution's past kept,
    and encoding 1 + 4 + 4 … frames, give the whole clip's result."""
    torch.manual_seed(2)
    vae = tiny_sd.perturb(AutoencoderKLWan(WanVAEConfig.from_dict(TINY_VAE))).eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, 4, 2, 3, generator=g)
    whole = vae.decode(z, chunk=None)
    assert whole.shape == (1, 3, 13, 16, 24)
    for chunk in (1, 2, 3):
        torch.testing.assert_close(vae.decode(z, chunk=chunk), whole, rtol=0, atol=1e-6)
    clip = torch.rand(1, 3, 13, 16, 24, generator=g) * 2 - 1
    torch.testing.assert_close(vae.encode(clip).mean, vae.encode(clip, chunk=None).mean)
    torch.testing.assert_close(vae.encode(clip, chunk=2).mean, vae.encode(clip, chunk=None).mean)
    assert all(m.past is None for m in vae.modules() if hasattr(m, "past"))  # state dropped
    with pytest.raises(ValueError, match="chunk must be a positive"):
        vae.decode(z, chunk=0)
