"""LoRA adapters on destatic models (U-Net, MMDiT, ControlNet), through peft.

LoRA (Hu et al. 2021) keeps a pretrained weight ``W`` frozen and learns a low-rank change:

    W' = W + s·(α/r)·B·A,      A: [r, in] (``lora_A``, kohya's ``lora_down``),
                               B: [out, r] (``lora_B``, kohya's ``lora_up``),

with rank ``r``, ``alpha`` α (α/r keeps the learning rate meaningful across ranks) and a
generation-time scale ``s``. ``B`` starts at zero, so a fresh adapter changes nothing. For a
convolution ``A`` is a convolution with the layer's kernel into ``r`` channels and ``B`` a 1×1
one. The layers themselves are peft's (``LoraConfig`` + ``inject_adapter_in_model``); this module
chooses the targets, names adapters, sets scales, reads and writes adapter files and removes
adapters again.

Adapters are never merged into the weights: a layer computes ``W·x + Σ s_k·(α_k/r_k)·B_k·A_k·x``
over the adapters with a non-zero scale, and with none it calls the original layer alone. So
scale 0 reproduces the base model bit for bit, and :func:`unload_lora` gives back the original
modules with their untouched weights.

Files (:func:`read_lora_file` + :func:`match_lora`, both used by :func:`load_lora`):

* ours and diffusers' peft layout: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``
  (``transformer.`` for an MMDiT, ``controlnet.`` for a ControlNet), with rank/alpha in the
  safetensors header (``lora_adapter_metadata``, as diffusers writes it) or ``<module>.alpha``;
* diffusers' older attention-processor layout: ``…attn1.processor.to_q_lora.down.weight``
  (``to_out_lora`` → ``to_out.0``) and ``…to_q.lora.down.weight`` (alpha = rank);
* kohya / A1111: ``lora_unet_<module with _ for .>.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha``. The underscored names are resolved against the model's own module names (never by
  guessing where the dots were), in diffusers' naming and in the original LDM naming
  (``input_blocks_4_1_…``, ``middle_block_1_…``, ``output_blocks_…``) of SD U-Nets. Text-encoder
  parts (``lora_te_…``, ``text_encoder.…``) are skipped with a warning.

A file with keys that fit no layer of the model is a :class:`LoraKeyError` listing them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterWeights",
    "LoraError",
    "LoraKeyError",
    "LoraSpec",
    "LoraWeights",
    "adapter_state_dict",
    "add_lora",
    "applied",
    "load_lora",
    "lora_scales",
    "match_lora",
    "model_prefix",
    "read_lora_file",
    "save_lora",
    "set_lora_scale",
    "unload_lora",
]

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
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default: its loaders find it
CONFIG_NAME = "lora_config.json"
_HEADER_KEY = "destatic_lora"
_DIFFUSERS_HEADER_KEY = "lora_adapter_metadata"
_SHOWN = 3  # unmatched keys listed in an error


class LoraError(ValueError):
    """A LoRA file or adapter that cannot be used here; the message says why."""


class LoraKeyError(LoraError):
    """LoRA keys that fit no layer of the model (the message lists them)."""


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


def _tuner_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def model_prefix(model: nn.Module) -> str:
    """The key prefix of a model's adapters in files: diffusers' component name."""
    from destatic.models.controlnet import ControlNet
    from destatic.models.mmdit import MMDiT

    if isinstance(model, ControlNet):
        return "controlnet"
    if isinstance(model, MMDiT):
        return "transformer"
    return "unet"


def _unfuse(model: nn.Module) -> None:
    """LoRA needs the separate q/k/v layers diffusers' files name: split fused projections
    (:mod:`destatic.models.speedups`) back; exact, the weights are the same."""
    if any(getattr(m, "fused", False) for m in model.modules()):
        from destatic.models.speedups import unfuse_projections

        unfuse_projections(model)


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
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


def _base(module: nn.Module) -> nn.Module:
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
        target_modules=sorted(ranks),
        # exact paths: peft matches these patterns as regexes against the module's name
        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != alpha},
    )
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    with warnings.catch_warnings():  # a second adapter on one model is what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)
    for n, p in model.named_parameters():  # peft freezes the base: leave its flags as they were
        key = n.replace(".base_layer.", ".")
        if ".lora_" not in n and key in requires:
            p.requires_grad_(requires[key])


def _sync(model: nn.Module) -> None:
    """Push the registry (scales, which adapters run, which train) into every peft layer."""
    reg = _registry(model)
    for _, layer in _tuner_layers(model):
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
    _unfuse(model)
    layers = _adaptable(model)
    paths = [
        p
        for p in layers
        if any(p == t or p.endswith("." + t) for t in spec.targets)
        and isinstance(_base(layers[p]), (nn.Linear, nn.Conv2d))
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
            for _, layer in _tuner_layers(model):
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
    for path, layer in list(_tuner_layers(model)):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.get_base_layer())
    if "peft_config" in model.__dict__:
        del model.__dict__["peft_config"]
    model.__dict__.pop(_ATTR, None)


# ----------------------------------------------------------------------------------------------
# Files: ours (diffusers' peft layout), diffusers' older layouts, kohya
# ----------------------------------------------------------------------------------------------


def _alpha_rank(model: nn.Module, name: str) -> tuple[dict[str, int], dict[str, float]]:
    ranks, alphas = {}, {}
    for path, layer in _tuner_layers(model):
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
        _HEADER_KEY: json.dumps(config, sort_keys=True),
        _DIFFUSERS_HEADER_KEY: json.dumps(diffusers_meta, sort_keys=True),
    }
    save_file(state, str(file), metadata=metadata)
    config_file.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return file


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, header metadata with JSON values decoded) of a LoRA ``.safetensors`` file or of
    a folder holding one (``pytorch_lora_weights.safetensors`` first). Never unpickles."""
    from safetensors import safe_open

    from destatic.checkpoints import CheckpointError, load_safetensors

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
            meta[k] = json.loads(v) if k in (_HEADER_KEY, _DIFFUSERS_HEADER_KEY) else v
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder", "te_")
_MODEL_PREFIXES = ("unet.", "transformer.", "controlnet.", "model.diffusion_model.")
# (suffix in the file, role): peft, kohya, diffusers' LoRALinearLayer and LoRACompatible layouts
_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_layer.down.weight", "down"),
    (".lora_layer.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
_UNSUPPORTED = ("hada_", "lokr_", "oft_", "dora_scale", "lora_magnitude_vector", ".diff", "boft_")
_PROCESSOR = re.compile(
    r"^(.*)\.processor\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj)_lora"
    r"\.(down|up)\.weight$"
)


def _split_key(key: str) -> tuple[str, str] | None:
    """(module part, role) of a tensor key, or None if it is not a LoRA tensor we read."""
    m = _PROCESSOR.match(key)  # diffusers' attention processors: …processor.to_q_lora.down
    if m:
        proj = "to_out.0" if m.group(2) == "to_out" else m.group(2)
        return f"{m.group(1)}.{proj}", m.group(3)
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    m = re.match(r"^(.*)\.lora_([AB])\.[^.]+\.weight$", key)  # peft, with an adapter name
    if m:
        return m.group(1), "down" if m.group(2) == "A" else "up"
    return None


def _ldm_names(model: nn.Module) -> dict[str, str]:
    """Diffusers module path → the original LDM (CompVis/SGM) path, for an SD U-Net."""
    from destatic.models.unet import UNet2DCondition

    if not isinstance(model, UNet2DCondition):
        return {}
    cfg = model.config
    n = cfg.layers_per_block
    if not isinstance(n, int):  # per-block counts: no single LDM numbering to derive
        return {}
    resnet = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
    fixed = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    up_attn = {i for i, t in enumerate(cfg.up_block_types) if "CrossAttn" in t}

    def convert(path: str) -> str | None:
        if path in fixed:
            return fixed[path]
        parts = path.split(".")
        rest = parts[4:]
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 4:
            b, kind, j = int(parts[1]), parts[2], int(parts[3])
            if parts[0] == "down_blocks":
                if kind in ("resnets", "attentions"):
                    index, slot = 1 + b * (n + 1) + j, 0 if kind == "resnets" else 1
                elif kind == "downsamplers" and rest == ["conv"]:
                    return f"input_blocks.{(b + 1) * (n + 1)}.0.op"
                else:
                    return None
                block = "input_blocks"
            else:
                if kind in ("resnets", "attentions"):
                    index, slot = b * (n + 1) + j, 0 if kind == "resnets" else 1
                elif kind == "upsamplers" and rest == ["conv"]:
                    slot = 2 if b in up_attn else 1
                    return f"output_blocks.{b * (n + 1) + n}.{slot}.conv"
                else:
                    return None
                block = "output_blocks"
        elif parts[0] == "mid_block" and len(parts) >= 3:
            kind, j = parts[1], int(parts[2])
            slot, rest = {"resnets": 2 * j, "attentions": 1}.get(kind), parts[3:]
            if slot is None:
                return None
            prefix = f"middle_block.{slot}"
            if kind == "resnets":
                return f"{prefix}.{resnet.get('.'.join(rest), '.'.join(rest))}"
            return ".".join([prefix, *rest])
        else:
            return None
        if kind == "resnets":
            return f"{block}.{index}.0.{resnet.get('.'.join(rest), '.'.join(rest))}"
        return ".".join([block, str(index), str(slot), *rest])

    out = {}
    for path in _adaptable(model):
        ldm = convert(path)
        if ldm is not None:
            out[path] = ldm
    return out


class _Resolver:
    """Resolves a file's module part (dotted, or kohya's underscored) to a module path."""

    def __init__(self, model: nn.Module):
        self.layers = _adaptable(model)
        self.dotted: dict[str, str] = {p: p for p in self.layers}
        flat: dict[str, set[str]] = {}
        for path, ldm in [*((p, p) for p in self.layers), *_ldm_names(model).items()]:
            self.dotted.setdefault(ldm, path)
            flat.setdefault(ldm.replace(".", "_"), set()).add(path)
        self.flat = flat

    def __call__(self, stem: str) -> str | None:
        for prefix in _MODEL_PREFIXES:
            if stem.startswith(prefix):
                stem = stem[len(prefix) :]
                break
        if stem in self.dotted:
            return self.dotted[stem]
        for prefix in ("lora_unet_", "lora_transformer_", "lora_controlnet_"):
            if stem.startswith(prefix):
                stem = stem[len(prefix) :]
                break
        hits = self.flat.get(stem.replace(".", "_"))
        if hits is None:
            return None
        if len(hits) > 1:
            raise LoraError(f"LoRA key {stem!r} fits several modules: {sorted(hits)}")
        return next(iter(hits))


def _as_layer_shape(t: torch.Tensor, layer: nn.Module, role: str, where: str) -> torch.Tensor:
    """A file's down/up tensor in the shape of the layer's peft A/B (Linear ↔ 1×1 conv)."""
    base = _base(layer)
    if isinstance(base, nn.Linear) and t.ndim == 4 and t.shape[-2:] == (1, 1):
        t = t[..., 0, 0]
    if isinstance(base, nn.Conv2d) and t.ndim == 2:
        if role == "up" or base.kernel_size == (1, 1):
            t = t[..., None, None]
    if isinstance(base, nn.Linear):
        if t.ndim != 2:
            raise LoraError(f"{where}: a {tuple(t.shape)} tensor cannot adapt a Linear layer")
        want = base.in_features if role == "down" else base.out_features
        got = t.shape[1] if role == "down" else t.shape[0]
    else:
        if t.ndim != 4:
            raise LoraError(f"{where}: a {tuple(t.shape)} tensor cannot adapt a Conv2d layer")
        want = base.in_channels if role == "down" else base.out_channels
        got = t.shape[1] if role == "down" else t.shape[0]
        if role == "down" and tuple(t.shape[-2:]) != tuple(base.kernel_size):
            raise LoraError(
                f"{where}: lora_down kernel {tuple(t.shape[-2:])} ≠ the layer's "
                f"{tuple(base.kernel_size)}"
            )
    if got != want:
        side = "input" if role == "down" else "output"
        raise LoraError(
            f"{where}: the LoRA's {side} width is {got} but the layer's is {want}; "
            "is this LoRA for another model?"
        )
    return t


def _unmatched_error(keys: list[str], total: int, model: nn.Module) -> LoraKeyError:
    shown = ", ".join(keys[:_SHOWN])
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return LoraKeyError(
        f"{len(keys)} of {total} LoRA keys fit no layer of this {type(model).__name__}: "
        f"{shown}{more}; is the LoRA for another model family?"
    )


def match_lora(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, LoraWeights]:
    """Module path → :class:`LoraWeights` for every adapted layer in a file's ``tensors``.

    Text-encoder parts are skipped with a warning; any other key that fits no layer of
    ``model`` (or a layer of another width) is a :class:`LoraError`.
    """
    metadata = metadata or {}
    resolve = _Resolver(model)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    skipped: list[str] = []
    unsupported: list[str] = []
    for key, value in tensors.items():
        if key.startswith(_TEXT_PREFIXES):
            skipped.append(key)
            continue
        if any(u in key for u in _UNSUPPORTED):
            unsupported.append(key)
            continue
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        stem, role = split
        path = resolve(stem)
        if path is None:
            unmatched.append(key)
            continue
        groups.setdefault(path, {})
        if role in groups[path]:
            raise LoraError(f"LoRA file has two {role} tensors for {path} (one is {key})")
        groups[path][role] = value
    if unsupported:
        raise LoraError(
            f"{len(unsupported)} LoRA keys are of a kind destatic does not read (LyCORIS "
            f"LoHa/LoKr/OFT or DoRA): {', '.join(unsupported[:_SHOWN])}"
        )
    if unmatched:
        raise _unmatched_error(unmatched, len(tensors), model)
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} text-encoder LoRA keys (e.g. {skipped[0]}): destatic adapts "
            "the denoiser only",
            stacklevel=3,
        )
    if not groups:
        raise LoraError("the LoRA file holds no denoiser weights")
    meta_alpha, meta_pattern = _metadata_alphas(metadata, model_prefix(model))
    out: dict[str, LoraWeights] = {}
    for path, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            lacking = "up (lora_B)" if "down" in parts else "down (lora_A)"
            raise LoraError(f"LoRA for {path} lacks its {lacking} tensor")
        layer = resolve.layers[path]
        down = _as_layer_shape(parts["down"].float(), layer, "down", path)
        up = _as_layer_shape(parts["up"].float(), layer, "up", path)
        if down.shape[0] != up.shape[1]:
            raise LoraError(f"{path}: lora down has rank {down.shape[0]} but lora up {up.shape[1]}")
        rank = int(down.shape[0])
        if "alpha" in parts:
            alpha = float(parts["alpha"].float().reshape(-1)[0])
        else:
            alpha = float(meta_pattern.get(path, meta_alpha if meta_alpha is not None else rank))
        out[path] = LoraWeights(down.contiguous(), up.contiguous(), alpha)
    return out


