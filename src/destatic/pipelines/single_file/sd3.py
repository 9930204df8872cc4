"""Stable Diffusion 3 / 3.5 single files in Stability AI's original layout
(``sd3_medium_incl_clips_t5xxlfp8.safetensors``, ``sd3.5_large.safetensors``):

* ``model.diffusion_model.`` — the MMDiT: ``joint_blocks.N.{x_block,context_block}`` with fused
  ``attn.qkv``, ``attn.proj``, ``adaLN_modulation.1``, ``mlp.fc1/fc2``, ``attn.ln_q/ln_k``
  (3.5's q/k RMS norm), ``x_block.attn2`` (3.5 Medium's second image attention);
  ``x_embedder.proj``, ``pos_embed``, ``t_embedder``, ``y_embedder``, ``context_embedder``,
  ``final_layer``. The last block's context stream and the final layer give their adaLN as
  (shift, scale), diffusers' as (scale, shift) (``convert_sd3_transformer_checkpoint_to_
  diffusers`` read backwards);
* ``text_encoders.clip_l.transformer.`` / ``text_encoders.clip_g.transformer.`` — the CLIPs
  in transformers' names (a CLIP-L without ``text_projection`` takes the identity, as
  diffusers); ``text_encoders.t5xxl.transformer.`` — T5 (optional: without it the T5 tokens are
  zeros, as a folder without ``text_encoder_3``);
* ``first_stage_model.`` — the 16-channel autoencoder in LDM names.

The MMDiT's sizes come from the header unless ``config=`` has ``transformer/config.json``; the
three tokenizers from ``tokenizer=``/``config=`` (``tokenizer/``, ``tokenizer_2/``,
``tokenizer_3/``) or the local Hugging Face cache."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from destatic.models.mmdit import MMDiT, MMDiTConfig
from destatic.models.text import CLIPTextEncoder, SD3TextEncoder
from destatic.pipelines.families import Components, Family
from destatic.pipelines.families.sd3 import SD3
from destatic.pipelines.single_file.common import (
    Header,
    Piece,
    SingleFileFormat,
    Source,
    configs,
    fill,
    find_tokenizer,
    prefixed,
    register_single_file,
)
from destatic.pipelines.single_file.sd import (
    clip_from_file,
    clip_tokenizer,
    t5_from_file,
    vae_from_file,
)
from destatic.process.schedulers import process_from_scheduler_config

__all__ = ["sd3_name"]

_NET = "model.diffusion_model."
_TEXT = "text_encoders."
_TOP = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj.": "x_embedder.proj.",
    "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
    "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
    "proj_out.": "final_layer.linear.",
}
_BLOCK = {
    "attn.norm_q.": "x_block.attn.ln_q.",
    "attn.norm_k.": "x_block.attn.ln_k.",
    "attn.norm_added_q.": "context_block.attn.ln_q.",
    "attn.norm_added_k.": "context_block.attn.ln_k.",
    "attn.to_out.0.": "x_block.attn.proj.",
    "attn.to_add_out.": "context_block.attn.proj.",
    "attn2.norm_q.": "x_block.attn2.ln_q.",
    "attn2.norm_k.": "x_block.attn2.ln_k.",
    "attn2.to_out.0.": "x_block.attn2.proj.",
    "norm1.linear.": "x_block.adaLN_modulation.1.",
    "norm1_context.linear.": "context_block.adaLN_modulation.1.",
    "ff.net.0.proj.": "x_block.mlp.fc1.",
    "ff.net.2.": "x_block.mlp.fc2.",
    "ff_context.net.0.proj.": "context_block.mlp.fc1.",
    "ff_context.net.2.": "context_block.mlp.fc2.",
}
_QKV = re.compile(r"(attn2?)\.(to_|add_)([qkv])(?:_proj)?\.(weight|bias)")


def _renamed(key: str, table: dict[str, str]) -> str | None:
    for ours, theirs in table.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return None


def sd3_name(key: str, num_layers: int) -> Source:
    """The original name (no prefix) of our / diffusers' SD3 transformer parameter ``key``."""
    if key.startswith("norm_out.linear."):
        return Piece("final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1], swap=True)
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.*)", key)
    if m is None:
        return _renamed(key, _TOP) or key
    i, rest = int(m.group(1)), m.group(2)
    block = f"joint_blocks.{i}."
    if q := _QKV.fullmatch(rest):
        attn, side, which, kind = q.groups()
        stream = "x_block" if side == "to_" else "context_block"
        return Piece(f"{block}{stream}.{attn}.qkv.{kind}", part=("qkv".index(which), 3))
    found = block + (_renamed(rest, _BLOCK) or rest)
    last_context = i == num_layers - 1 and rest.startswith("norm1_context.")
    return Piece(found, swap=True) if last_context else found


