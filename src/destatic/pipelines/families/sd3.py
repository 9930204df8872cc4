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
from destatic.pipelines.families.base import Family, entry, register_family

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


SD3 = register_family(
    Family(
        name="sd3",
        description="SD3: MMDiT + CLIP-L/G (+ T5)",
        matches=_matches,
        text_encoder=_text_encoder,
        defaults={"steps": 20, "sampler": "dpmpp_2m", "guidance": 7.0},  # diffusers' guidance
    )
)
