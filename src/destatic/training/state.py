"""Training checkpoints that survive ``kill -9``, a full disk and a damaged copy, without pickle.

A training state (model, EMA, optimizer, LR schedule, RNG states, step and data position) is a
nested structure of dicts, lists, numbers and tensors. :func:`flatten` splits it into a
``{key: tensor}`` dict for safetensors and a JSON skeleton where each tensor is replaced by
``{"__tensor__": key}``; :func:`unflatten` inverts it. Nothing is ever unpickled.

On disk, a run keeps ``checkpoints/step-00001234/{state.safetensors, state.json,
checksums.json}``. A checkpoint is written into a hidden temporary folder, fsynced and renamed
into place (:func:`destatic.io.atomic_folder`); then the text file
``checkpoints/latest`` is atomically replaced to name it. A process killed at any moment leaves
either the previous checkpoint as ``latest`` or the new one complete; leftover temporary
folders are removed on the next save. Older checkpoints beyond ``keep`` are deleted only after
the new one is in place.

safetensors has no checksum, so ``checksums.json`` holds the SHA-256 of both files, and
``state.json`` says which format wrote it: a checkpoint of this format without its checksums, or
with a file that does not match them, is a :class:`DamagedCheckpoint` (whose message names the
previous good checkpoint when the trainer has one). Checkpoints of the first format (no
checksums) still load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from destatic.io import (
    CHECKSUMS_NAME,
    WRITE_ERRORS,
    CheckpointError,
    CheckpointWriteError,
    atomic_file,
    atomic_folder,
    load_safetensors,
    verify_checksums,
    write_checksums,
    write_error_reason,
)

__all__ = [
    "DamagedCheckpoint",
    "TrainingState",
    "checkpoint_step",
    "flatten",
    "latest_checkpoint",
    "load_checkpoint",
    "mismatch",
    "previous_good_checkpoint",
    "save_checkpoint",
    "unflatten",
    "verify_checkpoint",
]

TrainingState = dict[str, Any]
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
LATEST = "latest"
FORMAT_KEY = "__format__"  # in state.json; absent in checkpoints of the first format
FORMAT = 2  # 2: checksums.json beside the files


class DamagedCheckpoint(CheckpointError):
    """A training checkpoint whose files are corrupt or do not hold a consistent state.

    ``folder`` is the checkpoint, ``detail`` what is wrong; the message ends in what to do
    (``advice``: by default, delete it to resume from the checkpoint before it).
    """

    def __init__(self, folder: str | os.PathLike, detail: str, advice: str = ""):
        self.folder = Path(folder)
        # the files named relative to the folder: "state.json is …", not the full path again
        self.detail = detail.replace("\n", " ").replace(f"{self.folder}{os.sep}", "")
        advice = advice or f"delete {self.folder} to resume from the checkpoint before it"
        super().__init__(f"checkpoint {self.folder} is damaged ({self.detail}); {advice}")


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


def _name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """The step a checkpoint folder's name (``step-00001234``) says, or None for another name."""
    found = re.fullmatch(r"step-([0-9]+)", Path(folder).name)
    return int(found.group(1)) if found else None


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (``…/checkpoints``), or None.

    ``latest`` names it; if that file is missing, unreadable or names a folder that is gone or
    incomplete, the complete ``step-*`` folder with the highest step is used.
    """
    root = Path(root)
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if checkpoint_step(name) is not None and Path(name).name == name and _complete(root / name):
        return root / name
    complete = [p for p in root.glob("step-*") if _complete(p)]
    return max(complete, key=lambda p: p.name) if complete else None


def _complete(folder: Path) -> bool:
    """Whether a checkpoint folder has both its files (a save renames it into place whole)."""
    return (folder / STATE_JSON).is_file() and (folder / STATE_TENSORS).is_file()


def save_checkpoint(
    root: str | os.PathLike, step: int, state: TrainingState, keep: int = 2
) -> Path:
    """Write ``state`` as checkpoint ``step`` under ``root`` atomically; keep the newest ``keep``.

    Raises :class:`CheckpointError` (with the last good checkpoint named) when the disk is full
    or read-only, or the write fails otherwise; the previous checkpoints are untouched then and
    no temporary folder is left.
    """
    from safetensors.torch import save_file

    root = Path(root)
    dest = root / _name(step)
    skeleton, tensors = flatten(state)
    skeleton = {FORMAT_KEY: FORMAT, **skeleton}
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # a save killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_folder(dest) as tmp:
            save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt"})
            (tmp / STATE_JSON).write_text(json.dumps(skeleton), encoding="utf-8")
            write_checksums(tmp, [STATE_TENSORS, STATE_JSON])
        with atomic_file(root / LATEST) as pointer:
            pointer.write_text(dest.name + "\n")
    except WRITE_ERRORS as e:
        good = latest_checkpoint(root) if root.is_dir() else None
        where = f"the last good checkpoint is {good}" if good else "no earlier checkpoint exists"
        reason = write_error_reason(e)
        raise CheckpointWriteError(
            f"could not write checkpoint {dest} ({reason}); {where}: free disk space (or make "
            "the folder writable) and run the same command again to resume",
            reason,
        ) from e
    steps = sorted(root.glob("step-*"), key=lambda p: p.name)
    for old in steps[: max(len(steps) - keep, 0)]:
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def _read_skeleton(folder: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint: a JSON object, else a DamagedCheckpoint."""
    try:
        skeleton = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpoint(folder, f"{STATE_JSON} is unreadable: {e}") from e
    if not isinstance(skeleton, dict):
        raise DamagedCheckpoint(folder, f"{STATE_JSON} holds no JSON object")
    return skeleton


