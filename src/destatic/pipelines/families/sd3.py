"""Stable Diffusion 3 folders saved by diffusers: ``SD3Transformer2DModel`` (our MMDiT),
CLIP-L + CLIP-G (+ optional T5) joined into one context (diffusers' ``encode_prompt``), and the
``FlowMatchEulerDiscreteScheduler`` config → rectified flow with its shift."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from destatic.io import CheckpointError
from destatic.models.mmdit import MMDiT
from destatic.models.text import SD3TextEncoder
from destatic.pipelines.families.base import (
    Family,
    entry,
    register_family,
    write_text_towers,
)

__all__ = ["SD3"]


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> SD3TextEncoder:
    where = folder / "model_index.json"
    for key in ("text_encoder", "text_encoder_2"):
        if entry(index, key) != "CLIPTextModelWithProjection":
            raise CheckpointError(
                f"{where}: SD3 {key} must be CLIPTextModelWithProjection, got {entry(index, key)!r}"
            )
    t5 = entry(index, "text_encoder_3")
    if t5 not in (None, "T5EncoderModel"):
        raise CheckpointError(f"{where}: SD3 text_encoder_3 must be T5EncoderModel or null")
    if t5 is None and (folder / "text_encoder_3").is_dir():
        raise CheckpointError(f"{folder}: text_encoder_3/ exists but model_index.json names none")
    if not isinstance(network, MMDiT):
        raise CheckpointError(f"{folder}: an SD3 pipeline needs an SD3Transformer2DModel/MMDiT")
    return SD3TextEncoder.from_folders(
        folder,
        joint_attention_dim=network.config.joint_attention_dim,
        max_sequence_length=int(index.get("destatic_max_sequence_length", 256)),
    )


def _matches(index: Mapping[str, Any]) -> bool:
    """An SD3 transformer (diffusers' or ours) with the CLIP pair (and maybe T5); the text
    encoders are checked when they load."""
    transformer = entry(index, "transformer") in ("SD3Transformer2DModel", "MMDiT")
    return transformer and ("text_encoder_2" in index or "text_encoder_3" in index)


def _save_text_encoder(encoder: SD3TextEncoder, folder: Path) -> dict[str, Any]:
    """CLIP-L, CLIP-G and T5 (or null) with their tokenizers; a T5 length other than 256."""
    if not isinstance(encoder, SD3TextEncoder):
        raise ValueError(f"an SD3 pipeline saves an SD3TextEncoder, not {type(encoder).__name__}")
    if encoder.clip_skip:
        raise ValueError("saving an SD3TextEncoder with clip_skip > 0 is not supported")
    towers = [("", encoder.clip_l.model, encoder.clip_l.tokenizer)]
    towers.append(("_2", encoder.clip_g.model, encoder.clip_g.tokenizer))
    entries: dict[str, Any] = {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    if encoder.t5 is not None:
        towers.append(("_3", encoder.t5, encoder.t5_tokenizer))
    if encoder.max_sequence_length != 256:
        entries["destatic_max_sequence_length"] = encoder.max_sequence_length
    return {**entries, **write_text_towers(folder, towers)}


SD3 = register_family(
    Family(
        name="sd3",
        description="SD3: MMDiT + CLIP-L/G (+ T5)",
        matches=_matches,
        text_encoder=_text_encoder,
        defaults={"steps": 20, "sampler": "dpmpp_2m", "guidance": 7.0},  # diffusers' guidance
        save_text_encoder=_save_text_encoder,
    )
)
