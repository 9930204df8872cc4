"""Wan 2.1 text-to-video folders saved by diffusers (``WanPipeline``; Wan-AI/Wan2.1-T2V-1.3B-
Diffusers, -14B-Diffusers): ``WanTransformer3DModel`` (our :class:`~destatic.models.wan.
WanTransformer3DModel`), UMT5 tokens over 512 tokens with zeroed padding
(:class:`~destatic.models.wan_text.UMT5TextEncoder`), the causal video VAE
(:class:`~destatic.models.wan_vae.AutoencoderKLWan`: its per-channel ``latents_mean`` /
``latents_std`` are applied by its ``images_from_latents``, so the generic decode serves) and
``UniPCMultistepScheduler`` with ``use_flow_sigmas`` → rectified flow shifted by ``flow_shift``
with integer network timesteps (:mod:`destatic.process.flow_sigmas`); a folder whose scheduler
is ``FlowMatchEulerDiscreteScheduler`` runs as plain shifted rectified flow.

Latents are ``(B, 16, 1 + (F-1)/4, H/8, W/8)`` for F frames: diffusers' rule, F rounded down to
the nearest 4k + 1 (with a warning). F defaults to 81 as in diffusers (the network config's
``num_frames``); the default size is 480 × 480 (diffusers: 480 × 832). Defaults as
``WanPipeline``: 50 steps, guidance 5 (plain classifier-free guidance on the velocity, the
negative prompt "" unless given), the ``uni_pc`` sampler on the ``sgm_uniform`` grid, which on
the UniPC folder's process is diffusers' grid (``tests/test_pipeline_wan.py`` draws diffusers'
frames with the defaults alone). ``save`` writes a ``WanPipeline`` folder that diffusers loads
too.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from destatic.io import CheckpointError, read_json
from destatic.models.wan import WanTransformer3DModel
from destatic.models.wan_text import WAN_TOKENS, UMT5TextEncoder
from destatic.pipelines.families.base import Family, entry, register_family

__all__ = ["TEMPORAL_FACTOR", "WAN", "wan_latent_frames"]

#: frames per latent frame after the first (Wan 2.1's VAE)
TEMPORAL_FACTOR = 4


def _matches(index: Mapping[str, Any]) -> bool:
    return (
        index.get("_class_name") == "WanPipeline"
        or entry(index, "transformer") == "WanTransformer3DModel"
    )


def wan_latent_frames(frames: int) -> int:
    """Latent frames of a clip of ``frames`` frames: 1 + (F-1)/4, F first rounded down to
    4k + 1 as diffusers' WanPipeline does (with a warning)."""
    if type(frames) is not int or frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {frames!r}")
    if frames % TEMPORAL_FACTOR != 1:
        rounded = frames // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
        warnings.warn(
            f"num_frames - 1 must be a multiple of {TEMPORAL_FACTOR}; drawing {rounded} frames, "
            f"not {frames}",
            stacklevel=3,
        )
        frames = rounded
    return 1 + (frames - 1) // TEMPORAL_FACTOR


def _latents(
    batch: int, channels: int, width: int, height: int, factor: int, frames: int | None
) -> tuple[int, ...]:
    """``(B, C, 1 + (F-1)/4, H/f, W/f)``; F is filled from the network before this is asked."""
    if frames is None:
        raise ValueError("num_frames must be a positive integer, got None")
    return (batch, channels, wan_latent_frames(frames), height // factor, width // factor)


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> UMT5TextEncoder:
    """UMT5 over 512 tokens (or the folder's ``destatic_max_sequence_length``), checked
    against the transformer's ``text_dim``."""
    where = folder / "model_index.json"
    found = entry(index, "text_encoder")
    if found != "UMT5EncoderModel":
        raise CheckpointError(f"{where}: Wan text_encoder must be UMT5EncoderModel, got {found!r}")
    if not isinstance(network, WanTransformer3DModel):
        raise CheckpointError(f"{folder}: a Wan pipeline needs a WanTransformer3DModel")
    config = folder / "text_encoder" / "config.json"
    width = read_json(config).get("d_model") if config.is_file() else None
    if width != network.config.text_dim:
        raise CheckpointError(
            f"{folder}: transformer text_dim={network.config.text_dim} differs from the UMT5 "
            f"encoder's d_model ({width})"
        )
    length = index.get("destatic_max_sequence_length", WAN_TOKENS)
    if type(length) is not int or not 1 <= length <= 4096:
        raise CheckpointError(f"{where}: destatic_max_sequence_length must be an integer 1 … 4096")
    return UMT5TextEncoder.from_folders(folder, max_sequence_length=length)


WAN = register_family(
    Family(
        name="wan",
        description="Wan 2.1 text-to-video: Wan transformer + UMT5, causal video VAE",
        matches=_matches,
        text_encoder=_text_encoder,
        defaults={"steps": 50, "sampler": "uni_pc", "grid": "sgm_uniform", "guidance": 5.0},
        latent_shape=_latents,
        media="video",
        diffusers_pipeline="WanPipeline",
    )
)
