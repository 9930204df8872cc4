"""The family registry: what kind of model a folder holds, and how to load and condition it.

A family declares, in one small file, everything the generic pipeline must not hard-code:

* ``matches(index)``: whether a folder's ``model_index.json`` is one of its models;
* ``text_encoder(folder, index, network)``: how its text encoder(s) load;
* ``defaults``: its generation defaults (steps, sampler, guidance) when the folder stores none;
* ``conditioning(network, embedding, context)``: the keyword inputs its denoiser takes
  (``context``: the prompts, which guidance branch, the image size — SDXL's micro-conditioning);
* ``process_for(process, latent_shape)``: the process its σ grid follows at a latent size (Flux's
  resolution-dependent shift; the folder's process unchanged for the others);
* ``latent_shape(...)``: the shape of its latents — ``(B, C, H, W)`` for images; a video family
  adds a frame axis ``(B, C, F, H, W)``, an audio family has ``(B, C, T)``;
* ``save_text_encoder(encoder, folder)`` and ``diffusers_pipeline``: how ``save`` writes its
  text encoder (the ``model_index.json`` entries it returns) and which diffusers pipeline class
  a saved folder is (None: a destatic folder);
* ``image_conditioning(pipe, request, inputs)``: for a network that reads the input image
  itself (Wan image→video), its extra keyword inputs (None: the image starts the sampling);
* for audio (``media = "audio"``): ``load_extras`` (components beyond network, autoencoder and
  text encoder: Stable Audio's ``projection_model``, AudioLDM's ``vocoder``), ``audio_span``
  (the request's ``seconds_start``/``seconds`` checked and filled: the span in seconds),
  ``audio_shape`` (the latents of that span), ``decode_audio`` (latents → waveforms) and
  ``sample_rate``.

The networks, the autoencoder and the scheduler load the same way for every family
(:func:`load_components`). Register a new family with :func:`register_family`; adding SDXL or a
video model is one file and one call, no edit of the pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from destatic.io import CheckpointError, read_json
from destatic.models.registry import load_component
from destatic.models.text import TextEmbedding, TextEncoder
from destatic.process import Process, Target
from destatic.process.schedulers import (
    process_from_scheduler_config,
    scheduler_sampling_defaults,
)

__all__ = [
    "FAMILIES",
    "Components",
    "ConditioningContext",
    "Family",
    "family_of",
    "load_components",
    "register_family",
    "save_text_tower",
    "write_text_towers",
]

NETWORK_FOLDERS = ("unet", "transformer")
#: The components every family's ``model_index.json`` must name (a class-conditional DiT has no
#: text encoder: :attr:`Family.required`).
REQUIRED = ("vae", "scheduler", "text_encoder")


@dataclass
class Components:
    """What a folder loads into: the parts of a :class:`~destatic.pipelines.Pipeline`."""

    network: nn.Module
    autoencoder: nn.Module | None
    text_encoder: TextEncoder
    process: Process
    target: str | Target
    defaults: dict = field(default_factory=dict)
    extras: dict[str, nn.Module] = field(default_factory=dict)  # e.g. "projection_model"


def _image_latents(
    batch: int, channels: int, width: int, height: int, factor: int, frames: int | None
) -> tuple[int, ...]:
    if frames is not None:
        raise ValueError("num_frames needs a video model; this model draws still images")
    return (batch, channels, height // factor, width // factor)


@dataclass(frozen=True)
class ConditioningContext:
    """What a family's conditioning may read besides the text embedding: the prompts encoded,
    whether they are the negative (unconditional) branch of guidance, the image size in pixels,
    the pipeline's text encoder (its settings, e.g. SDXL's) and, for audio, the span in seconds
    (Stable Audio's timing conditioning)."""

    prompts: tuple[str, ...]
    width: int
    height: int
    negative: bool = False
    text_encoder: TextEncoder | None = None
    seconds: tuple[float, float] | None = None  # audio: the span (start, end) asked for
    extras: Mapping[str, Any] = field(default_factory=dict)  # the pipeline's extra components


def _token_conditioning(
    network: nn.Module, embedding: TextEmbedding, context: ConditioningContext | None = None
) -> dict[str, Any]:
    """Cross-attention tokens, plus the pooled vector for networks that take it (a DiT's
    adaLN conditioning: ``network.takes_pooled``)."""
    cond = {"context": embedding.tokens}
    if getattr(network, "takes_pooled", False):
        cond["pooled"] = embedding.pooled
    return cond


def _fixed_length_span(pipe: Any, start: float, seconds: float | None) -> tuple[float, float]:
    """The span ``(start, end)`` in seconds of a model that makes latents of one length (its
    network's ``sample_size``): ``seconds`` None runs to the end; one line when the span does
    not fit."""
    longest = pipe.max_seconds
    end = longest if seconds is None else start + seconds
    if not (0 <= start < longest) or (seconds is not None and not seconds > 0):
        raise ValueError(
            f"seconds_start={start:g}, seconds={seconds}: need seconds_start ≥ 0 and seconds > 0"
        )
    if end > longest + 1e-6:
        raise ValueError(
            f"this model makes at most {longest:.3g} s of audio; asked for {start:g} … {end:g} s"
        )
    return start, min(end, longest)


def _fixed_length_latents(pipe: Any, batch: int, span: tuple[float, float]) -> tuple[int, ...]:
    """``(B, C, T)`` with T the network's ``sample_size``, whatever the span."""
    return (batch, pipe.latent_channels, int(pipe.network.config.sample_size))


def _autoencoder_waveforms(pipe: Any, latents: Any) -> Any:
    return pipe.autoencoder.waveforms_from_latents(latents)


def _autoencoder_rate(pipe: Any) -> int:
    return int(pipe.autoencoder.config.sampling_rate)


def _same_process(process: Process, latent_shape: tuple[int, ...]) -> Process:
    """The folder's process at every size (a static schedule)."""
    return process


def write_text_towers(folder: Path, towers: Sequence[tuple[str, Any, Any]]) -> dict[str, Any]:
    """Write each ``(suffix, model, tokenizer)`` of transformers as ``text_encoder{suffix}/``
    and ``tokenizer{suffix}/`` under ``folder`` (safetensors); their ``model_index.json``
    entries."""
    entries: dict[str, Any] = {}
    for suffix, model, tokenizer in towers:
        model.save_pretrained(folder / f"text_encoder{suffix}", safe_serialization=True)
        tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
        entries[f"text_encoder{suffix}"] = ["transformers", type(model).__name__]
        entries[f"tokenizer{suffix}"] = ["transformers", type(tokenizer).__name__]
    return entries


def save_text_tower(encoder: TextEncoder, folder: Path) -> dict[str, Any]:
    """The default :attr:`Family.save_text_encoder`: one transformers model and its tokenizer
    (``encoder.model``, ``encoder.tokenizer``: a CLIP or T5 encoder)."""
    model, tokenizer = getattr(encoder, "model", None), getattr(encoder, "tokenizer", None)
    if not hasattr(model, "save_pretrained") or not hasattr(tokenizer, "save_pretrained"):
        raise ValueError(f"saving a {type(encoder).__name__} text encoder is not supported")
    return write_text_towers(folder, [("", model, tokenizer)])


@dataclass(frozen=True)
class Family:
    """One kind of model folder (see the module docstring)."""

    name: str
    description: str
    matches: Callable[[Mapping[str, Any]], bool]
    text_encoder: Callable[[Path, Mapping[str, Any], nn.Module], TextEncoder]
    defaults: Mapping[str, Any]  # "steps", "sampler", "guidance"
    conditioning: Callable[[nn.Module, TextEmbedding, ConditioningContext], dict[str, Any]] = (
        _token_conditioning
    )
    latent_shape: Callable[..., tuple[int, ...]] = _image_latents
    media: str = "image"
    process_for: Callable[[Process, tuple[int, ...]], Process] = _same_process
    required: tuple[str, ...] = REQUIRED  # components model_index.json must name
    # writes the text encoder under a folder being saved; its model_index.json entries
    save_text_encoder: Callable[[TextEncoder, Path], dict[str, Any]] = save_text_tower
    diffusers_pipeline: str | None = None  # the diffusers class a saved folder is; None: ours
    # an image → video network that reads the input image itself (Wan I2V):
    # (pipeline, resolved request, inputs or None) → keyword inputs of both guidance branches;
    # None: the input image is the start (image → image) or a held frame
    image_conditioning: Callable[..., dict[str, Any]] | None = None
    # audio (module docstring): components beyond the three, the span asked for, its latent
    # shape, latents → waveforms (B, channels, samples) in [-1, 1], and the sample rate
    load_extras: Callable[[Path, Mapping[str, Any]], dict[str, nn.Module]] | None = None
    audio_span: Callable[..., tuple[float, float]] = _fixed_length_span
    audio_shape: Callable[..., tuple[int, ...]] = _fixed_length_latents
    decode_audio: Callable[..., Any] = _autoencoder_waveforms
    sample_rate: Callable[..., int] = _autoencoder_rate

    def load(self, folder: Path, index: Mapping[str, Any]) -> Components:
        """The components of ``folder`` (its ``model_index.json`` is ``index``)."""
        components = load_components(folder, index, self.text_encoder, self.required)
        if self.load_extras is not None:
            components.extras = self.load_extras(folder, index)
        return components


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to :data:`FAMILIES` (first match wins, in registration order)."""
    if family.name in FAMILIES:
        raise ValueError(f"a family named {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def family_of(folder: str | os.PathLike, index: Mapping[str, Any]) -> Family:
    """The registered family whose ``matches`` accepts ``index``; one line naming the
    supported families otherwise."""
    for family in FAMILIES.values():
        if family.matches(index):
            return family
    named = ", ".join(f"{k} ({f.description})" for k, f in FAMILIES.items())
    parts = ", ".join(k for k in index if not k.startswith("_")) or "no components"
    raise CheckpointError(
        f"{Path(folder) / 'model_index.json'} ({parts}{_looks_like(index)}) is no model family "
        f"destatic knows; supported: {named}"
    )


def _looks_like(index: Mapping[str, Any]) -> str:
    """A hint at what an unsupported folder is, from its class names and components."""
    name = str(index.get("_class_name") or "")
    return f"; a {name}" if name else ""


def entry(index: Mapping[str, Any], key: str) -> str | None:
    """The class name of component ``key`` in ``model_index.json`` (None when absent/null)."""
    value = index.get(key)
    if isinstance(value, (list, tuple)) and len(value) >= 2 and isinstance(value[1], str):
        return value[1]
    return None


def _stored_defaults(defaults: Any, where: Path) -> dict:
    """``destatic_defaults`` of ``model_index.json``, checked: positive integer steps, a known
    sampler and grid, a finite guidance ≥ 0, ``guidance_range`` as [low, high]."""
    from destatic.sampling import GRIDS, SAMPLERS

    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{where}: destatic_defaults.{key} must be {want}")

    if not isinstance(defaults, dict):
        raise CheckpointError(f"{where}: destatic_defaults must be an object")
    number = (int, float)
    checks = {
        "steps": (lambda v: type(v) is int and 1 <= v <= 10_000, "an integer 1 … 10000"),
        "sampler": (lambda v: v in SAMPLERS, f"one of {', '.join(sorted(SAMPLERS))}"),
        "grid": (lambda v: v in GRIDS, f"one of {', '.join(GRIDS)}"),
        "guidance": (
            lambda v: isinstance(v, number) and not isinstance(v, bool) and 0 <= v < 1e3,
            "a number ≥ 0",
        ),
        "guidance_range": (
            lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(x, number) for x in v),
            "[low, high]",
        ),
    }
    for key, value in defaults.items():
        ok, want = checks.get(key, (lambda v: True, ""))
        if not ok(value):
            raise bad(key, want)
    return dict(defaults)


def load_components(
    folder: Path,
    index: Mapping[str, Any],
    text_encoder: Callable[[Path, Mapping[str, Any], nn.Module], TextEncoder],
    required: tuple[str, ...] = REQUIRED,
) -> Components:
    """The network (``unet/`` or ``transformer/``), the autoencoder (``vae/``; ``null`` for a
    pixel-space model), the scheduler config as our process and target, and the stored
    generation defaults; the text encoder comes from the family's own loader.

    A distilled model keeps two more keys in ``model_index.json``: ``destatic_defaults`` (its
    generation defaults, e.g. ``{"sampler": "lcm", "steps": 4, "guidance": 3.0,
    "guidance_range": [1, 6]}``) and ``destatic_consistency`` (``{"sigma_data": …, "scale":
    …}``: the network is a consistency function over the scheduler's target). A few-step
    scheduler class (LCM, TCD) fills the defaults the folder does not store
    (:func:`~destatic.process.schedulers.scheduler_sampling_defaults`)."""
    where = folder / "model_index.json"
    network_key = next((k for k in NETWORK_FOLDERS if k in index), None)
    if network_key is None:
        raise CheckpointError(f"{where} names no 'unet' or 'transformer'")
    for key in required:
        if key not in index:
            raise CheckpointError(f"{where} names no {key!r} component")
    network = load_component(folder / network_key)
    autoencoder = None if entry(index, "vae") is None else load_component(folder / "vae")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if not scheduler.exists():
        raise CheckpointError(f"{scheduler} is missing: a pipeline folder needs its scheduler")
    scheduler_config = read_json(scheduler)
    process, target = process_from_scheduler_config(scheduler_config)
    consistency = index.get("destatic_consistency")
    if consistency is not None:
        from destatic.process import ConsistencyTarget

        try:
            target = ConsistencyTarget(target, **consistency)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: destatic_consistency is invalid ({e})") from e
    defaults = _stored_defaults(index.get("destatic_defaults", {}), where)
    embedded = getattr(network.config, "time_cond_proj_dim", None) is not None
    defaults = {**scheduler_sampling_defaults(scheduler_config, embedded), **defaults}
    encoder = text_encoder(folder, index, network)
    return Components(network, autoencoder, encoder, process, target, dict(defaults))
