"""Prompts of different lengths in one guided batch.

A CLIP encoder with A1111's long-prompt handling (:mod:`destatic.models.prompt_weights`) gives
a prompt ``77·k`` tokens, so a long prompt and a short negative prompt (or the reverse) differ in
length, while classifier-free guidance batches the two branches. As A1111 does, the shorter
branch is padded with chunks of the empty prompt's encoding.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from destatic.pipelines.base import PipelineBase
    from destatic.pipelines.stages import Conditioning

__all__ = ["same_token_count"]


def _uneven(cond: dict, uncond: dict) -> list[str]:
    """The keys whose tensors differ in length along the token axis (dim 1)."""
    return [
        k
        for k, v in cond.items()
        if isinstance(v, torch.Tensor)
        and isinstance(uncond.get(k), torch.Tensor)
        and v.ndim >= 2
        and v.shape[1] != uncond[k].shape[1]
    ]


def same_token_count(pipe: PipelineBase, c: Conditioning, width: int, height: int) -> Conditioning:
    """``c`` with the prompt's and the negative prompt's tokens of one length: the shorter
    padded with the empty prompt's chunks (unchanged when they already match)."""
    if c.uncond is None or not (keys := _uneven(c.cond, c.uncond)):
        return c
    batch = next(iter(c.cond[k] for k in keys)).shape[0]
    empty = pipe.conditioning([""] * batch, width=width, height=height)
    cond, uncond = dict(c.cond), dict(c.uncond)
    for k in keys:
        short, long = (cond, uncond) if cond[k].shape[1] < uncond[k].shape[1] else (uncond, cond)
        missing, chunk = long[k].shape[1] - short[k].shape[1], empty[k].shape[1]
        if missing % chunk:
            raise ValueError(
                f"cannot batch {k} of {short[k].shape[1]} and {long[k].shape[1]} tokens"
            )
        filler = empty[k].repeat(1, missing // chunk, *[1] * (empty[k].ndim - 2))
        short[k] = torch.cat([short[k], filler.to(short[k].device, short[k].dtype)], dim=1)
    return replace(c, cond=cond, uncond=uncond)
