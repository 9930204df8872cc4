"""Adapter files: ours, in diffusers' peft layout, written and read; loading one onto a model.

:func:`save_lora` writes an adapter as safetensors keyed ``unet.<module>.lora_A.weight`` /
``.lora_B.weight`` (``transformer.`` for an MMDiT, ``controlnet.`` for a ControlNet), the
layout diffusers' ``pipe.load_lora_weights`` reads. Rank, alpha, targets and what the caller
adds (the base model, say) are a JSON config beside the weights and in the safetensors header
(``destatic_lora``), next to diffusers' own ``lora_adapter_metadata``.

:func:`load_lora` reads a file or folder (:func:`read_lora_file`: safetensors only, never a
pickle), has its keys translated to the model's module paths
(:func:`~destatic.models.lora.translate.match_lora`, which also reads other tools' layouts)
and attaches the adapter.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.models.lora.adapter import (
    LoraError,
    attach,
    lora_scales,
    model_prefix,
    tuner_layers,
    unfuse,
)
from destatic.models.lora.translate import DIFFUSERS_HEADER_KEY, HEADER_KEY, match_lora

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default: its loaders find it
CONFIG_NAME = "lora_config.json"


def _alpha_rank(model: nn.Module, name: str) -> tuple[dict[str, int], dict[str, float]]:
    ranks, alphas = {}, {}
    for path, layer in tuner_layers(model):
        if name in layer.lora_A:
            ranks[path] = int(layer.r[name])
            alphas[path] = float(layer.lora_alpha[name])
    return ranks, alphas


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name`` in diffusers' peft layout: ``<prefix>.<module>.lora_A.weight`` → A,
    ``….lora_B.weight`` → B (float32, CPU)."""
    from peft import get_peft_model_state_dict

    if name not in lora_scales(model):
        raise LoraError(f"no adapter named {name!r}; loaded: {', '.join(lora_scales(model))}")
    prefix = model_prefix(model)
    state = get_peft_model_state_dict(model, adapter_name=name)
    return {f"{prefix}.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()}


def _config(model: nn.Module, name: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    ranks, alphas = _alpha_rank(model, name)
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "format": "destatic-lora/1",
        "model": type(model).__name__,
        "prefix": model_prefix(model),
        "rank": rank,
        "alpha": alpha,
        "targets": sorted(ranks),
        "rank_pattern": {p: r for p, r in ranks.items() if r != rank},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
        **extra,
    }


def save_lora(
    model: nn.Module,
    path: str | Path,
    name: str = "default",
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    **info: Any,
) -> Path:
    """Write adapter ``name`` as safetensors; returns the weights file.

    ``path`` ending in ``.safetensors``: that file and a ``.json`` beside it; otherwise a folder
    with ``pytorch_lora_weights.safetensors`` and ``lora_config.json``. The config (rank, alpha,
    targets, ``info`` such as the base model) is also in the safetensors header, and diffusers'
    ``lora_adapter_metadata`` is there too, so ``pipe.load_lora_weights`` reads the file.
    ``weights`` replaces the adapter's current values (e.g. EMA weights, same keys).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix == ".safetensors":
        file, config_file = path, path.with_suffix(".json")
    else:
        file, config_file = path / WEIGHTS_NAME, path / CONFIG_NAME
    state = adapter_state_dict(model, name)
    if weights is not None:
        missing = sorted(set(state) - set(weights))
        if missing:
            raise LoraError(f"weights lack {len(missing)} adapter tensors, e.g. {missing[0]}")
        state = {k: weights[k].detach().float().cpu().contiguous() for k in state}
    config = _config(model, name, info)
    prefix = config["prefix"]
    diffusers_meta = {
        f"{prefix}.r": config["rank"],
        f"{prefix}.lora_alpha": config["alpha"],
        f"{prefix}.target_modules": config["targets"],
        f"{prefix}.rank_pattern": {re.escape(p): r for p, r in config["rank_pattern"].items()},
        f"{prefix}.alpha_pattern": {re.escape(p): a for p, a in config["alpha_pattern"].items()},
    }
    file.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        HEADER_KEY: json.dumps(config, sort_keys=True),
        DIFFUSERS_HEADER_KEY: json.dumps(diffusers_meta, sort_keys=True),
    }
    save_file(state, str(file), metadata=metadata)
    config_file.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return file


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, header metadata with JSON values decoded) of a LoRA ``.safetensors`` file or of
    a folder holding one (``pytorch_lora_weights.safetensors`` first). Never unpickles."""
    from safetensors import safe_open

    from destatic.io import CheckpointError, load_safetensors

    path = Path(path)
    if path.is_dir():
        candidates = [path / WEIGHTS_NAME] if (path / WEIGHTS_NAME).is_file() else []
        candidates = candidates or sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise LoraError(f"{path}: expected one LoRA .safetensors file, found {found}")
        path = candidates[0]
    elif not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRA files are read from .safetensors only (no pickle)")
    try:
        tensors = load_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v) if k in (HEADER_KEY, DIFFUSERS_HEADER_KEY) else v
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def load_lora(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    name: str | None = None,
    scale: float = 1.0,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Load a LoRA (a file or folder, or a state dict in any supported layout) as adapter
    ``name`` (default: the file's stem, made unique) at ``scale``; returns the name."""
    if isinstance(source, Mapping):
        tensors, meta, label = dict(source), dict(metadata or {}), "lora"
    else:
        tensors, meta = read_lora_file(source)
        p = Path(source)
        label = p.parent.name if p.name == WEIGHTS_NAME else (p.stem if p.is_file() else p.name)
    unfuse(model)
    weights = match_lora(model, tensors, meta)
    if name is None:
        base = re.sub(r"[^A-Za-z0-9_]+", "_", label).strip("_") or "lora"
        name, k = base, 1
        while name in lora_scales(model):
            k += 1
            name = f"{base}_{k}"
    if "." in name:
        raise LoraError(f"adapter name {name!r} must not contain '.'")
    source_name = None if isinstance(source, Mapping) else str(source)
    attach(model, name, weights, scale=scale, source=source_name)
    return name
