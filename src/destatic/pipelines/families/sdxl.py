"""Stable Diffusion XL folders saved by diffusers (Podell et al. 2023, "SDXL: Improving Latent
Diffusion Models for High-Resolution Image Synthesis"): a micro-conditioned
``UNet2DConditionModel`` (``addition_embed_type="text_time"``), CLIP-L + CLIP-G
(:class:`~destatic.models.text.SDXLTextEncoder`), ``AutoencoderKL`` (``force_upcast``) and the
scheduler config on the scaled-linear VP schedule.

Micro-conditioning (§2.2): beside the text, the U-Net reads per image the ``time_ids``

    base:    (h_orig, w_orig, crop_top, crop_left, h_target, w_target)
    refiner: (h_orig, w_orig, crop_top, crop_left, aesthetic score)

with original = target = the image drawn and no crop, as diffusers' pipelines default them; the
refiner (``requires_aesthetics_score`` in ``model_index.json``, CLIP-G alone) scores 6.0 for the
prompt and 2.5 for the negative. ``force_zeros_for_empty_prompt`` (the base) makes an empty
negative prompt all zeros instead of the encoding of "" (diffusers' ``negative_prompt=None``).

SDXL-Turbo and SD-Turbo are these folders distilled for one step without guidance; their
folders carry nothing else that tells them apart, so draw them with ``--grid trailing
--guidance 0 --steps 1`` (README).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.io import CheckpointError
from destatic.models.text import SDXLTextEncoder, TextEmbedding
from destatic.models.unet import UNet2DCondition
from destatic.pipelines.families.base import (
    ConditioningContext,
    Family,
    entry,
    register_family,
    write_text_towers,
)

__all__ = ["SDXL", "time_ids"]


def _matches(index: Mapping[str, Any]) -> bool:
    """A U-Net with a ``text_encoder_2`` (the base: two CLIPs; the refiner: ``text_encoder``
    null); the encoders' classes are checked when they load."""
    return "unet" in index and "text_encoder_2" in index


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> SDXLTextEncoder:
    where = folder / "model_index.json"
    if entry(index, "text_encoder_2") != "CLIPTextModelWithProjection":
        raise CheckpointError(
            f"{where}: SDXL text_encoder_2 must be CLIPTextModelWithProjection (CLIP-G), "
            f"got {entry(index, 'text_encoder_2')!r}"
        )
    if entry(index, "text_encoder") not in (None, "CLIPTextModel"):
        raise CheckpointError(
            f"{where}: SDXL text_encoder must be CLIPTextModel (CLIP-L) or null (the refiner), "
            f"got {entry(index, 'text_encoder')!r}"
        )
    if entry(index, "text_encoder") is None and (folder / "text_encoder").is_dir():
        raise CheckpointError(f"{folder}: text_encoder/ exists but model_index.json names none")
    config = getattr(network, "config", None)
    if not isinstance(network, UNet2DCondition) or config.addition_embed_type != "text_time":
        raise CheckpointError(
            f"{folder}: an SDXL pipeline needs a UNet with addition_embed_type='text_time'"
        )
    encoder = SDXLTextEncoder.from_folders(
        folder,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
    )
    ids = 5 if encoder.requires_aesthetics_score else 6
    passed = encoder.pooled_dim + ids * config.addition_time_embed_dim
    if passed != config.projection_class_embeddings_input_dim:
        raise CheckpointError(
            f"{folder}: the UNet's add_embedding takes "
            f"{config.projection_class_embeddings_input_dim} inputs but {ids} time ids and "
            f"CLIP-G's pooled vector give {passed} (requires_aesthetics_score is "
            f"{encoder.requires_aesthetics_score})"
        )
    if encoder.dim != config.cross_attention_dim:
        raise CheckpointError(
            f"{folder}: the CLIP widths add up to {encoder.dim} but the UNet's "
            f"cross_attention_dim is {config.cross_attention_dim}"
        )
    return encoder


def time_ids(encoder: SDXLTextEncoder, context: ConditioningContext) -> torch.Tensor:
    """The micro-conditioning ``time_ids`` [B, 6] (base) or [B, 5] (refiner) of ``context``'s
    images (module docstring): original size = target size = (height, width), crop (0, 0)."""
    size = (float(context.height), float(context.width))
    if encoder.requires_aesthetics_score:
        negative = context.negative
        score = encoder.negative_aesthetic_score if negative else encoder.aesthetic_score
        row = (*size, 0.0, 0.0, score)
    else:
        row = (*size, 0.0, 0.0, *size)
    return torch.tensor([row] * len(context.prompts))


def _conditioning(
    network: nn.Module, embedding: TextEmbedding, context: ConditioningContext
) -> dict[str, Any]:
    """Cross-attention tokens and the U-Net's ``added_cond``: CLIP-G's pooled vector and the
    time ids; an empty negative prompt is zeros under ``force_zeros_for_empty_prompt``."""
    encoder = context.text_encoder
    if not isinstance(encoder, SDXLTextEncoder):
        raise TypeError("the SDXL family needs an SDXLTextEncoder")
    tokens, pooled = embedding.tokens, embedding.pooled
    if context.negative and encoder.force_zeros_for_empty_prompt:
        keep = torch.tensor([p != "" for p in context.prompts], device=tokens.device)
        tokens = torch.where(keep.view(-1, 1, 1), tokens, 0.0)
        pooled = torch.where(keep.view(-1, 1), pooled, 0.0)
    ids = time_ids(encoder, context)
    return {"context": tokens, "added_cond": {"text_embeds": pooled, "time_ids": ids}}


def _save_text_encoder(encoder: SDXLTextEncoder, folder: Path) -> dict[str, Any]:
    """CLIP-L (none: the refiner) and CLIP-G with their tokenizers, and the two flags."""
    if not isinstance(encoder, SDXLTextEncoder):
        raise ValueError(f"an SDXL pipeline saves an SDXLTextEncoder, not {type(encoder).__name__}")
    if encoder.clip_skip:
        raise ValueError("saving an SDXLTextEncoder with clip_skip > 0 is not supported")
    towers = [("_2", encoder.clip_g.model, encoder.clip_g.tokenizer)]
    nothing = {"text_encoder": [None, None], "tokenizer": [None, None]}
    if encoder.clip_l is not None:
        towers.insert(0, ("", encoder.clip_l.model, encoder.clip_l.tokenizer))
        nothing = {}
    return {
        **nothing,
        **write_text_towers(folder, towers),
        "force_zeros_for_empty_prompt": encoder.force_zeros_for_empty_prompt,
        "requires_aesthetics_score": encoder.requires_aesthetics_score,
    }


SDXL = register_family(
    Family(
        name="sdxl",
        description="SDXL: UNet + CLIP-L/G (refiner: CLIP-G)",
        matches=_matches,
        text_encoder=_text_encoder,
        conditioning=_conditioning,
        # diffusers' StableDiffusionXLPipeline guidance; steps and sampler as the other families
        defaults={"steps": 20, "sampler": "dpmpp_2m", "guidance": 5.0},
        save_text_encoder=_save_text_encoder,
    )
)
