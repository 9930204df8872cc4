"""Foreign LoRA formats: a file's keys and header, translated to this model's module paths.

:func:`match_lora` turns the tensors of a LoRA file (and its header) into
:class:`~destatic.models.lora.adapter.LoraWeights` keyed by the model's own module paths. Beside
ours and diffusers' peft layout (:mod:`~destatic.models.lora.files`; rank/alpha in the header or
as ``<module>.alpha``) it reads

* diffusers' older attention-processor layout: ``…attn1.processor.to_q_lora.down.weight``
  (``to_out_lora`` → ``to_out.0``) and ``…to_q.lora.down.weight`` (alpha = rank);
* kohya / A1111: ``lora_unet_<module with _ for .>.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha``. The underscored names are resolved against the model's own module names (never by
  guessing where the dots were), in diffusers' naming and in the original LDM naming
  (``input_blocks_4_1_…``, ``middle_block_1_…``, ``output_blocks_…``) of SD U-Nets;
* Flux in Black Forest Labs' layout, kohya's ``lora_unet_double_blocks_0_img_attn_qkv`` or
  ComfyUI's ``diffusion_model.double_blocks.0.img_attn.qkv``: fused layers are split onto
  the model's own (:mod:`~destatic.models.lora.bfl`).

Text-encoder parts (``lora_te_…``, ``text_encoder.…``) are skipped with a warning. A file with
keys that fit no layer of the model is a :class:`LoraKeyError` listing them; one with a layer of
another width, or of a kind destatic does not read (LyCORIS, DoRA), a
:class:`~destatic.models.lora.adapter.LoraError`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from destatic.models.lora.adapter import (
    LoraError,
    LoraWeights,
    adaptable,
    base_layer,
    model_prefix,
)
from destatic.models.lora.bfl import bfl_layers, bfl_stem

#: Header keys of a LoRA file's safetensors metadata (JSON values): ours, and diffusers'.
#: :mod:`~destatic.models.lora.files` writes both; :func:`match_lora` reads alphas from them.
HEADER_KEY = "destatic_lora"
DIFFUSERS_HEADER_KEY = "lora_adapter_metadata"
_SHOWN = 3  # unmatched keys listed in an error


class LoraKeyError(LoraError):
    """LoRA keys that fit no layer of the model (the message lists them)."""


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
    for path in adaptable(model):
        ldm = convert(path)
        if ldm is not None:
            out[path] = ldm
    return out


class _Resolver:
    """Resolves a file's module part (dotted, or kohya's underscored) to a module path."""

    def __init__(self, model: nn.Module):
        self.layers = adaptable(model)
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
    base = base_layer(layer)
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
    bfl = bfl_layers(model)
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
        fused = bfl.get(bfl_stem(stem)) if bfl else None
        if fused is not None:  # a BFL layer: its share to each of the model's layers
            pieces, rows = fused
            for piece in pieces:
                _add(groups, piece.path, role, piece.take(value, role, rows, key), key)
            continue
        path = resolve(stem)
        if path is None:
            unmatched.append(key)
            continue
        _add(groups, path, role, value, key)
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


def _add(groups: dict, path: str, role: str, value: torch.Tensor, key: str) -> None:
    parts = groups.setdefault(path, {})
    if role in parts:
        raise LoraError(f"LoRA file has two {role} tensors for {path} (one is {key})")
    parts[role] = value


def _metadata_alphas(
    metadata: Mapping[str, Any], prefix: str
) -> tuple[float | None, dict[str, float]]:
    """(alpha, per-path alphas) from our header or diffusers' ``lora_adapter_metadata``."""
    ours = metadata.get(HEADER_KEY)
    if isinstance(ours, dict) and "alpha" in ours:
        return float(ours["alpha"]), {k: float(v) for k, v in ours.get("alpha_pattern", {}).items()}
    theirs = metadata.get(DIFFUSERS_HEADER_KEY)
    if isinstance(theirs, dict):
        alpha = theirs.get(f"{prefix}.lora_alpha", theirs.get("lora_alpha"))
        pattern = theirs.get(f"{prefix}.alpha_pattern", theirs.get("alpha_pattern")) or {}
        unescaped = {re.sub(r"\\(.)", r"\1", k): float(v) for k, v in pattern.items()}
        return (float(alpha) if alpha is not None else None), unescaped
    return None, {}