def _inferred(header: Header, shipped: dict) -> dict:
    """The MMDiT config the header implies (head width from a q-norm when there is one, else
    the shipped 64)."""

    def shape(name: str) -> tuple[int, ...]:
        return header[_NET + name][1]

    hidden, channels, patch, _ = shape("x_embedder.proj.weight")
    norm = f"{_NET}joint_blocks.0.x_block.attn.ln_q.weight"
    head = header[norm][1][0] if norm in header else shipped["attention_head_dim"]
    blocks = {
        int(m.group(1)) for k in header if (m := re.match(rf"{_NET}joint_blocks\.(\d+)\.", k))
    }
    dual = {
        int(m.group(1))
        for k in header
        if (m := re.match(rf"{_NET}joint_blocks\.(\d+)\.x_block\.attn2\.", k))
    }
    context = shape("context_embedder.weight")
    return {
        **shipped,
        "in_channels": channels,
        "out_channels": shape("final_layer.linear.weight")[0] // (patch * patch),
        "patch_size": patch,
        "num_layers": max(blocks) + 1,
        "attention_head_dim": head,
        "num_attention_heads": hidden // head,
        "caption_projection_dim": context[0],
        "joint_attention_dim": context[1],
        "pooled_projection_dim": shape("y_embedder.mlp.0.weight")[1],
        "pos_embed_max_size": math.isqrt(shape("pos_embed")[1]),
        "qk_norm": "rms_norm" if norm in header else None,
        "dual_attention_layers": sorted(dual),
    }


def _load(
    path: Path, header: Header, config: Path | None, tokenizer: Path | None
) -> tuple[Components, Family]:
    cfg = configs("sd3", config)
    what = f"{path.name} (SD3)"
    has_t5 = any(k.startswith(f"{_TEXT}t5xxl.") for k in header)
    if config is None or not (config / "transformer" / "config.json").is_file():
        cfg["transformer"] = _inferred(header, cfg["transformer"])
    mmdit_config = MMDiTConfig.from_diffusers(cfg["transformer"])
    layers = mmdit_config.num_layers
    name = lambda k: prefixed(_NET, sd3_name(k, layers))  # noqa: E731
    network = fill(lambda: MMDiT(mmdit_config), path, header, name, "MMDiT")
    clips = []
    for i, (tower, sub) in enumerate((("clip_l", "tokenizer"), ("clip_g", "tokenizer_2"))):
        tok = find_tokenizer(what, tokenizer, config, cfg[sub], sub=sub)
        text_cfg = cfg["text_encoder" if i == 0 else "text_encoder_2"]
        prefix = f"{_TEXT}{tower}.transformer."
        eye = {"text_projection.weight": lambda shape: torch.eye(*shape)}
        text = clip_from_file(path, header, text_cfg, lambda k, p=prefix: p + k, tower, eye)
        clips.append(CLIPTextEncoder(text, clip_tokenizer(tok)))
    t5 = t5_tokenizer = None
    if has_t5:
        tok = find_tokenizer(what, tokenizer, config, cfg["tokenizer_3"], "tokenizer_3", "T5")
        t5, t5_tokenizer = t5_from_file(path, header, cfg["text_encoder_3"], tok)
    encoder = SD3TextEncoder(
        *clips, t5, t5_tokenizer, joint_attention_dim=mmdit_config.joint_attention_dim
    )
    vae = vae_from_file(path, header, cfg["vae"])
    process, target = process_from_scheduler_config(cfg["scheduler"])
    return Components(network, vae, encoder, process, target, {}), SD3


register_single_file(
    SingleFileFormat(
        name="SD3",
        looks_for=f"{_NET}joint_blocks… with {_TEXT}clip_l/clip_g (+ t5xxl)",
        matches=lambda h: f"{_NET}joint_blocks.0.x_block.attn.qkv.weight" in h,
        load=_load,
    )
)
