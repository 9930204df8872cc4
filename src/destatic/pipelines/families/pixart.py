"""PixArt-α and PixArt-Σ folders saved by diffusers (Chen et al. 2023; PixArt-alpha/
PixArt-XL-2-1024-MS, -512x512; Chen et al. 2024, "PixArt-Σ: Weak-to-Strong Training of
Diffusion Transformer for 4K Text-to-Image Generation": PixArt-alpha/PixArt-Sigma-XL-2-*):
``PixArtTransformer2DModel`` (our :class:`~destatic.models.pixart.PixArt`; the hub's α folders
call it ``Transformer2DModel``), one T5 encoder (:class:`~destatic.models.text.T5TextEncoder`:
its tokens and their padding mask), ``AutoencoderKL`` and a DPM-Solver scheduler on the linear β
schedule, ε-prediction.

**α and Σ are one network and one conditioning; they differ in their folders' settings**, so
one set of functions serves both families (``pixart-alpha``, ``pixart-sigma``):

=====================  ==========================  =======================================
                       PixArt-α                    PixArt-Σ
=====================  ==========================  =======================================
``_class_name``        ``PixArtAlphaPipeline``     ``PixArtSigmaPipeline``
T5 tokens              120                         300 (diffusers' ``max_sequence_length``)
micro-conditions       the 1024-px model's         none (its configs say
                       (``sample_size`` 128)       ``use_additional_conditions: false``)
autoencoder            SD's KL-f8 (0.18215)        SDXL's KL-f8 (``scaling_factor`` 0.13025)
=====================  ==========================  =======================================

Both read the position squeeze from ``interpolation_scale`` (default ``sample_size`` / 64: 2
at 1024 px, 4 for Σ's 2K model) and default to 20 steps, guidance 4.5 and a DPM-Solver++
scheduler. The micro-conditions, the squeeze and the VAE scale are component configs, so only
the T5 length is the family's (a saved folder that changed it keeps it in
``destatic_max_sequence_length``).

Conditioning, as diffusers' ``PixArtAlphaPipeline`` builds it: the T5 tokens with their mask
(the negative prompt, "" by default, encoded the same way), and for the 1024-px model
(``sample_size`` 128) the micro-conditions ``resolution`` = (height, width) of the image in
pixels and ``aspect_ratio`` = height / width. Guidance is plain classifier-free guidance on ε
(the learned-variance channels are dropped by the network), so destatic's guidance on x̂0 is
the same.

Two differences from the diffusers pipelines' defaults: destatic draws the size asked for
(diffusers snaps it to the nearest trained aspect-ratio bin and resizes the image back:
``use_resolution_binning``), and encodes prompts as given (diffusers' ``clean_caption`` rewrites
them when bs4 and ftfy are installed).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
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
    write_text_towers,
)

__all__ = ["PIXART", "PIXART_SIGMA", "micro_conditions"]

ALPHA, SIGMA = "PixArtAlphaPipeline", "PixArtSigmaPipeline"
#: T5 tokens of each pipeline (diffusers' ``max_sequence_length`` defaults)
TOKENS = {ALPHA: 120, SIGMA: 300}


def _matches(index: Mapping[str, Any]) -> bool:
    """A PixArtAlphaPipeline folder, or a PixArt transformer on T5 (not PixArt-Σ's pipeline)."""
    if index.get("_class_name") == ALPHA:
        return True
    pixart = entry(index, "transformer") == "PixArtTransformer2DModel"
    return pixart and index.get("_class_name") != SIGMA


def _token_count(index: Mapping[str, Any], where: Path, default: int) -> int:
    """``destatic_max_sequence_length`` of ``model_index.json``, else the pipeline's own."""
    length = index.get("destatic_max_sequence_length", default)
    if type(length) is not int or not 1 <= length <= 4096:
        raise CheckpointError(f"{where}: destatic_max_sequence_length must be an integer 1 … 4096")
    return length


def _text_encoder(
    folder: Path, index: Mapping[str, Any], network: nn.Module, *, tokens: int
) -> T5TextEncoder:
    """The T5 encoder over ``tokens`` tokens (or the folder's own count), checked against the
    transformer's ``caption_channels``."""
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
    return T5TextEncoder.from_folders(
        folder, max_sequence_length=_token_count(index, where, tokens)
    )


def _save_text_encoder(encoder: T5TextEncoder, folder: Path, *, tokens: int) -> dict[str, Any]:
    """T5 and its tokenizer; a token count other than the pipeline's ``tokens``."""
    if not isinstance(encoder, T5TextEncoder):
        raise ValueError(f"a PixArt pipeline saves a T5TextEncoder, not {type(encoder).__name__}")
    entries = write_text_towers(folder, [("", encoder.model, encoder.tokenizer)])
    if encoder.max_length != tokens:
        entries["destatic_max_sequence_length"] = encoder.max_length
    return entries


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


def _family(name: str, description: str, pipeline: str, matches) -> Family:
    """A PixArt family: ``pipeline``'s T5 length; everything else is shared."""
    return Family(
        name=name,
        description=description,
        matches=matches,
        text_encoder=partial(_text_encoder, tokens=TOKENS[pipeline]),
        conditioning=_conditioning,
        # both pipelines' defaults: 20 steps of DPM-Solver++ 2M, guidance 4.5
        defaults={"steps": 20, "sampler": "dpmpp_2m", "guidance": 4.5},
        save_text_encoder=partial(_save_text_encoder, tokens=TOKENS[pipeline]),
        diffusers_pipeline=pipeline,
    )


PIXART = register_family(
    _family("pixart-alpha", "PixArt-α: PixArt transformer + T5", ALPHA, _matches)
)
PIXART_SIGMA = register_family(
    _family(
        "pixart-sigma",
        "PixArt-Σ: PixArt transformer + T5 (300 tokens)",
        SIGMA,
        lambda index: index.get("_class_name") == SIGMA,
    )
)
