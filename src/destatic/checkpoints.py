"""Checkpoint I/O in the diffusers folder layout (DESIGN.md, "Checkpoints").

A checkpoint is a folder with ``model_index.json`` and one subfolder per component, each with a
``config.json`` and ``*.safetensors`` weights. Only safetensors are read: pickle checkpoints
(``.bin``, ``.ckpt``, ``.pt``) are refused, never ``torch.load``-ed. Every error is a
:class:`CheckpointError` whose one-line message says what is wrong and what to do.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.models.autoencoder import AutoencoderConfig, AutoencoderKL
from destatic.models.controlnet import ControlNet, ControlNetConfig
from destatic.models.mmdit import MMDiT, MMDiTConfig
from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.process import EDM, EDMTarget, RectifiedFlow, Target, VPDiscrete, get_target
from destatic.process.base import Process
from destatic.process.vp import BETA_SCHEDULES

__all__ = [
    "COMPONENT_CLASSES",
    "CheckpointError",
    "find_weights",
    "load_component",
    "load_into",
    "load_safetensors",
    "load_weights",
    "process_from_scheduler_config",
    "read_json",
    "read_model_index",
    "save_component",
    "scheduler_config_from_process",
]

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
CONFIG_NAME = "config.json"
SAVE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers scheduler classes that run on a discrete VP (β-schedule) process.
VP_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "LMSDiscreteScheduler",
    "UniPCMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
VP_TARGETS = ("epsilon", "v_prediction", "sample")


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read (one-line message: what and what to do)."""


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable or invalid file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found; check the checkpoint folder is complete")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = str(e).replace("\n", " ")
        raise CheckpointError(f"{path} is not valid JSON ({msg}); fix or replace the file") from e
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(data).__name__}, not an object; fix or replace the file"
        )
    return data


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/model_index.json`` (a diffusers pipeline folder's list of components)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist (no model_index.json to read); "
            "check the path"
        )
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(
            f"{folder} has no model_index.json; point at a diffusers pipeline folder "
            f"(it holds: {_listing(folder)})"
        )
    return read_json(folder / "model_index.json")