def _metadata_alphas(
    metadata: Mapping[str, Any], prefix: str
) -> tuple[float | None, dict[str, float]]:
    """(alpha, per-path alphas) from our header or diffusers' ``lora_adapter_metadata``."""
    ours = metadata.get(_HEADER_KEY)
    if isinstance(ours, dict) and "alpha" in ours:
        return float(ours["alpha"]), {k: float(v) for k, v in ours.get("alpha_pattern", {}).items()}
    theirs = metadata.get(_DIFFUSERS_HEADER_KEY)
    if isinstance(theirs, dict):
        alpha = theirs.get(f"{prefix}.lora_alpha", theirs.get("lora_alpha"))
        pattern = theirs.get(f"{prefix}.alpha_pattern", theirs.get("alpha_pattern")) or {}
        unescaped = {re.sub(r"\\(.)", r"\1", k): float(v) for k, v in pattern.items()}
        return (float(alpha) if alpha is not None else None), unescaped
    return None, {}


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
    from peft import set_peft_model_state_dict

    if isinstance(source, Mapping):
        tensors, meta, label = dict(source), dict(metadata or {}), "lora"
    else:
        tensors, meta = read_lora_file(source)
        p = Path(source)
        label = p.parent.name if p.name == WEIGHTS_NAME else (p.stem if p.is_file() else p.name)
    _unfuse(model)
    weights = match_lora(model, tensors, meta)
    if name is None:
        base = re.sub(r"[^A-Za-z0-9_]+", "_", label).strip("_") or "lora"
        name, k = base, 1
        while name in lora_scales(model):
            k += 1
            name = f"{base}_{k}"
    if "." in name:
        raise LoraError(f"adapter name {name!r} must not contain '.'")
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
    if not isinstance(source, Mapping):
        reg.sources[name] = str(source)
    set_lora_scale(model, name, scale)
    return name


