"""Tiny random Stable-Diffusion components built locally (no hub), for pipeline tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# Tiny configs in diffusers' terms, shared by the model, checkpoint and pipeline tests.
UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
MMDIT = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=24,
    out_channels=4,
    pos_embed_max_size=32,
)


def perturb(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter (norm scales, biases, zero-initialised gates) so that no
    branch of the network is an identity and parity tests cannot pass by accident."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def clip_tokenizer(folder: Path):
    """A character-level CLIP BPE tokenizer (no merges) written to ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )


def components(tmp: Path, seed: int = 0):
    """(unet, vae, text_model, tokenizer) as diffusers/transformers modules, perturbed so no
    branch is an identity."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(UNET, sample_size=8))
    vae = AutoencoderKL(**dict(VAE, sample_size=16))
    tokenizer = clip_tokenizer(tmp / "tokenizer_src")
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    perturb(unet)
    perturb(vae)
    for module in (unet, vae, text):
        module.eval()
    return unet, vae, text, tokenizer


# SD3: two tiny CLIPs with projection (hidden 32 each, projection 12 each → pooled 24) and a
# transformer whose joint_attention_dim (64) holds both CLIP widths, with no T5.
SD3_MMDIT = dict(MMDIT, sample_size=8, joint_attention_dim=64, pooled_projection_dim=24)
SD3_VAE = dict(VAE, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609)


def _clip_with_projection(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def sd3_pipeline(tmp: Path, seed: int = 0):
    """A tiny random diffusers StableDiffusion3Pipeline (CLIP-L + CLIP-G, no T5), perturbed."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    transformer = perturb(SD3Transformer2DModel(**SD3_MMDIT)).eval()
    vae = perturb(AutoencoderKL(**SD3_VAE)).eval()
    tokenizer = clip_tokenizer(tmp / "tokenizer_src")
    tokenizer_2 = clip_tokenizer(tmp / "tokenizer_2_src")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_clip_with_projection(len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=_clip_with_projection(len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t5_encoder_and_tokenizer(d_model: int = 64):
    """A tiny random T5EncoderModel (width ``d_model``) and a character-level T5 tokenizer."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(c, -1.0) for c in string.ascii_lowercase + string.digits + " ▁.,!?'-"]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval(), tokenizer
