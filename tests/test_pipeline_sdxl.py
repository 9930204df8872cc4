"""SDXL folders: the micro-conditioned U-Net, the two CLIPs, and the same image as diffusers'
StableDiffusionXLPipeline (Euler, DPM++ 2M) and, for the refiner (CLIP-G alone, aesthetic
score), StableDiffusionXLImg2ImgPipeline; unsupported variants fail with one line."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import destatic
from destatic.io import CheckpointError
from destatic.models import SDXLTextEncoder, UNet2DCondition
from destatic.models.autoencoder import AutoencoderConfig, AutoencoderKL
from destatic.models.unet import UNetConfig
from tests import tiny_sd
from tests.test_pipeline import SCHEDULERS, SD, scheduler_sigmas

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

TIME_DIM = 8  # addition_time_embed_dim
POOLED = 12  # CLIP-G's projection_dim
# two resolutions, transformer depth 1 and 2 per block (SDXL: 1/2/10), linear projections,
# 64-wide tokens (CLIP-L 32 + CLIP-G 32; SDXL: 768 + 1280)
SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    cross_attention_dim=64,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
)
# the refiner: CLIP-G tokens only, five time ids (size, crop, aesthetic score)
REFINER_UNET = dict(
    SDXL_UNET, cross_attention_dim=32, projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM
)
EULER = ("EulerDiscreteScheduler", SCHEDULERS["euler"][1])
DPMPP_2M = ("DPMSolverMultistepScheduler", SCHEDULERS["dpmpp_2m"][1])


def _clip(vocab: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=POOLED,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return tiny_sd.perturb(model).eval()


def _build(tmp, refiner: bool):
    """A tiny random diffusers SDXL pipeline (base or refiner), perturbed, saved as safetensors."""
    torch.manual_seed(1 if refiner else 0)
    unet = tiny_sd.perturb(
        diffusers.UNet2DConditionModel(**(REFINER_UNET if refiner else SDXL_UNET))
    )
    vae = tiny_sd.perturb(diffusers.AutoencoderKL(**dict(tiny_sd.VAE, sample_size=16)))
    tokenizer_2 = tiny_sd.clip_tokenizer(tmp / "tokenizer_2_src")
    tokenizer_2.pad_token = "!"  # as SDXL's CLIP-G tokenizer pads
    parts = dict(
        vae=vae.eval(),
        unet=unet.eval(),
        scheduler=getattr(diffusers, EULER[0])(**SD, **EULER[1]),
        text_encoder_2=_clip(len(tokenizer_2), projection=True),
        tokenizer_2=tokenizer_2,
        add_watermarker=False,
    )
    if refiner:
        cls = diffusers.StableDiffusionXLImg2ImgPipeline
        parts.update(text_encoder=None, tokenizer=None, requires_aesthetics_score=True)
        parts.update(force_zeros_for_empty_prompt=False)
    else:
        cls = diffusers.StableDiffusionXLPipeline
        tokenizer = tiny_sd.clip_tokenizer(tmp / "tokenizer_src")
        parts.update(text_encoder=_clip(len(tokenizer), projection=False), tokenizer=tokenizer)
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp / ("refiner" if refiner else "base")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("sdxl"), refiner=False)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("sdxl_refiner"), refiner=True)


def test_loads_as_sdxl(base):
    pipe = destatic.load(base[0])
    assert pipe.family.name == "sdxl" and pipe.sampling_defaults["guidance"] == 5.0
    assert isinstance(pipe.network, UNet2DCondition) and hasattr(pipe.network, "add_embedding")
    assert isinstance(pipe.text_encoder, SDXLTextEncoder) and pipe.text_encoder.clip_l is not None
    assert pipe.text_encoder.clip_g.tokenizer.pad_token == "!"
    embedding = pipe.text_encoder.encode(["a red apple", "x"])
    assert embedding.tokens.shape == (2, 77, 64) and embedding.pooled.shape == (2, POOLED)


@torch.no_grad()
def test_unet_matches_diffusers_with_micro_conditioning(base):
    reference = base[1].unet
    ours = UNet2DCondition(UNetConfig.from_diffusers(dict(reference.config)))
    ours.load_state_dict(reference.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, 64, generator=g)
    text = torch.randn(2, POOLED, generator=g)
    ids = torch.tensor([[16.0, 24, 0, 0, 16, 24], [32, 48, 4, 8, 16, 24]])
    t = torch.tensor([999.0, 3.5])
    added = {"text_embeds": text, "time_ids": ids}
    expected = reference(x, t, context, added_cond_kwargs=added).sample
    got = ours(x, t, context, added_cond=added)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    other = ours(x, t, context, added_cond={"text_embeds": text, "time_ids": ids.flip(1)})
    assert (other - got).abs().max() > 1e-3  # the time ids matter
    with pytest.raises(ValueError, match="micro-conditioned"):
        ours(x, t, context)


def test_encode_prompt_matches_diffusers(base):
    folder, reference = base
    pipe = destatic.load(folder)
    embeds, negative, pooled, negative_pooled = reference.encode_prompt(
        "a red apple", do_classifier_free_guidance=True, negative_prompt=None
    )
    cond = pipe.conditioning(["a red apple"], width=24, height=16)
    uncond = pipe.conditioning([""], width=24, height=16, negative=True)
    torch.testing.assert_close(cond["context"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["added_cond"]["text_embeds"], pooled, rtol=0, atol=0)
    assert torch.equal(uncond["context"], negative) and not negative.any()  # forced zeros
    assert torch.equal(uncond["added_cond"]["text_embeds"], negative_pooled)
    ids = reference._get_add_time_ids((16, 24), (0, 0), (16, 24), torch.float32, POOLED)
    assert torch.equal(cond["added_cond"]["time_ids"], ids)
    assert pipe.conditioning([""], width=24, height=16)["context"].any()  # not the negative


def _noise(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("sampler", "scheduler", "negative"),
    [("euler", EULER, "blurry"), ("dpmpp_2m", DPMPP_2M, None)],
)
def test_same_image_as_diffusers_sdxl_pipeline(base, sampler, scheduler, negative):
    """A 24×16 image (non-square: the time ids are (h, w)), guidance 5, from the same noise;
    without a negative prompt diffusers' zeros (force_zeros_for_empty_prompt)."""
    folder, reference = base
    name, config = scheduler
    steps = 6
    sched = getattr(diffusers, name)(**SD, **config)
    pipe = diffusers.StableDiffusionXLPipeline(**{**reference.components, "scheduler": sched})
    pipe.set_progress_bar_config(disable=True)
    sched.set_timesteps(steps)
    sigmas = scheduler_sigmas(sched)
    start = float(sigmas[0])
    k_style = sampler == "euler"
    scale = start / sched.init_noise_sigma if k_style else start / math.sqrt(1 + start**2)
    z = _noise((1, 4, 8, 12))
    size = {"height": 16, "width": 24}
    expected = pipe(
        "a red apple",
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=5.0,
        latents=z * scale,
        output_type="np",
        **size,
    ).images
    ours = destatic.load(folder)
    got = ours.generate(
        "a red apple", negative_prompt=negative, sampler=sampler, sigmas=sigmas, noise=z, **size
    )  # guidance: the family's default, 5
    got = got.permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_turbo_settings_match_diffusers_one_step(base):
    """SDXL-Turbo's use (README): one Euler-ancestral step on the trailing grid without
    classifier-free guidance. diffusers' guidance_scale=0 means no guidance (any scale ≤ 1);
    destatic's is w in uncond + w·(cond − uncond), so no guidance is guidance=1."""
    folder, reference = base
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD, timestep_spacing="trailing")
    pipe = diffusers.StableDiffusionXLPipeline(**{**reference.components, "scheduler": sched})
    pipe.set_progress_bar_config(disable=True)
    sched.set_timesteps(1)
    z = _noise((1, 4, 8, 8), seed=6)
    expected = pipe(
        "a red apple",
        num_inference_steps=1,
        guidance_scale=0.0,
        latents=z * float(sched.sigmas[0]) / sched.init_noise_sigma,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        height=16,
        width=16,
    ).images
    ours = destatic.load(folder)
    settings = {"sampler": "euler_ancestral", "grid": "trailing", "steps": 1, "guidance": 1.0}
    got = ours.generate("a red apple", noise=z, seed=7, height=16, width=16, **settings)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5, rtol=0)


