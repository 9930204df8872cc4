"""PixArt-α folders saved by diffusers (Chen et al. 2023; PixArt-alpha/PixArt-XL-2-1024-MS,
-512x512): ``PixArtTransformer2DModel`` (our :class:`~destatic.models.pixart.PixArt`; the hub's
folders call it ``Transformer2DModel``), one T5 encoder
(:class:`~destatic.models.text.T5TextEncoder`: 120 tokens and their padding mask),
``AutoencoderKL`` and a DPM-Solver scheduler on the linear β schedule, ε-prediction.

Conditioning, as diffusers' ``PixArtAlphaPipeline`` builds it: the T5 tokens with their mask
(the negative prompt, "" by default, encoded the same way), and for the 1024-px model
(``sample_size`` 128) the micro-conditions ``resolution`` = (height, width) of the image in
pixels and ``aspect_ratio`` = height / width. Guidance is plain classifier-free guidance on ε
(the learned-variance channels are dropped by the network), so destatic's guidance on x̂0 is
the same.

Two differences from ``PixArtAlphaPipeline``'s defaults: destatic draws the size asked for
(diffusers snaps it to the nearest trained aspect-ratio bin and resizes the image back:
``use_resolution_binning``), and encodes prompts as given (diffusers' ``clean_caption`` rewrites
them when bs4 and ftfy are installed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.io import CheckpointError, read_json
from destatic.models.pixart import PixArt
from destatic.models.text import T5TextEncoder, TextEmbedding
from destatic.pipelines.families.base import (
    ConditioningContext,
    Family,
    entry,
    register_family,
)

__all__ = ["PIXART", "micro_conditions"]


def _matches(index: Mapping[str, Any]) -> bool:
    """A PixArtAlphaPipeline folder, or a PixArt transformer on T5 (not PixArt-Σ's pipeline)."""
    if index.get("_class_name") == "PixArtAlphaPipeline":
        return True
    pixart = entry(index, "transformer") == "PixArtTransformer2DModel"
    return pixart and index.get("_class_name") != "PixArtSigmaPipeline"


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> T5TextEncoder:
    where = folder / "model_index.json"
    found = entry(index, "text_encoder")
    if found != "T5EncoderModel":
        raise CheckpointError(f"{where}: PixArt text_encoder must be T5EncoderModel, got {found!r}")
    if not isinstance(network, PixArt):
        raise CheckpointError(f"{folder}: a PixArt pipeline needs a PixArtTransformer2DModel")
    config = folder / "text_encoder" / "config.json"
    width = read_json(config).get("d_model") if config.is_file() else None
    if width != network.config.caption_channels:
        raise CheckpointError(
            f"{folder}: transformer caption_channels={network.config.caption_channels} differs "
            f"from the T5 encoder's d_model ({width})"
        )
    return T5TextEncoder.from_folders(folder)


def micro_conditions(context: ConditioningContext) -> dict[str, torch.Tensor]:
    """The 1024-px model's ``added_cond`` of ``context``'s images: (height, width) in pixels
    [B, 2] and height / width [B, 1]."""
    batch = len(context.prompts)
    size = torch.tensor([[float(context.height), float(context.width)]] * batch)
    ratio = torch.tensor([[context.height / context.width]] * batch)
    return {"resolution": size, "aspect_ratio": ratio}


def _conditioning(
    network: nn.Module, embedding: TextEmbedding, context: ConditioningContext
) -> dict[str, Any]:
    """T5 tokens and their mask; the micro-conditions where the network reads them."""
    cond: dict[str, Any] = {"context": embedding.tokens, "context_mask": embedding.mask}
    if network.config.use_additional_conditions:
        cond["added_cond"] = micro_conditions(context)
    return cond


PIXART = register_family(
    Family(
        name="pixart-alpha",
        description="PixArt-α: PixArt transformer + T5",
        matches=_matches,
        text_encoder=_text_encoder,
        conditioning=_conditioning,
        # PixArtAlphaPipeline's defaults: 20 steps of DPM-Solver++ 2M, guidance 4.5
        defaults={"steps": 20, "sampler": "dpmpp_2m", "guidance": 4.5},
    )
)
