"""The component registry: a folder's ``config.json`` class name → our network class and its
config, so any component folder (U-Net, MMDiT, autoencoder, ControlNet — ours or diffusers')
loads with :func:`load_component` and saves with :func:`save_component`. Weights must fit the
network exactly: shapes and float/integer kinds are compared from the file's header before any
tensor is read."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.io import (
    CONFIG_NAME,
    SAVE_WEIGHTS_NAME,
    WRITE_ERRORS,
    CheckpointError,
    CheckpointWriteError,
    atomic_files,
    find_weights,
    read_json,
    verify_checksums,
    write_error_reason,
)
from destatic.io.weights import FLOAT_DTYPES, declared_tensors, load_safetensors
from destatic.models.animatediff import (
    MotionAdapter,
    MotionAdapterConfig,
    UNetMotion,
    UNetMotionConfig,
)
from destatic.models.autoencoder import AutoencoderConfig, AutoencoderKL
from destatic.models.controlnet import ControlNet, ControlNetConfig
from destatic.models.dit import DiT, DiTConfig
from destatic.models.flux import Flux, FluxConfig
from destatic.models.flux_controlnet import FluxControlNet, FluxControlNetConfig
from destatic.models.mel import MelCodec, MelCodecConfig
from destatic.models.mmdit import MMDiT, MMDiTConfig
from destatic.models.oobleck import AutoencoderOobleck, OobleckConfig
from destatic.models.pixart import PixArt, PixArtConfig
from destatic.models.stable_audio import (
    StableAudioDiT,
    StableAudioDiTConfig,
    StableAudioProjection,
    StableAudioProjectionConfig,
)
from destatic.models.token_transformer import TokenTransformer, TokenTransformerConfig
from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.models.video_dit import VideoDiT, VideoDiTConfig
from destatic.models.vq import VQConfig, VQModel
from destatic.models.wan import WanConfig, WanTransformer3DModel
from destatic.models.wan_vae import AutoencoderKLWan, WanVAEConfig

__all__ = [
    "COMPONENT_CLASSES",
    "SAVED_AS",
    "load_component",
    "load_into",
    "save_component",
    "saved_as",
]


def _first(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


#: How a tensor fits a module's slot: (floating point?, shape).
Fit = tuple[bool, tuple[int, ...]]


def _require_fit(module: nn.Module, found: dict[str, Fit], where: str) -> None:
    """A CheckpointError naming ``where`` unless ``found`` has exactly ``module``'s keys, each
    with its shape and kind (floating point or not)."""
    own = {k: (v.is_floating_point(), tuple(v.shape)) for k, v in module.state_dict().items()}
    missing = [k for k in own if k not in found]
    unexpected = [k for k in found if k not in own]
    common = [k for k in own if k in found]
    shapes = [
        f"{k}: expected {own[k][1]} vs file {found[k][1]}"
        for k in common
        if own[k][1] != found[k][1]
    ]
    kinds = [
        f"{k}: expected {'float' if own[k][0] else 'integer'} vs file "
        f"{'float' if found[k][0] else 'integer'}"
        for k in common
        if own[k][0] != found[k][0]
    ]
    parts = [
        f"{label} {_first(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
            ("dtype mismatches", kinds),
        )
        if items
    ]
    if parts:
        raise CheckpointError(
            f"weights in {where} do not fit {type(module).__name__}: {'; '.join(parts)}; "
            "check that config.json belongs to these weights"
        )


def load_into(
    module: nn.Module, state: dict[str, torch.Tensor], *, where: str, assign: bool = False
) -> None:
    """Strictly load ``state`` into ``module``, casting floating tensors to the module's dtypes.

    Missing keys, unexpected keys, shape mismatches and integer tensors where the module has
    floating ones (or the reverse) are one CheckpointError naming ``where``. ``assign``: the
    tensors become the module's own (no copy), so a module built weightless on the meta device
    is filled without ever being initialised (``nn.Module.load_state_dict(assign=True)``).
    """
    _require_fit(
        module, {k: (v.is_floating_point(), tuple(v.shape)) for k, v in state.items()}, where
    )
    own = module.state_dict()
    cast = {
        k: v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v
        for k, v in state.items()
    }
    module.load_state_dict(cast, strict=True, assign=assign)


class _Transformer2DConfig:
    """diffusers' generic ``Transformer2DModel``, the name the hub's DiT and PixArt-α folders
    still write: a DiT (adaLN-Zero) or a PixArt (adaLN-single), told by ``norm_type``."""

    @staticmethod
    def from_diffusers(cfg: dict[str, Any]) -> DiTConfig | PixArtConfig:
        single = cfg.get("norm_type") == "ada_norm_single"
        return (PixArtConfig if single else DiTConfig).from_diffusers(cfg)


def _transformer_2d(config: DiTConfig | PixArtConfig) -> nn.Module:
    return PixArt(config) if isinstance(config, PixArtConfig) else DiT(config)


COMPONENT_CLASSES: dict[str, tuple[Callable[..., nn.Module], Any]] = {
    "UNet2DConditionModel": (UNet2DCondition, UNetConfig),
    "UNet2DCondition": (UNet2DCondition, UNetConfig),
    "UNetMotionModel": (UNetMotion, UNetMotionConfig),
    "MotionAdapter": (MotionAdapter, MotionAdapterConfig),  # AnimateDiff motion modules alone
    "SD3Transformer2DModel": (MMDiT, MMDiTConfig),
    "MMDiT": (MMDiT, MMDiTConfig),
    "FluxTransformer2DModel": (Flux, FluxConfig),
    "FluxControlNetModel": (FluxControlNet, FluxControlNetConfig),
    "DiTTransformer2DModel": (DiT, DiTConfig),
    "PixArtTransformer2DModel": (PixArt, PixArtConfig),
    "Transformer2DModel": (_transformer_2d, _Transformer2DConfig),  # the hub's DiT, PixArt-α
    "AutoencoderKL": (AutoencoderKL, AutoencoderConfig),
    "ControlNetModel": (ControlNet, ControlNetConfig),
    "ControlNet": (ControlNet, ControlNetConfig),
    "VideoDiT": (VideoDiT, VideoDiTConfig),
    "WanTransformer3DModel": (WanTransformer3DModel, WanConfig),
    "AutoencoderKLWan": (AutoencoderKLWan, WanVAEConfig),
    "StableAudioDiTModel": (StableAudioDiT, StableAudioDiTConfig),
    "StableAudioProjectionModel": (StableAudioProjection, StableAudioProjectionConfig),
    "AutoencoderOobleck": (AutoencoderOobleck, OobleckConfig),
    "MelCodec": (MelCodec, MelCodecConfig),  # weight-free: log-mel frames, Griffin-Lim decode
    "VQModel": (VQModel, VQConfig),  # the image tokenizer of token models
    "TokenTransformer": (TokenTransformer, TokenTransformerConfig),  # LlamaGen / MaskGIT
}


#: The inverse of :data:`COMPONENT_CLASSES` for saving: each network class → its folder in a
#: pipeline (``model_index.json``'s key) and the class name written for it. The transformers
#: diffusers also has (DiT, PixArt, Flux, the autoencoder) take diffusers' names, so diffusers
#: loads those folders too.
SAVED_AS: dict[type, tuple[str, str]] = {
    UNet2DCondition: ("unet", "UNet2DCondition"),
    UNetMotion: ("unet", "UNetMotionModel"),
    MMDiT: ("transformer", "MMDiT"),
    Flux: ("transformer", "FluxTransformer2DModel"),
    FluxControlNet: ("controlnet", "FluxControlNetModel"),
    DiT: ("transformer", "DiTTransformer2DModel"),
    PixArt: ("transformer", "PixArtTransformer2DModel"),
    AutoencoderKL: ("vae", "AutoencoderKL"),
    ControlNet: ("controlnet", "ControlNet"),
    VideoDiT: ("transformer", "VideoDiT"),
    WanTransformer3DModel: ("transformer", "WanTransformer3DModel"),
    AutoencoderKLWan: ("vae", "AutoencoderKLWan"),
    StableAudioDiT: ("transformer", "StableAudioDiTModel"),
    StableAudioProjection: ("projection_model", "StableAudioProjectionModel"),
    AutoencoderOobleck: ("vae", "AutoencoderOobleck"),
    MelCodec: ("vae", "MelCodec"),
    VQModel: ("tokenizer", "VQModel"),
    TokenTransformer: ("transformer", "TokenTransformer"),
}


def saved_as(module: nn.Module) -> tuple[str, str]:
    """The pipeline folder and class name ``module`` saves under (:data:`SAVED_AS`); a
    one-line ValueError for a class that has none."""
    for cls in type(module).__mro__:
        if cls in SAVED_AS:
            return SAVED_AS[cls]
    raise ValueError(
        f"saving a {type(module).__name__} is not supported; savable networks: "
        f"{', '.join(c.__name__ for c in SAVED_AS)}"
    )


def load_component(folder: str | os.PathLike, class_name: str | None = None) -> nn.Module:
    """A model from a diffusers component folder (``config.json`` + safetensors weights)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"component folder {folder} does not exist; check the path")
    verify_checksums(folder)
    cfg = read_json(folder / CONFIG_NAME)
    if class_name is None:
        class_name = cfg.get("_class_name")
        if class_name is None:
            raise CheckpointError(
                f"{folder / CONFIG_NAME} has no _class_name; pass class_name= explicitly"
            )
    if class_name not in COMPONENT_CLASSES:
        raise CheckpointError(
            f"unsupported component class {class_name!r} in {folder}; supported: "
            f"{', '.join(COMPONENT_CLASSES)}"
        )
    model_cls, config_cls = COMPONENT_CLASSES[class_name]
    try:
        config = config_cls.from_diffusers(cfg)
    except (ValueError, TypeError) as e:
        msg = str(e).replace("\n", " ")
        raise CheckpointError(
            f"{folder / CONFIG_NAME} is not a supported {class_name} config: {msg}"
        ) from e
    module = model_cls(config)
    weights = find_weights(folder)
    declared = declared_tensors(weights)  # headers only: a file that cannot fit is never read
    _require_fit(module, {k: (d in FLOAT_DTYPES, s) for k, (d, s) in declared.items()}, str(folder))
    load_into(module, load_safetensors(weights), where=str(folder))
    return module.eval()


def save_component(
    module: nn.Module,
    folder: str | os.PathLike,
    *,
    class_name: str,
    config: dict[str, Any],
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``folder/config.json`` (with ``_class_name``), ``diffusion_pytorch_model
    .safetensors`` and their ``checksums.json`` atomically; ``dtype`` casts the floating tensors
    (e.g. ``torch.float16``). A full or read-only disk is a one-line CheckpointError, with
    nothing half-written left behind."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()  # own storage: no shared-tensor errors
    text = json.dumps({**config, "_class_name": class_name}, indent=2, sort_keys=True) + "\n"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        names = [SAVE_WEIGHTS_NAME, CONFIG_NAME]
        with atomic_files(folder, names, checksums=True) as tmp:
            save_file(tensors, str(tmp[SAVE_WEIGHTS_NAME]), metadata={"format": "pt"})
            tmp[CONFIG_NAME].write_text(text, encoding="utf-8")
    except WRITE_ERRORS as e:
        reason = write_error_reason(e)
        raise CheckpointWriteError(
            f"could not write {folder} ({reason}); free disk space or choose a writable "
            "folder, then save again",
            reason,
        ) from e