def test_refiner_image_to_image_matches_diffusers(refiner):
    """The refiner (CLIP-G only, aesthetic scores 6 / 2.5 in the time ids) on an input image's
    latents at strength 0.6 with Euler, as StableDiffusionXLImg2ImgPipeline draws it."""
    folder, reference = refiner
    ours = destatic.load(folder)
    assert ours.family.name == "sdxl" and ours.text_encoder.clip_l is None
    assert ours.text_encoder.requires_aesthetics_score
    image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    init = ours.encode(image)  # the posterior mean, handed to diffusers as latents
    steps, strength = 10, 0.6
    expected = reference(
        "a red apple",
        negative_prompt="blurry",
        image=init,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(4),
        output_type="np",
    ).images
    reference.scheduler.set_timesteps(steps)
    got = ours.generate(
        "a red apple",
        negative_prompt="blurry",
        image=image,
        strength=strength,
        sampler="euler",
        sigmas=scheduler_sigmas(reference.scheduler),
        seed=4,
    )
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5, rtol=0)


def test_inpainting_keeps_the_unmasked_latents(base):
    """Inpainting with the base model (the known region wrapped around the guided denoiser):
    the final latents are the input image's outside the mask and new inside it."""
    pipe = destatic.load(base[0])
    image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 16, 24)
    mask[..., :8] = 1  # repaint the left third: latent columns 0-3
    decoded = []
    decode = pipe.decode
    pipe.decode = lambda z: decoded.append(z) or decode(z)
    got = pipe.generate("a red apple", image=image, mask=mask, steps=4, seed=0)
    known = pipe.encode(image)
    assert got.shape == (1, 3, 16, 24) and torch.isfinite(got).all()
    torch.testing.assert_close(decoded[0][..., 4:], known[..., 4:], rtol=0, atol=1e-6)
    assert (decoded[0][..., :4] - known[..., :4]).abs().max() > 1e-2


