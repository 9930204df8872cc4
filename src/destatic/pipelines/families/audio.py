"""Audio on the σ-space core: timing-conditioned 1-D DiTs over latents ``(B, C, T)``.

Stable Audio's conditioning (Evans et al. 2024, "Fast Timing-Conditioned Latent Audio Diffusion"),
which both its family (:mod:`destatic.pipelines.families.stable_audio`) and destatic's own audio
models use: the text tokens pass the projection model's ``text_projection`` and are zeroed at
padding; the span asked for, ``seconds_start`` and ``seconds_end = start + seconds``, become one
token each through the projection model's number conditioners (learned Fourier features of the
seconds scaled to [0, 1]). The DiT cross-attends to ``context = [text; start; end]`` (tokens) and
takes ``global_context = [start ‖ end]`` (features) as its prepended global token. The network
always makes its full length (``sample_size`` latent frames); the timing tokens tell it where the
sound should end, and the pipeline cuts the waveform to the span.

The unconditional branch of guidance with an empty negative prompt is all zeros in ``context``
(timing tokens included) with the same ``global_context``, as diffusers' ``StableAudioPipeline``
and stable-audio-tools' classifier-free dropout have it; a negative prompt is encoded like a
prompt.

The family ``destatic-audio``: a :class:`~destatic.models.stable_audio.StableAudioDiT` trained here
on a :class:`~destatic.models.mel.MelCodec` (log-mel frames, Griffin–Lim decode), conditioned on
all-MiniLM-L6-v2 like the image models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.io import CheckpointError
from destatic.models.registry import load_component
from destatic.models.text import TextEmbedding
from destatic.pipelines.families.base import ConditioningContext, Family, entry, register_family
from destatic.pipelines.families.own import OWN

__all__ = ["AUDIO", "is_audio_network", "load_projection", "timing_conditioning", "timing_context"]

AUDIO_NETWORKS = ("StableAudioDiTModel",)


def is_audio_network(network: object) -> bool:
    """Whether ``network`` is a 1-D audio denoiser (a Stable Audio DiT)."""
    from destatic.models.stable_audio import StableAudioDiT

    return isinstance(network, StableAudioDiT)


def timing_context(
    projection: nn.Module,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    null: Sequence[bool] | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The DiT's ``context`` and ``global_context`` (module doc) from text ``tokens`` (B, L, D)
    with their padding ``mask`` (B, L) and the span's ``start`` and ``end`` seconds (B,);
    rows where ``null`` is true get the all-zero context of the unconditional branch."""
    weight = next(projection.parameters())
    text = projection(text_hidden_states=tokens.to(weight.device, weight.dtype))
    text = text.text_hidden_states * mask.to(weight.device, weight.dtype).unsqueeze(-1)
    timing = projection(start_seconds=start.to(weight.device), end_seconds=end.to(weight.device))
    first, last = timing.seconds_start_hidden_states, timing.seconds_end_hidden_states
    context = torch.cat([text, first, last], dim=1)
    if null is not None:
        keep = ~torch.as_tensor(null, dtype=torch.bool, device=context.device)
        context = context * keep.to(context.dtype)[:, None, None]
    return {"context": context, "global_context": torch.cat([first, last], dim=2)}


def timing_conditioning(
    network: nn.Module, embedding: TextEmbedding, context: ConditioningContext
) -> dict[str, Any]:
    """:attr:`Family.conditioning` of a timing-conditioned audio family: the projection model
    (``extras["projection_model"]``) over the text tokens and the span ``context.seconds``."""
    if context.seconds is None:
        raise ValueError("an audio model's conditioning needs the span in seconds")
    batch = embedding.tokens.shape[0]
    start = torch.full((batch,), float(context.seconds[0]))
    end = torch.full((batch,), float(context.seconds[1]))
    null = [context.negative and not p for p in context.prompts]
    projection = context.extras["projection_model"]
    return timing_context(projection, embedding.tokens, embedding.mask, start, end, null)


def load_projection(folder: Path, index: Mapping[str, Any]) -> dict[str, nn.Module]:
    """:attr:`Family.load_extras`: the ``projection_model/`` folder."""
    if "projection_model" not in index:
        raise CheckpointError(
            f"{folder / 'model_index.json'} names no 'projection_model' (the text and timing "
            "projection a Stable Audio DiT needs)"
        )
    return {"projection_model": load_component(folder / "projection_model")}


AUDIO = register_family(
    Family(
        name="destatic-audio",
        description="destatic's own audio DiT on MiniLM text (mel frames)",
        matches=lambda index: (
            entry(index, "transformer") in AUDIO_NETWORKS
            and entry(index, "text_encoder") == "MiniLMTextEncoder"
        ),
        text_encoder=OWN.text_encoder,
        save_text_encoder=OWN.save_text_encoder,
        defaults={"steps": 25, "sampler": "dpmpp_2m", "guidance": 3.0},
        conditioning=timing_conditioning,
        media="audio",
        load_extras=load_projection,
    )
)