# ----------------------------------------------------------------------------------------------
# Training: the adapter's weights as a module of their own
# ----------------------------------------------------------------------------------------------


class AdapterWeights(nn.Module):
    """The trainable weights of adapter ``name`` on ``network``, as a module of their own.

    Its parameters *are* the network's LoRA parameters (shared, not copied) and its state dict
    holds only them (``layers.<module path with / for .>.lora_A.weight``), so an optimizer, an
    EMA copy and a checkpoint see the adapter and nothing of the frozen base.
    Calling it calls the network. A copy (``copy.deepcopy``, as an EMA makes) copies the adapter
    weights but shares the network; put a copy's weights into the network with :func:`applied`.
    """

    def __init__(self, network: nn.Module, name: str = "default") -> None:
        super().__init__()
        self.__dict__["network"] = network  # not a submodule: not saved, not copied
        self.name = name
        self.prefix = model_prefix(network)
        self.paths: list[str] = []
        layers = nn.ModuleDict()
        for path, layer in _tuner_layers(network):
            if name in layer.lora_A:
                self.paths.append(path)
                pair = {"lora_A": layer.lora_A[name], "lora_B": layer.lora_B[name]}
                pair["dropout"] = layer.lora_dropout[name]  # so train()/eval() reach it
                layers[path.replace(".", "/")] = nn.ModuleDict(pair)
        if not self.paths:
            raise LoraError(f"{type(network).__name__} has no adapter named {name!r}")
        self.layers = layers
        self.config = network.config

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.network(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> AdapterWeights:
        network = self.__dict__["network"]
        memo[id(network)] = network
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights keyed as in a LoRA file (``<prefix>.<module>.lora_A.weight``)."""
        out = {}
        for path in self.paths:
            pair = self.layers[path.replace(".", "/")]
            out[f"{self.prefix}.{path}.lora_A.weight"] = pair["lora_A"].weight.detach()
            out[f"{self.prefix}.{path}.lora_B.weight"] = pair["lora_B"].weight.detach()
        return out

    def save(self, path: str | Path, **info: Any) -> Path:
        """Write these weights as an adapter file (see :func:`save_lora`)."""
        return save_lora(self.network, path, self.name, weights=self.diffusers_state_dict(), **info)


@contextlib.contextmanager
def applied(weights: AdapterWeights) -> Iterator[nn.Module]:
    """Within the block the network computes with ``weights`` (e.g. an EMA copy); the values it
    had are put back exactly afterwards. Yields the network."""
    network, name = weights.network, weights.name
    live = {}
    for path, layer in _tuner_layers(network):
        if name in layer.lora_A:
            live[path] = (layer.lora_A[name].weight, layer.lora_B[name].weight)
    saved = {p: (a.detach().clone(), b.detach().clone()) for p, (a, b) in live.items()}
    try:
        with torch.no_grad():
            for path, (a, b) in live.items():
                pair = weights.layers[path.replace(".", "/")]
                a.copy_(pair["lora_A"].weight)
                b.copy_(pair["lora_B"].weight)
        yield network
    finally:
        with torch.no_grad():
            for path, (a, b) in live.items():
                a.copy_(saved[path][0])
                b.copy_(saved[path][1])
