"""DiT folders saved by diffusers (Peebles & Xie 2023; facebook/DiT-XL-2-256, -512): a
class-conditional ``DiTTransformer2DModel`` (our :class:`~destatic.models.dit.DiT`; the hub's
folders still call it ``Transformer2DModel``), ``AutoencoderKL`` and a β-schedule scheduler
(``DDIMScheduler``, linear β, ε-prediction) — no text encoder.

**Prompts are classes.** ``model_index.json`` keeps ImageNet's ``id2label`` (diffusers'
``DiTPipeline`` reads it from there); the :class:`~destatic.models.text.ClassLabelEncoder` maps
a prompt to its class id — a name (``"golden retriever"``) or the id (``"207"``) — and an empty
prompt to the null class, so the unconditional branch of guidance is the empty negative prompt
as in every family. A non-empty negative prompt names a class to guide away from.

**Guidance, as DiTPipeline applies it.** The network predicts ε in its first ``in_channels``
output channels and the learned variance in the rest. DiTPipeline guides those ε channels,
``ε = ε_u + w·(ε_c − ε_u)``, on all latent channels (the original DiT code guided three of the
four; diffusers guides all), and drops the variance channels. Because x̂0 = x − σ·ε is affine in
ε, this is exactly destatic's guidance on the denoised x̂0, so the generic classifier-free
guidance wrapper reproduces it; the network returns the ε channels alone
(:meth:`DiT.forward <destatic.models.dit.DiT.forward>`). One difference: DiTPipeline skips
guidance for any scale ≤ 1, destatic runs w as given (w = 1: one pass, no guidance).

DiTPipeline draws its start latents at unit scale whatever the scheduler (it never multiplies
by ``init_noise_sigma``); destatic starts at σ_0 as for every model. For the VP schedulers
(DDIM, DPM-Solver) that is DiTPipeline's start up to the factor σ_0/√(1+σ_0²) (1 − 2·10⁻⁵ at
DiT's σ_max ≈ 157); for the k-style ones (Euler) it is the proper start DiTPipeline misses.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from destatic.io import CheckpointError
from destatic.models.dit import DiT
from destatic.models.text import ClassLabelEncoder, TextEmbedding
from destatic.pipelines.families.base import (
    ConditioningContext,
    Family,
    entry,
    register_family,
)

__all__ = ["DIT"]


def _matches(index: Mapping[str, Any]) -> bool:
    """A DiTPipeline folder (the hub's name the transformer ``Transformer2DModel``, a newer
    diffusers ``DiTTransformer2DModel``)."""
    return (
        index.get("_class_name") == "DiTPipeline"
        or entry(index, "transformer") == "DiTTransformer2DModel"
    )


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> ClassLabelEncoder:
    """The class names of ``model_index.json``'s ``id2label`` (none: class ids only)."""
    if not isinstance(network, DiT):
        raise CheckpointError(f"{folder}: a DiT pipeline needs a DiT transformer")
    id2label = index.get("id2label")
    if id2label is not None and not isinstance(id2label, Mapping):
        raise CheckpointError(f"{folder / 'model_index.json'}: id2label must be an object")
    try:
        return ClassLabelEncoder(id2label, network.config.num_classes)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'model_index.json'}: {e}") from e


def _conditioning(
    network: nn.Module, embedding: TextEmbedding, context: ConditioningContext
) -> dict[str, Any]:
    """The class ids the encoder found (``tokens`` [B, 1]) as the network's ``class_labels``."""
    return {"class_labels": embedding.tokens[:, 0]}


def _save_text_encoder(encoder: ClassLabelEncoder, folder: Path) -> dict[str, Any]:
    """No text encoder: ``model_index.json``'s ``id2label`` (each class's names, joined by
    commas as on the hub; a name two classes share stays with the later one, as it loads)."""
    if not isinstance(encoder, ClassLabelEncoder):
        raise ValueError(f"a DiT pipeline saves a ClassLabelEncoder, not {type(encoder).__name__}")
    names: dict[int, list[str]] = {}
    for name, ident in encoder.labels.items():
        names.setdefault(ident, []).append(name)
    return {"id2label": {str(i): ", ".join(names[i]) for i in sorted(names)}}


DIT = register_family(
    Family(
        name="dit",
        description="DiT: class-conditional transformer on ImageNet labels",
        matches=_matches,
        text_encoder=_text_encoder,
        conditioning=_conditioning,
        # DiTPipeline's guidance 4; steps and sampler as the other families
        defaults={"steps": 20, "sampler": "dpmpp_2m", "guidance": 4.0},
        required=("vae", "scheduler"),
        save_text_encoder=_save_text_encoder,
        diffusers_pipeline="DiTPipeline",
    )
)