def _listing(folder: Path, limit: int = 20) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "unreadable"
    if not names:
        return "nothing"
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def _check_safetensors_file(path: Path) -> None:
    """Validate the header and length of a safetensors file before handing it to the reader."""
    size = path.stat().st_size
    bad = f"{path} is truncated or corrupt"
    fix = "re-download or re-save it"
    if size < 8:
        raise CheckpointError(f"{bad} ({size} bytes, no header); {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(
                f"{bad} (header claims {n} bytes, file has {size - 8} after the length); {fix}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        msg = str(e).replace("\n", " ")
        raise CheckpointError(f"{bad} (unreadable header: {msg}); {fix}") from e
    if 8 + n + end != size:
        raise CheckpointError(f"{bad} (tensors need {8 + n + end} bytes, file has {size}); {fix}")


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, or of every shard of a ``*.safetensors.index.json``.

    Truncated or corrupt files and pickle checkpoints are a CheckpointError naming the file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if _is_pickle(path):
        raise CheckpointError(f"{path}: pickle checkpoints are not loaded; convert to safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path} not found; check the checkpoint folder is complete")
    if path.name.endswith(".json"):
        return _load_shards(path)
    _check_safetensors_file(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors' own error type is not importable across versions
        msg = str(e).replace("\n", " ")
        raise CheckpointError(f"{path} is truncated or corrupt ({msg}); re-download it") from e


def _load_shards(index_path: Path) -> dict[str, torch.Tensor]:
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no weight_map; fix or replace the index file")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = load_safetensors(index_path.parent / shard)
        state.update(part)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(
            f"{index_path}: shards lack {len(missing)} indexed tensor(s), first {missing[:3]}; "
            "re-download the shards"
        )
    return state


def find_weights(folder: str | os.PathLike) -> Path:
    """The weights file of a component folder (diffusers' names, ``.fp16`` variants, sharded
    ``*.safetensors.index.json``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"component folder {folder} does not exist; check the path")
    candidates = []
    for variant in ("", ".fp16"):
        for name in WEIGHT_NAMES:
            candidates.append(f"{name}{variant}.safetensors")
            candidates.append(f"{name}.safetensors.index{variant}.json")
            candidates.append(f"{name}{variant}.safetensors.index.json")
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    indexes = sorted(folder.glob("*.safetensors.index*.json"))
    if indexes:
        return indexes[0]
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if any(_is_pickle(p) for p in folder.iterdir()):
        raise CheckpointError(
            f"{folder} holds only pickle weights ({_listing(folder)}): pickle checkpoints are "
            "not loaded; convert to safetensors"
        )
    raise CheckpointError(
        f"no safetensors weights in {folder} (it holds: {_listing(folder)}); expected "
        f"{SAVE_WEIGHTS_NAME} or model.safetensors"
    )


def load_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a component folder (single file or shards)."""
    return load_safetensors(find_weights(folder))


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


def _first(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_into(module: nn.Module, state: dict[str, torch.Tensor], *, where: str) -> None:
    """Strictly load ``state`` into ``module``, casting floating tensors to the module's dtypes.

    Missing keys, unexpected keys and shape mismatches are one CheckpointError naming ``where``.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: expected {tuple(own[k].shape)} vs file {tuple(state[k].shape)}"
        for k in own
        if k in state and own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_first(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_first(shapes)}")
        raise CheckpointError(
            f"weights in {where} do not fit {type(module).__name__}: {'; '.join(parts)}; "
            "check that config.json belongs to these weights"
        )
    cast = {
        k: v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v
        for k, v in state.items()
    }
    module.load_state_dict(cast, strict=True)


COMPONENT_CLASSES: dict[str, tuple[Callable[..., nn.Module], Any]] = {
    "UNet2DConditionModel": (UNet2DCondition, UNetConfig),
    "UNet2DCondition": (UNet2DCondition, UNetConfig),
    "SD3Transformer2DModel": (MMDiT, MMDiTConfig),
    "MMDiT": (MMDiT, MMDiTConfig),
    "AutoencoderKL": (AutoencoderKL, AutoencoderConfig),
    "ControlNetModel": (ControlNet, ControlNetConfig),
    "ControlNet": (ControlNet, ControlNetConfig),
}


def load_component(folder: str | os.PathLike, class_name: str | None = None) -> nn.Module:
    """A model from a diffusers component folder (``config.json`` + safetensors weights)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"component folder {folder} does not exist; check the path")
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
    load_into(module, load_weights(folder), where=str(folder))
    return module.eval()


def _fsync_replace(tmp: Path, dest: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def _temp_in(folder: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    return Path(name)


def save_component(
    module: nn.Module,
    folder: str | os.PathLike,
    *,
    class_name: str,
    config: dict[str, Any],
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``folder/config.json`` (with ``_class_name``) and ``diffusion_pytorch_model
    .safetensors`` atomically; ``dtype`` casts the floating tensors (e.g. ``torch.float16``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()  # own storage: no shared-tensor errors
    text = json.dumps({**config, "_class_name": class_name}, indent=2, sort_keys=True) + "\n"
    tmp_w = _temp_in(folder, ".safetensors")
    tmp_c = _temp_in(folder, ".json")
    try:
        save_file(tensors, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(text, encoding="utf-8")
        _fsync_replace(tmp_w, folder / SAVE_WEIGHTS_NAME)
        _fsync_replace(tmp_c, folder / CONFIG_NAME)
    finally:
        for tmp in (tmp_w, tmp_c):
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------------


def process_from_scheduler_config(cfg: dict[str, Any]) -> tuple[Process, str | Target]:
    """A diffusers scheduler ``config.json`` dict → (destatic process, prediction target name).

    β-schedule schedulers (DDIM, PNDM, Euler, DPM-Solver, LMS, UniPC, Heun, DDPM, …) give a
    :class:`VPDiscrete`; ``FlowMatchEulerDiscreteScheduler`` gives a :class:`RectifiedFlow` with
    its static ``shift`` and target ``"flow"``. A ``use_dynamic_shifting`` scheduler (Flux) is
    accepted: the resolution-dependent shift is chosen at generation time
    (``RectifiedFlow.for_resolution``), nothing extra is stored here.
    """
    name = cfg.get("_class_name")
    steps = int(cfg.get("num_train_timesteps", 1000))
    if name in EDM_SCHEDULERS:
        # diffusers' EDM "epsilon" is EDM's F-prediction (c_out = σ·σ_d/√(σ²+σ_d²)).
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise CheckpointError(
                f"{name} with prediction_type={cfg.get('prediction_type')!r} is not supported; "
                "only 'epsilon' (EDM's F-prediction) is"
            )
        sigma_data = float(cfg.get("sigma_data", 0.5))
        process = EDM(
            min_sigma=float(cfg.get("sigma_min", 0.002)),
            max_sigma=float(cfg.get("sigma_max", 80.0)),
            sigma_data=sigma_data,
            num_timesteps=steps,
        )
        return process, EDMTarget(sigma_data)
    if name in FLOW_SCHEDULERS:
        shift = float(cfg.get("shift", 1.0))
        if not (math.isfinite(shift) and shift > 0):
            raise CheckpointError(f"scheduler shift={shift!r} must be positive; fix config.json")
        return RectifiedFlow(shift=shift, num_timesteps=steps), "flow"
    if name not in VP_SCHEDULERS:
        raise CheckpointError(
            f"unsupported scheduler class {name!r}; supported: "
            f"{', '.join(VP_SCHEDULERS + FLOW_SCHEDULERS + EDM_SCHEDULERS)}"
        )
    if cfg.get("trained_betas") is not None:
        raise CheckpointError(
            f"{name} with trained_betas is not supported; only named beta schedules "
            f"({', '.join(BETA_SCHEDULES)}) are"
        )
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise CheckpointError(
            f"unsupported beta_schedule {schedule!r} in {name} config; supported: "
            f"{', '.join(BETA_SCHEDULES)}"
        )
    target = cfg.get("prediction_type", "epsilon")
    if target not in VP_TARGETS:
        raise CheckpointError(
            f"unsupported prediction_type {target!r} in {name} config; supported: "
            f"{', '.join(VP_TARGETS)}"
        )
    process = VPDiscrete(
        schedule=schedule,
        beta_start=float(cfg.get("beta_start", 0.0001)),
        beta_end=float(cfg.get("beta_end", 0.02)),
        num_timesteps=steps,
        zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
    )
    return process, target


def scheduler_config_from_process(process: Process, target: str | Target) -> dict[str, Any]:
    """The inverse of :func:`process_from_scheduler_config`: a diffusers-compatible scheduler
    config (``EulerDiscreteScheduler`` for VP, ``FlowMatchEulerDiscreteScheduler`` for flow,
    ``EDMEulerScheduler`` for EDM)."""
    target_obj = get_target(target)
    target = target_obj.name
    if isinstance(process, EDM):
        if not isinstance(target_obj, EDMTarget) or target_obj.sigma_data != process.sigma_data:
            raise CheckpointError(
                "an EDM process needs the EDM target with the same sigma_data "
                f"({process.sigma_data}); got {target_obj!r}"
            )
        return {
            "_class_name": "EDMEulerScheduler",
            "num_train_timesteps": process.num_timesteps,
            "sigma_min": process.min_sigma,
            "sigma_max": process.max_sigma,
            "sigma_data": process.sigma_data,
            "sigma_schedule": "karras",
            "rho": 7.0,
            "prediction_type": "epsilon",
        }
    if isinstance(process, RectifiedFlow):
        if target != "flow":
            raise CheckpointError(
                f"a RectifiedFlow process needs target 'flow', got {target!r}; pass 'flow'"
            )
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": process.num_timesteps,
            "shift": process.shift,
            "use_dynamic_shifting": False,
        }
    if isinstance(process, VPDiscrete):
        if target not in VP_TARGETS:
            raise CheckpointError(
                f"a VPDiscrete process needs target one of {', '.join(VP_TARGETS)}, got {target!r}"
            )
        return {
            "_class_name": "EulerDiscreteScheduler",
            "num_train_timesteps": process.num_timesteps,
            "beta_schedule": process.schedule,
            "beta_start": process.beta_start,
            "beta_end": process.beta_end,
            "trained_betas": None,
            "prediction_type": target,
            "rescale_betas_zero_snr": process.zero_terminal_snr,
            "timestep_spacing": "trailing" if process.zero_terminal_snr else "leading",
            "steps_offset": 0 if process.zero_terminal_snr else 1,
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
        }
    raise CheckpointError(
        f"{type(process).__name__} has no diffusers scheduler; only VPDiscrete and "
        "RectifiedFlow processes are saved"
    )
