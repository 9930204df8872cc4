"""The runtime adapter: peft's LoRA layers on a destatic model, added, scaled and removed.

The layers themselves are peft's (``LoraConfig`` + ``inject_adapter_in_model``); this module
chooses the targets, names adapters, sets their scales and removes them again. ``B`` starts at
zero, so a fresh adapter (:func:`add_lora`) changes nothing. For a convolution ``A`` is a
convolution with the layer's kernel into ``r`` channels and ``B`` a 1×1 one.

A model carries a registry of its adapters (their scales in load order, which ones train, where
each came from); every change is pushed from it into the peft layers, which run the adapters
with a non-zero scale and, with none, the original layer alone. :func:`unload_lora` puts the
original modules back.

An adapter read from a file comes in through :func:`attach`, its weights already keyed by the
model's own module paths (:mod:`~destatic.models.lora.translate` puts them there).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: Attention projections and feed-forward projections of the U-Net, MMDiT and ControlNet
#: (module-name suffixes, as peft matches ``target_modules``).
DEFAULT_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


class LoraError(ValueError):
    """A LoRA file or adapter that cannot be used here; the message says why."""


@dataclass
class LoraSpec:
    """A new adapter: rank ``r``, ``alpha`` (None = rank, i.e. α/r = 1), target module-name
    suffixes, dropout on the adapter's input."""

    rank: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LoraError(f"LoRA rank must be ≥ 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise LoraError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        self.targets = tuple(self.targets)
        if not self.targets:
            raise LoraError("LoRA targets must name at least one module")


@dataclass
class LoraWeights:
    """One adapted layer of a file, normalised: ``down`` = A [r, in(, k, k)], ``up`` = B
    [out, r(, 1, 1)], and alpha (the layer's delta is ``scale·alpha/r·up@down``)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class _Registry:
    """What destatic keeps on a model about its adapters (insertion order = load order)."""

    scales: dict[str, float] = field(default_factory=dict)
    trainable: set[str] = field(default_factory=set)
    sources: dict[str, str] = field(default_factory=dict)


_ATTR = "_destatic_lora"


def _registry(model: nn.Module) -> _Registry:
    reg = model.__dict__.get(_ATTR)
    if reg is None:
        reg = _Registry()
        model.__dict__[_ATTR] = reg
    return reg


def tuner_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """(module path, peft layer) of every adapted layer of ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def model_prefix(model: nn.Module) -> str:
    """The key prefix of a model's adapters in files: diffusers' component name."""
    from destatic.models.controlnet import ControlNet
    from destatic.models.flux import Flux
    from destatic.models.mmdit import MMDiT

    if isinstance(model, ControlNet):
        return "controlnet"
    if isinstance(model, MMDiT | Flux):
        return "transformer"
    return "unet"


def unfuse(model: nn.Module) -> None:
    """LoRA needs the separate q/k/v layers diffusers' files name: split fused projections
    (:mod:`destatic.models.speedups`) back; exact, the weights are the same."""
    if any(getattr(m, "fused", False) for m in model.modules()):
        from destatic.models.speedups import unfuse_projections

        unfuse_projections(model)


def adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Module path → Linear/Conv2d layer (or peft layer wrapping one) that LoRA can adapt."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, BaseTunerLayer):
            out[name] = module
            inside.append(name)
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and name:
            out[name] = module
    return out


def base_layer(module: nn.Module) -> nn.Module:
    """The original layer inside a peft layer (a plain layer is its own)."""
    get = getattr(module, "get_base_layer", None)
    return get() if get is not None else module


# ----------------------------------------------------------------------------------------------
# Adding, scaling, removing
# ----------------------------------------------------------------------------------------------


def _inject(
    model: nn.Module,
    name: str,
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    dropout: float = 0.0,
) -> None:
    """peft layers for adapter ``name`` on the module paths in ``ranks`` (exact paths)."""
    from peft import LoraConfig, inject_adapter_in_model

    if name in lora_scales(model):
        raise LoraError(f"an adapter named {name!r} is already loaded; unload it or pick a name")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # exact paths, anchored: peft full-matches a string of targets, and finds a pattern
        # key anywhere after a dot, so ``proj_out`` alone would also take
        # ``single_transformer_blocks.0.proj_out`` (Flux)
        target_modules="|".join(re.escape(p) for p in sorted(ranks)),
        rank_pattern={_anchored(p): r for p, r in ranks.items() if r != rank},
        alpha_pattern={_anchored(p): a for p, a in alphas.items() if a != alpha},
    )
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    with warnings.catch_warnings():  # a second adapter on one model is what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)
    for n, p in model.named_parameters():  # peft freezes the base: leave its flags as they were
        key = n.replace(".base_layer.", ".")
        if ".lora_" not in n and key in requires:
            p.requires_grad_(requires[key])


