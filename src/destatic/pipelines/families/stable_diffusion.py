"""Stable Diffusion 1.x / 2.x folders saved by diffusers: ``UNet2DConditionModel``,
``AutoencoderKL``, one ``CLIPTextModel`` + ``CLIPTokenizer`` and the scheduler config (mapped
onto our process and target: ε or v prediction on the scaled-linear VP schedule). Inpainting
U-Nets (9 input channels) and LCM-distilled U-Nets load the same way."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from destatic.models.text import CLIPTextEncoder
from destatic.pipelines.families.base import Family, entry, register_family

__all__ = ["STABLE_DIFFUSION"]

_CLIP = ("CLIPTextModel", "CLIPTextModelWithProjection")


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> CLIPTextEncoder:
    return CLIPTextEncoder.from_folders(folder / "text_encoder", folder / "tokenizer")


def _matches(index: Mapping[str, Any]) -> bool:
    """A U-Net and one CLIP text encoder (two, with a UNet, is SDXL; a U-Net with motion
    modules is AnimateDiff: not this family)."""
    one_clip = entry(index, "text_encoder") in _CLIP and "text_encoder_2" not in index
    return "unet" in index and one_clip and entry(index, "unet") != "UNetMotionModel"


STABLE_DIFFUSION = register_family(
    Family(
        name="stable-diffusion",
        description="SD 1.x/2.x: UNet + CLIP",
        matches=_matches,
        text_encoder=_text_encoder,
        # diffusers' StableDiffusionPipeline defaults: 50 steps in diffusers; 20 of DPM++ 2M
        # reach the same image (BENCHMARKS.md) — guidance as diffusers, 7.5
        defaults={"steps": 20, "sampler": "dpmpp_2m", "guidance": 7.5},
    )
)
