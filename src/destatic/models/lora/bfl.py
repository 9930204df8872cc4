"""Flux LoRAs in Black Forest Labs' layout (kohya's ``lora_unet_double_blocks_0_img_attn_qkv``,
ComfyUI's ``diffusion_model.double_blocks.0.img_attn.qkv``), on destatic's :class:`Flux`.

BFL's transformer fuses layers that diffusers (and :class:`~destatic.models.flux.Flux`) keeps
apart (the names: :mod:`destatic.models.flux_keys`): a double block's ``img_attn.qkv`` is
``attn.to_q``, ``to_k``, ``to_v`` stacked by output rows, a single block's ``linear1`` is
``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``. A LoRA on a fused layer ``W = [W_1; …; W_n]``
changes it by ``(α/r)·B·A`` with ``B = [B_1; …; B_n]`` split the same way, so piece ``i`` gets
the delta ``(α/r)·B_i·A``: the same ``A`` and α, and its rows of ``B``. Exact, whatever the rank.

The final layer's modulation (``final_layer.adaLN_modulation.1``) emits (shift, scale) where
diffusers' ``norm_out.linear`` emits (scale, shift): the two halves of ``B`` swap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from destatic.models.flux_keys import (
    DOUBLE,
    DOUBLE_FUSED,
    FINAL_MODULATION,
    SINGLE,
    SINGLE_FUSED,
    TOP,
    fused_rows,
)
from destatic.models.lora.adapter import LoraError

__all__ = ["BflPiece", "bfl_layers", "bfl_stem"]

# Prefixes of BFL-layout keys: kohya's flat names, ComfyUI's and BFL's own dotted ones.
_PREFIXES = ("lora_unet_", "model.diffusion_model.", "diffusion_model.", "transformer.")


def _flat(table: dict[str, str]) -> dict[str, str]:
    """A diffusers → BFL table of :mod:`destatic.models.flux_keys` as BFL name (flat, ``_``
    for ``.``) → diffusers path, the way kohya's keys name layers."""
    return {bfl.replace(".", "_"): ours for ours, bfl in table.items()}


_OUTSIDE = _flat(TOP)  # outside the blocks
_DOUBLE = _flat(DOUBLE)  # inside double block i (``transformer_blocks.i.``), unfused layers only
_SINGLE = _flat(SINGLE)


@dataclass(frozen=True)
class BflPiece:
    """One diffusers layer of a BFL layer: its module ``path``, the ``rows`` of the fused
    output it computes (``None``: all), and whether its two output halves are swapped."""

    path: str
    rows: slice | None = None
    swap: bool = False

    def take(self, value: torch.Tensor, role: str, fused_rows: int, where: str) -> torch.Tensor:
        """This piece's share of a file tensor: ``up`` (B) by rows, ``down`` (A) and alpha whole."""
        if role != "up":
            return value
        if value.shape[0] != fused_rows:
            raise LoraError(
                f"{where}: lora_up has {value.shape[0]} output rows but the fused layer has "
                f"{fused_rows}; is this LoRA for another Flux model?"
            )
        if self.rows is not None:
            value = value[self.rows]
        if self.swap:
            half = value.shape[0] // 2
            value = torch.cat([value[half:], value[:half]])
        return value


def bfl_stem(stem: str) -> str:
    """A key's module part without its BFL/kohya prefix, with ``_`` for ``.``."""
    for prefix in _PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix) :]
            break
    return stem.replace(".", "_")


def _fused(block: nn.Module, at: str, paths: tuple[str, ...]) -> tuple[list[BflPiece], int]:
    """The pieces of a fused BFL layer of ``block`` (at path ``at``) stacking ``paths``, each
    with its output rows, and the fused layer's output rows."""
    rows = fused_rows([block.get_submodule(p).out_features for p in paths])
    return [BflPiece(at + p, r) for p, r in zip(paths, rows, strict=True)], rows[-1].stop


def bfl_layers(model: nn.Module) -> dict[str, tuple[list[BflPiece], int]]:
    """BFL layer name (flat) → (its diffusers pieces, its output rows) for a :class:`Flux`;
    ``{}`` for any other model."""
    from destatic.models.flux import Flux

    if not isinstance(model, Flux):
        return {}
    d = model.config.hidden_size
    out: dict[str, tuple[list[BflPiece], int]] = {}
    for name, path in _OUTSIDE.items():
        if name.startswith("guidance_in") and model.time_text_embed.guidance_embedder is None:
            continue
        out[name] = ([BflPiece(path)], model.get_submodule(path).out_features)
    ours, bfl = FINAL_MODULATION
    out[bfl.replace(".", "_")] = ([BflPiece(ours, swap=True)], 2 * d)
    blocks = (
        ("double", "transformer_blocks", _DOUBLE, DOUBLE_FUSED),
        ("single", "single_transformer_blocks", _SINGLE, SINGLE_FUSED),
    )
    for kind, stack, plain, fused_layers in blocks:
        for i, block in enumerate(model.get_submodule(stack)):
            at, name_at = f"{stack}.{i}.", f"{kind}_blocks_{i}_"
            for name, path in plain.items():
                layer = ([BflPiece(at + path)], block.get_submodule(path).out_features)
                out[name_at + name] = layer
            for fused, paths in fused_layers.items():
                out[name_at + fused.replace(".", "_")] = _fused(block, at, paths)
    return out