def _anchored(path: str) -> str:
    """A peft rank/alpha pattern that matches module ``path`` and no longer path ending in it
    (peft tries ``(.*\\.)?(pattern)$``; ``^`` fails unless nothing came before)."""
    return "^" + re.escape(path)


def _sync(model: nn.Module) -> None:
    """Push the registry (scales, which adapters run, which train) into every peft layer."""
    reg = _registry(model)
    for _, layer in tuner_layers(model):
        present = [n for n in reg.scales if n in layer.lora_A]
        for n in present:
            layer.set_scale(n, reg.scales[n])
        active = [n for n in present if reg.scales[n] != 0]
        if active:
            layer.enable_adapters(True)
            layer.set_adapter(active, inference_mode=True)
        else:
            layer.enable_adapters(False)  # the original layer alone: bit-identical
        for n in present:
            train = n in reg.trainable
            layer.lora_A[n].requires_grad_(train)
            layer.lora_B[n].requires_grad_(train)


def add_lora(
    model: nn.Module,
    spec: LoraSpec | None = None,
    *,
    name: str = "default",
    trainable: bool = True,
) -> list[str]:
    """Add a fresh adapter (B = 0: the model is unchanged) on every module whose name ends with
    one of ``spec.targets``; returns the adapted module paths. Fused projections are split first.
    """
    spec = spec or LoraSpec()
    unfuse(model)
    layers = adaptable(model)
    paths = [
        p
        for p in layers
        if any(p == t or p.endswith("." + t) for t in spec.targets)
        and isinstance(base_layer(layers[p]), (nn.Linear, nn.Conv2d))
    ]
    if not paths:
        raise LoraError(
            f"no module of {type(model).__name__} ends with any of the LoRA targets "
            f"{list(spec.targets)}"
        )
    alpha = float(spec.alpha if spec.alpha is not None else spec.rank)
    _inject(model, name, dict.fromkeys(paths, spec.rank), dict.fromkeys(paths, alpha), spec.dropout)
    reg = _registry(model)
    reg.scales[name] = 1.0
    if trainable:
        reg.trainable.add(name)
    _sync(model)
    return paths


def attach(
    model: nn.Module,
    name: str,
    weights: Mapping[str, LoraWeights],
    *,
    scale: float = 1.0,
    source: str | None = None,
) -> None:
    """Add adapter ``name`` holding ``weights`` (module path → :class:`LoraWeights`, the paths
    of the unfused model) at ``scale``, frozen; ``source`` is where it came from."""
    from peft import set_peft_model_state_dict

    _inject(
        model,
        name,
        {p: w.rank for p, w in weights.items()},
        {p: w.alpha for p, w in weights.items()},
    )
    state = {}
    for path, w in weights.items():
        state[f"{path}.lora_A.weight"] = w.down
        state[f"{path}.lora_B.weight"] = w.up
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        if name in lora_scales(model):
            unload_lora(model, name)
        raise LoraError(
            f"LoRA weights did not load: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    reg = _registry(model)
    reg.scales[name] = 1.0
    if source is not None:
        reg.sources[name] = source
    set_lora_scale(model, name, scale)


def lora_scales(model: nn.Module) -> dict[str, float]:
    """Loaded adapters and their scales, in load order."""
    reg = model.__dict__.get(_ATTR)
    return dict(reg.scales) if reg is not None else {}


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Scale adapter ``name`` (0 = off, exactly the model without it)."""
    reg = _registry(model)
    if name not in reg.scales:
        raise LoraError(f"no adapter named {name!r}; loaded: {', '.join(reg.scales) or 'none'}")
    if not isinstance(scale, int | float) or scale != scale:
        raise LoraError(f"LoRA scale must be a number, got {scale!r}")
    reg.scales[name] = float(scale)
    _sync(model)


def unload_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove adapter ``name`` (None: all of them). With none left, every peft layer is replaced
    by the original module, so the model is exactly what it was before any adapter."""
    reg = _registry(model)
    if name is not None and name not in reg.scales:
        raise LoraError(f"no adapter named {name!r}; loaded: {', '.join(reg.scales) or 'none'}")
    names = list(reg.scales) if name is None else [name]
    for n in names:
        with warnings.catch_warnings():  # peft's note that another adapter becomes active
            warnings.simplefilter("ignore", UserWarning)
            for _, layer in tuner_layers(model):
                if n in layer.lora_A:
                    layer.delete_adapter(n)
        reg.scales.pop(n)
        reg.trainable.discard(n)
        reg.sources.pop(n, None)
        peft_config = getattr(model, "peft_config", None)
        if isinstance(peft_config, dict):
            peft_config.pop(n, None)
    if reg.scales:
        _sync(model)
        return
    for path, layer in list(tuner_layers(model)):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.get_base_layer())
    if "peft_config" in model.__dict__:
        del model.__dict__["peft_config"]
    model.__dict__.pop(_ATTR, None)
