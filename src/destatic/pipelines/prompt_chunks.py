"""Prompts of different lengths in one guided batch.

A CLIP encoder with A1111's long-prompt handling (:mod:`destatic.models.prompt_weights`) gives
a prompt ``77·k`` tokens, so a long prompt and a short negative prompt (or the reverse) differ in
length, while classifier-free guidance batches the two branches. As A1111 does, the shorter
branch is padded with chunks of the empty prompt's encoding — the family's encoding for that
branch, so SDXL's all-zero empty negative (``force_zeros_for_empty_prompt``) pads with zeros.

SD3's context is the CLIP chunks followed by T5's tokens (the text encoder's
``trailing_tokens``): the extra chunks go between the two, where a longer prompt's chunks are.
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
    after = int(getattr(pipe.text_encoder, "trailing_tokens", 0))
    cond, uncond = dict(c.cond), dict(c.uncond)
    for k in keys:
        negative = uncond[k].shape[1] < cond[k].shape[1]
        short, long = (uncond, cond) if negative else (cond, uncond)
        empty = pipe.conditioning([""] * batch, width=width, height=height, negative=negative)[k]
        missing, chunk = long[k].shape[1] - short[k].shape[1], empty.shape[1] - after
        if chunk < 1 or missing % chunk:
            raise ValueError(
                f"cannot batch {k} of {short[k].shape[1]} and {long[k].shape[1]} tokens"
            )
        filler = empty[:, :chunk].repeat(1, missing // chunk, *[1] * (empty.ndim - 2))
        at = short[k].shape[1] - after
        parts = [short[k][:, :at], filler.to(short[k].device, short[k].dtype), short[k][:, at:]]
        short[k] = torch.cat(parts, dim=1)
    return replace(c, cond=cond, uncond=uncond)
