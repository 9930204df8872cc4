"""Stable Audio Open folders saved by diffusers (Evans et al. 2024, "Stable Audio Open";
stabilityai/stable-audio-open-1.0): ``StableAudioDiTModel`` (our
:class:`~destatic.models.stable_audio.StableAudioDiT`), one T5 encoder over the tokenizer's
``model_max_length`` tokens (:class:`~destatic.models.text.T5TextEncoder`), the text and timing
``projection_model`` (:class:`~destatic.models.stable_audio.StableAudioProjection`, an extra
component), ``AutoencoderOobleck`` (:class:`~destatic.models.oobleck.AutoencoderOobleck`) and
``CosineDPMSolverMultistepScheduler``.

The scheduler loads as :class:`~destatic.process.CosineEDM` with the EDM v-target
(:mod:`destatic.process.schedulers`): ``dpmpp_2m_sde`` on its exponential grid, with the
Brownian-tree noise of diffusers' scheduler seeded by the request's seed, so a seed gives
diffusers' waveform. Conditioning is :func:`~destatic.pipelines.families.audio.timing_conditioning`
(T5 tokens through the projection, zeroed at padding, and the seconds start/end tokens; an empty
negative prompt is the all-zero context), guidance 7 and 100 steps as ``StableAudioPipeline``.
The network always makes ``sample_size`` latent frames; the waveform is cut to the span asked
for (``seconds_start`` … ``seconds_start + seconds``, at most the model's length).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from destatic.io import CheckpointError, read_json
from destatic.models.stable_audio import StableAudioDiT
from destatic.models.text import T5TextEncoder
from destatic.pipelines.families.audio import load_projection, timing_conditioning
from destatic.pipelines.families.base import Family, entry, register_family

__all__ = ["STABLE_AUDIO"]

PIPELINE = "StableAudioPipeline"


def _matches(index: Mapping[str, Any]) -> bool:
    """A Stable Audio DiT on a T5 encoder (diffusers' StableAudioPipeline folder)."""
    return (
        entry(index, "transformer") == "StableAudioDiTModel"
        and entry(index, "text_encoder") == "T5EncoderModel"
    )


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> T5TextEncoder:
    """T5 padded to its tokenizer's ``model_max_length`` (as ``StableAudioPipeline``), its width
    checked against the projection model's ``text_encoder_dim``."""
    if not isinstance(network, StableAudioDiT):
        raise CheckpointError(f"{folder}: a Stable Audio pipeline needs a StableAudioDiTModel")
    config = folder / "text_encoder" / "config.json"
    width = read_json(config).get("d_model") if config.is_file() else None
    projection = folder / "projection_model" / "config.json"
    wanted = read_json(projection).get("text_encoder_dim") if projection.is_file() else width
    if width != wanted:
        raise CheckpointError(
            f"{folder}: projection_model text_encoder_dim={wanted} differs from the T5 "
            f"encoder's d_model ({width})"
        )
    encoder = T5TextEncoder.from_folders(folder)
    length = encoder.tokenizer.model_max_length
    if not isinstance(length, int) or not 1 <= length <= 4096:
        raise CheckpointError(
            f"{folder / 'tokenizer'}: model_max_length={length!r} must be 1 … 4096 (the T5 tokens "
            "the model was trained on)"
        )
    return T5TextEncoder(encoder.model, encoder.tokenizer, length)


STABLE_AUDIO = register_family(
    Family(
        name="stable-audio",
        description="Stable Audio: 1-D DiT + T5 + Oobleck, timing-conditioned",
        matches=_matches,
        text_encoder=_text_encoder,
        # StableAudioPipeline's: 100 steps, guidance 7; the scheduler gives sampler and grid
        defaults={"steps": 100, "sampler": "dpmpp_2m_sde", "guidance": 7.0},
        conditioning=timing_conditioning,
        media="audio",
        load_extras=load_projection,
        diffusers_pipeline=PIPELINE,
    )
)