def verify_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint's files without loading its tensors; returns its JSON skeleton.

    The files must match ``checksums.json``, which a checkpoint of this format must have (one
    of the first format, without checksums, passes unverified). Else a DamagedCheckpoint.
    """
    folder = Path(folder)
    try:
        verify_checksums(folder, fix="")
    except CheckpointError as e:
        raise DamagedCheckpoint(folder, str(e)) from e
    skeleton = _read_skeleton(folder)
    fmt = skeleton.pop(FORMAT_KEY, 1)
    if fmt != 1 and not (folder / CHECKSUMS_NAME).is_file():
        raise DamagedCheckpoint(folder, f"{CHECKSUMS_NAME} is missing")
    if fmt not in (1, FORMAT):
        raise DamagedCheckpoint(folder, f"{STATE_JSON} has format {fmt!r}, not {FORMAT}")
    return skeleton


def load_checkpoint(folder: str | os.PathLike) -> TrainingState:
    """Read a checkpoint folder written by :func:`save_checkpoint`, its checksums verified;
    damaged files are a :class:`DamagedCheckpoint`."""
    folder = Path(folder)
    skeleton = verify_checkpoint(folder)
    try:
        tensors = load_safetensors(folder / STATE_TENSORS, fix="")
    except CheckpointError as e:
        raise DamagedCheckpoint(folder, str(e)) from e
    try:
        return unflatten(skeleton, tensors)
    except KeyError as e:
        raise DamagedCheckpoint(folder, f"tensor {e} missing from {STATE_TENSORS}") from e
    except (TypeError, ValueError, AttributeError) as e:
        raise DamagedCheckpoint(folder, f"{STATE_JSON} is malformed: {e}") from e


def previous_good_checkpoint(root: str | os.PathLike, before: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` older than ``before`` whose files verify
    (:func:`verify_checkpoint`), or None."""
    older = [p for p in Path(root).glob("step-*") if p.name < Path(before).name and _complete(p)]
    for folder in sorted(older, key=lambda p: p.name, reverse=True):
        try:
            verify_checkpoint(folder)
        except DamagedCheckpoint:
            continue
        return folder
    return None


def resume_advice(root: str | os.PathLike, damaged: str | os.PathLike) -> str:
    """What to do about the damaged checkpoint ``damaged`` of the run in ``root``: delete it
    and resume from the previous good one (named), or start over when there is none."""
    previous = previous_good_checkpoint(root, damaged)
    if previous is not None:
        return f"delete {damaged} to resume from the previous good checkpoint {previous}"
    return f"no earlier good checkpoint is left: delete {root} to start the run over"


_MISSING = object()


def mismatch(saved: Any, live: Any, where: str = "") -> str | None:
    """Where a restored structure ``saved`` differs in form from the ``live`` one it replaces
    (dict keys, list lengths, a tensor's dtype and shape, a scalar's type), or None.

    Values may differ; only the form is compared, so a checkpoint whose tensors became integers,
    whose state lost keys or whose numbers became strings is found before it is loaded.
    """
    here = where or "state"
    if saved is _MISSING:
        return f"{here} is missing"
    if isinstance(live, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            return f"{here} is {type(saved).__name__}, not a tensor"
        if saved.dtype != live.dtype or saved.shape != live.shape:
            return (
                f"{here} is {str(saved.dtype).removeprefix('torch.')} {list(saved.shape)}, "
                f"expected {str(live.dtype).removeprefix('torch.')} {list(live.shape)}"
            )
        return None
    if isinstance(live, dict):
        if not isinstance(saved, dict):
            return f"{here} is {type(saved).__name__}, not a dict"
        extra = [k for k in saved if k not in live]
        if extra:
            return f"{here} has unexpected keys {extra[:3]}"
        for k, v in live.items():
            found = mismatch(saved.get(k, _MISSING), v, f"{where}.{k}" if where else str(k))
            if found:
                return found
        return None
    if isinstance(live, list | tuple):
        if type(saved) is not type(live):
            return f"{here} is {type(saved).__name__}, not a {type(live).__name__}"
        if len(saved) != len(live):
            return f"{here} has {len(saved)} entries, expected {len(live)}"
        for i, (a, b) in enumerate(zip(saved, live, strict=True)):
            found = mismatch(a, b, f"{here}.{i}")
            if found:
                return found
        return None
    if live is not None and type(saved) is not type(live):
        return f"{here} is {saved!r}, expected a {type(live).__name__}"
    return None
