"""Parameter names of the original Stable Diffusion code (CompVis' LDM: the layout of A1111 and
ComfyUI single-file checkpoints) for our U-Net and autoencoder, which use diffusers' names.

Each function maps one of *our* parameter names to the name the LDM code gives the same tensor
(diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` read backwards), so
a loader walks the module's own keys and looks each one up in the file: every parameter the
network needs is found or named as missing, and nothing is guessed. Prefixes
(``model.diffusion_model.``, ``first_stage_model.``) are the caller's.
"""

from __future__ import annotations

import re

__all__ = ["ldm_unet_name", "ldm_vae_name", "open_clip_name", "vae_attention_is_conv"]

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's micro-conditioning MLP
    "add_embedding.linear_2.": "label_emb.0.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_BLOCK = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)"
)
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)")


def _rename(rest: str, table: dict[str, str]) -> str:
    for ours, theirs in table.items():
        if rest.startswith(ours):
            return theirs + rest[len(ours) :]
    return rest


def ldm_unet_name(key: str, layers_per_block: int, up_attentions: set[int]) -> str:
    """The LDM name of U-Net parameter ``key`` (diffusers' name). ``layers_per_block``: resnets
    per down block (an up block has one more); ``up_attentions``: the up blocks with
    cross-attention (their upsampler sits one slot later)."""
    for ours, theirs in _UNET_TOP.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    n = layers_per_block + 1  # LDM slots per block (a down block's last holds the downsampler)
    if m := _MID.fullmatch(key):
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
        slot = 1 if kind == "attentions" else 2 * i
        return f"middle_block.{slot}.{_rename(rest, _UNET_RESNET) if kind == 'resnets' else rest}"
    m = _BLOCK.fullmatch(key)
    if m is None:
        return key
    side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down":
        if kind == "downsamplers":  # conv.weight → op.weight
            return f"input_blocks.{1 + b * n + layers_per_block}.0.op.{rest.removeprefix('conv.')}"
        part = 0 if kind == "resnets" else 1
        where = f"input_blocks.{1 + b * n + j}.{part}."
    else:
        if kind == "upsamplers":
            part = 2 if b in up_attentions else 1
            return f"output_blocks.{b * n + layers_per_block}.{part}.{rest}"
        part = 0 if kind == "resnets" else 1
        where = f"output_blocks.{b * n + j}.{part}."
    return where + (_rename(rest, _UNET_RESNET) if kind == "resnets" else rest)


_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}
_VAE_TOP = {"conv_norm_out.": "norm_out."}


def ldm_vae_name(key: str, num_blocks: int) -> str:
    """The LDM name of autoencoder parameter ``key`` (diffusers' name); ``num_blocks``: the
    number of resolution levels (LDM counts the decoder's levels bottom-up)."""
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    rest = _rename(rest, _VAE_TOP)
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", rest):
        kind, i, tail = m.groups()
        if kind == "attentions":
            return f"{side}.mid.attn_1.{_rename(tail, _VAE_ATTENTION)}"
        return f"{side}.mid.block_{int(i) + 1}.{_rename(tail, {'conv_shortcut.': 'nin_shortcut.'})}"
    if m := re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest
    ):
        direction, b, kind, j, tail = m.groups()
        level = int(b) if direction == "down" else num_blocks - 1 - int(b)
        stage = "down" if direction == "down" else "up"
        if kind == "resnets":
            tail = _rename(tail, {"conv_shortcut.": "nin_shortcut."})
            return f"{side}.{stage}.{level}.block.{j}.{tail}"
        return f"{side}.{stage}.{level}.{stage}sample.{tail}"
    return f"{side}.{rest}"


def vae_attention_is_conv(key: str) -> bool:
    """Whether ``key`` (ours) is a mid-block attention projection, a Linear in diffusers but a
    1×1 convolution in LDM files (same numbers, two trailing unit axes)."""
    return (
        ".mid_block.attentions." in key
        and key.endswith(".weight")
        and any(f".{p}." in key for p in ("to_q", "to_k", "to_v", "to_out"))
    )


_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def open_clip_name(key: str) -> str | tuple[str, int, int]:
    """The OpenCLIP name (SD 2.x's ``cond_stage_model.model.``, without that prefix) of a
    transformers ``CLIPTextModel`` parameter ``key``; the q, k and v projections are the first,
    second and third of three slices of the fused ``attn.in_proj_*``: ``(name, part, 3)``."""
    key = key.removeprefix("text_model.")
    if key in _OPEN_CLIP_TOP:
        return _OPEN_CLIP_TOP[key]
    if key.startswith("final_layer_norm."):
        return "ln_final." + key.removeprefix("final_layer_norm.")
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.*)", key)
    if m is None:
        return key
    i, rest = m.groups()
    if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
        return f"transformer.resblocks.{i}.attn.in_proj_{q.group(2)}", "qkv".index(q.group(1)), 3
    return f"transformer.resblocks.{i}.{_rename(rest, _OPEN_CLIP_LAYER)}"
