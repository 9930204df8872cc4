"""Training checkpoints that survive ``kill -9`` and a full disk, without pickle.

A training state (model, EMA, optimizer, LR schedule, RNG states, step and data position) is a
nested structure of dicts, lists, numbers and tensors. :func:`flatten` splits it into a
``{key: tensor}`` dict for safetensors and a JSON skeleton where each tensor is replaced by
``{"__tensor__": key}``; :func:`unflatten` inverts it. Nothing is ever unpickled.

On disk, a run keeps ``checkpoints/step-00001234/{state.safetensors, state.json}``. A checkpoint
is written into a hidden temporary folder, fsynced and renamed into place; then the text file
``checkpoints/latest`` is atomically replaced to name it. A process killed at any moment leaves
either the previous checkpoint as ``latest`` or the new one complete; leftover temporary
folders are removed on the next save. Older checkpoints beyond ``keep`` are deleted only after
the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from destatic.checkpoints import CheckpointError, load_safetensors

__all__ = [
    "TrainingState",
    "flatten",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "unflatten",
]

TrainingState = dict[str, Any]
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
LATEST = "latest"


def flatten(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able skeleton, tensors) of a nested dict/list/tuple/number/str/tensor structure."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {_TENSOR: key}
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if not isinstance(k, str | int):
                    raise TypeError(f"state key {k!r} at {key!r} is neither str nor int")
                # JSON keys are strings: int keys (optimizer state) are tagged to come back.
                out[f"#int:{k}" if isinstance(k, int) else k] = walk(
                    v, f"{key}.{k}" if key else str(k)
                )
            return out
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v, f"{key}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"cannot store {type(x).__name__} at {key!r} in a training checkpoint")

    return walk(obj, prefix), tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        if set(skeleton) == {_TUPLE}:
            return tuple(unflatten(v, tensors) for v in skeleton[_TUPLE])
        return {
            (int(k[5:]) if k.startswith("#int:") else k): unflatten(v, tensors)
            for k, v in skeleton.items()
        }
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (``…/checkpoints``), or None.

    ``latest`` names it; if that file is missing or names a folder that is gone, the complete
    ``step-*`` folder with the highest step is used.
    """
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_JSON).is_file() and (candidate / STATE_TENSORS).is_file():
            return candidate
    complete = [
        p
        for p in root.glob("step-*")
        if (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file()
    ]
    return max(complete, key=lambda p: p.name) if complete else None


def save_checkpoint(
    root: str | os.PathLike, step: int, state: TrainingState, keep: int = 2
) -> Path:
    """Write ``state`` as checkpoint ``step`` under ``root`` atomically; keep the newest ``keep``.

    Raises :class:`CheckpointError` (with the last good checkpoint named) when the disk is full
    or the write fails; the previous checkpoints are untouched then.
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # a save killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    skeleton, tensors = flatten(state)
    dest = root / _name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{_name(step)}-"))
    try:
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt"})
        (tmp / STATE_JSON).write_text(json.dumps(skeleton), encoding="utf-8")
        for f in (STATE_TENSORS, STATE_JSON):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if dest.exists():  # re-saving the same step (a resumed run): replace it
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        _fsync_dir(root)
        pointer_tmp = root / f".tmp-{LATEST}"
        pointer_tmp.write_text(dest.name + "\n")
        os.replace(pointer_tmp, root / LATEST)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        good = latest_checkpoint(root)
        where = f"the last good checkpoint is {good}" if good else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write checkpoint {dest} ({e.strerror or e}); {where}: "
            "free disk space and run the same command again to resume"
        ) from e
    steps = sorted(root.glob("step-*"), key=lambda p: p.name)
    for old in steps[: max(len(steps) - keep, 0)]:
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def load_checkpoint(folder: str | os.PathLike) -> TrainingState:
    """Read a checkpoint folder written by :func:`save_checkpoint`."""
    folder = Path(folder)
    try:
        skeleton = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / STATE_JSON} is unreadable ({e}); delete {folder}") from e
    tensors = load_safetensors(folder / STATE_TENSORS)
    try:
        return unflatten(skeleton, tensors)
    except KeyError as e:
        raise CheckpointError(f"{folder}: tensor {e} missing from {STATE_TENSORS}") from e