def test_lora_matches_diffusers(base, tmp_path):
    """A LoRA on the attention and the micro-conditioning MLP, saved in our (diffusers' peft)
    layout, at scale 0.6: the same image as StableDiffusionXLPipeline.load_lora_weights."""
    from destatic.models import lora
    from tests.test_lora import randomise

    folder, reference = base
    maker = destatic.load(folder)
    targets = ("to_q", "to_v", "ff.net.2", "add_embedding.linear_1")
    lora.add_lora(maker.network, lora.LoraSpec(rank=2, alpha=3, targets=targets))
    randomise(maker.network, "default")
    lora.save_lora(maker.network, tmp_path / "lora", "default")
    sched = getattr(diffusers, EULER[0])(**SD, **EULER[1])
    pipe = diffusers.StableDiffusionXLPipeline(**{**reference.components, "scheduler": sched})
    pipe.set_progress_bar_config(disable=True)
    sched.set_timesteps(4)
    sigmas = scheduler_sigmas(sched)
    z = _noise((1, 4, 8, 8), seed=5)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=lora.WEIGHTS_NAME, adapter_name="d")
    try:
        pipe.set_adapters(["d"], adapter_weights=[0.6])
        expected = pipe(
            "a red apple",
            num_inference_steps=4,
            latents=z * float(sigmas[0]) / sched.init_noise_sigma,
            output_type="np",
            height=16,
            width=16,
        ).images
    finally:
        pipe.unload_lora_weights()
    ours = destatic.load(folder)
    kwargs = {"sampler": "euler", "sigmas": sigmas, "noise": z, "height": 16, "width": 16}
    got = ours.generate("a red apple", loras=[(str(tmp_path / "lora"), 0.6)], **kwargs)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5, rtol=0)
    ours.set_lora_scale(next(iter(ours.loras)), 0.0)
    plain = ours.generate("a red apple", **kwargs)
    assert (plain - got).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_save_load_round_trip(which, request, tmp_path):
    from destatic.pipelines import save

    pipe = destatic.load(request.getfixturevalue(which)[0])
    save(pipe, tmp_path / "ours")
    again = destatic.load(tmp_path / "ours")
    assert again.family.name == "sdxl"
    for key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        assert getattr(again.text_encoder, key) == getattr(pipe.text_encoder, key)
    kwargs = {"steps": 3, "seed": 0, "width": 16, "height": 16}
    torch.testing.assert_close(again.generate("a", **kwargs), pipe.generate("a", **kwargs))


def _variant(folder, tmp_path, **changes):
    copy = tmp_path / "variant"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index.update(changes)
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"text_encoder_2": ["transformers", "T5EncoderModel"]}, "must be CLIPTextModelWithProj"),
        ({"requires_aesthetics_score": True}, "add_embedding takes 60 inputs but 5 time ids"),
    ],
)
def test_unsupported_variant_is_one_line(base, tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message) as error:
        destatic.load(_variant(base[0], tmp_path, **changes))
    assert "\n" not in str(error.value)


def test_unet_config_refuses_other_addition_embeddings():
    with pytest.raises(ValueError, match="unsupported addition_embed_type 'image'"):
        UNetConfig.from_diffusers(dict(SDXL_UNET, addition_embed_type="image"))
    with pytest.raises(ValueError, match="needs addition_time_embed_dim"):
        UNetConfig.from_diffusers(dict(SDXL_UNET, addition_time_embed_dim=None))


@torch.no_grad()
def test_force_upcast_decodes_fp16_weights_in_fp32(monkeypatch):
    """force_upcast (SDXL's VAE) decodes fp16 weights in fp32 even where the default safe
    dtype would be another (bf16 on CUDA; forced to fp16 here to see the difference on CPU)."""
    from destatic.models import autoencoder

    monkeypatch.setattr(autoencoder, "_safe_decode_dtype", lambda dtype, device: dtype)
    config = AutoencoderConfig.from_diffusers(dict(tiny_sd.VAE))
    z = torch.randn(1, 4, 4, 4).half()
    for upcast, want in ((True, torch.float32), (False, torch.float16)):
        model = AutoencoderKL(AutoencoderConfig(**{**config.__dict__, "force_upcast": upcast}))
        model = model.half()
        seen: list[torch.dtype] = []
        model.decoder.conv_in.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        assert model.decode(z).dtype == torch.float16 and seen == [want]
