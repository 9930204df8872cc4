"""Flux's original names — Black Forest Labs' ``flux`` repository, as its ``.safetensors`` files,
ComfyUI and kohya's LoRAs use them (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.
linear1``, ``img_in``, ``time_in``, ``vector_in``, ``txt_in``, ``guidance_in``, ``final_layer``)
— against diffusers' ``FluxTransformer2DModel`` names, which :class:`~destatic.models.flux.Flux`
keeps. One table for every reader of BFL names: single-file checkpoints
(:mod:`destatic.pipelines.single_file.flux`) and LoRAs (:mod:`destatic.models.lora.bfl`).

Module paths map one to one except where BFL fuses what diffusers keeps apart (diffusers'
``convert_flux_transformer_checkpoint_to_diffusers`` read backwards):

* a double block's ``img_attn.qkv`` is ``attn.to_q``, ``to_k``, ``to_v`` stacked by output rows
  (``txt_attn.qkv``: ``attn.add_q_proj``, ``add_k_proj``, ``add_v_proj``), d rows each;
* a single block's ``linear1`` stacks ``attn.to_q``, ``to_k``, ``to_v`` (d rows each) and
  ``proj_mlp`` (the MLP width, 4d);
* the final layer's modulation ``final_layer.adaLN_modulation.1`` emits (shift, scale) where
  diffusers' ``norm_out.linear`` emits (scale, shift): the two output halves swap.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "DOUBLE",
    "DOUBLE_FUSED",
    "DOUBLE_NORMS",
    "FINAL_MODULATION",
    "SINGLE",
    "SINGLE_FUSED",
    "SINGLE_NORMS",
    "TOP",
    "fused_rows",
]

#: diffusers module path → BFL module path, outside the blocks.
TOP: dict[str, str] = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",  # dev only
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}

#: The same inside a double block (``transformer_blocks.N.`` ↔ ``double_blocks.N.``), for the
#: layers BFL does not fuse.
DOUBLE: dict[str, str] = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}

#: The same inside a single block (``single_transformer_blocks.N.`` ↔ ``single_blocks.N.``).
SINGLE: dict[str, str] = {"norm.linear": "modulation.lin", "proj_out": "linear2"}

#: The q/k RMS-norm scales (parameters, not layers a LoRA adapts), diffusers → BFL.
DOUBLE_NORMS: dict[str, str] = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
SINGLE_NORMS: dict[str, str] = {
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}

#: BFL's fused layer in a double block → the diffusers layers stacked in it, in row order.
DOUBLE_FUSED: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
#: The same in a single block: widths d, d, d and the MLP's (:func:`fused_rows`).
SINGLE_FUSED: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}

#: (diffusers, BFL) module of the final modulation, whose two output halves swap.
FINAL_MODULATION = ("norm_out.linear", "final_layer.adaLN_modulation.1")


def fused_rows(widths: Sequence[int]) -> list[slice]:
    """The output rows of each stacked layer of a fused one, from their widths in order:
    ``[d, d, d, mlp]`` → ``[0:d], [d:2d], [2d:3d], [3d:3d+mlp]``."""
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return [slice(s, s + w) for s, w in zip(starts, widths, strict=True)]
