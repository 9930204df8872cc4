"""Reading model files: safetensors weights (headers checked against the file before any
tensor is read; pickle files refused, never unpickled), sharded weights, JSON configs and
``model_index.json``, in the diffusers folder layout."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from destatic.io.errors import CheckpointError
from destatic.io.files import verify_checksums

__all__ = [
    "CONFIG_NAME",
    "FLOAT_DTYPES",
    "SAVE_WEIGHTS_NAME",
    "declared_tensors",
    "find_weights",
    "load_safetensors",
    "load_weights",
    "read_json",
    "read_model_index",
    "read_safetensors_header",
]

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
CONFIG_NAME = "config.json"
SAVE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


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


#: Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"})
DEFAULT_FIX = "re-download or re-save it"

#: A tensor as a safetensors header declares it: (dtype name, shape).
Declared = tuple[str, tuple[int, ...]]


def _corrupt(path: Path, detail: str, fix: str) -> CheckpointError:
    """The one-line error for a damaged file: what is wrong, then ``fix`` (if any)."""
    detail = detail.replace("\n", " ")
    return CheckpointError(
        f"{path} is truncated or corrupt ({detail})" + (f"; {fix}" if fix else "")
    )


def _entry(name: str, info: Any) -> tuple[Declared, int, int]:
    """((dtype, shape), start, end) of one header entry; ValueError when it is inconsistent."""
    if not isinstance(info, dict):
        raise ValueError(f"entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise ValueError(f"tensor {name!r} has dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"tensor {name!r} has shape {shape!r}")
    if not (isinstance(offsets, list) and [type(o) for o in offsets] == [int, int]):
        raise ValueError(f"tensor {name!r} has data_offsets {offsets!r}")
    start, end = offsets
    if not 0 <= start <= end:
        raise ValueError(f"tensor {name!r} has data_offsets {offsets!r}")
    if dtype in DTYPE_BYTES and math.prod(shape) * DTYPE_BYTES[dtype] != end - start:
        raise ValueError(f"tensor {name!r} ({dtype} {shape}) does not fit its {end - start} bytes")
    return (dtype, tuple(shape)), start, end


def read_safetensors_header(path: str | os.PathLike, fix: str = DEFAULT_FIX) -> dict[str, Declared]:
    """The tensors a ``.safetensors`` file declares, ``{name: (dtype, shape)}``, read from its
    8-byte length and JSON header only (no tensor data is read).

    The header must be valid and agree with the file: every tensor's offsets inside the data
    section, its bytes matching dtype × shape, the tensors tiling the data section exactly. So a
    header claiming gigabytes that the file does not hold is refused before anything is loaded.
    Otherwise a :class:`CheckpointError` ending in ``fix``.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise _corrupt(path, f"{size} bytes, no header", fix)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, MAX_HEADER):
            raise _corrupt(
                path, f"header claims {n} bytes, file has {size - 8} after the length", fix
            )
        raw = f.read(n)
    data_size = size - 8 - n
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        entries = {k: _entry(k, v) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"unreadable header: {e}", fix) from e
    covered = 0
    for _, start, end in sorted(entries.values(), key=lambda e: (e[1], e[2])):
        if start != covered:
            raise _corrupt(path, f"tensor data overlaps or leaves a gap at byte {covered}", fix)
        covered = end
    if covered != data_size:
        raise _corrupt(path, f"tensors need {8 + n + covered} bytes, file has {size}", fix)
    return {k: declared for k, (declared, _, _) in entries.items()}


def load_safetensors(path: str | os.PathLike, fix: str = DEFAULT_FIX) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, or of every shard of a ``*.safetensors.index.json``.

    Truncated or corrupt files and pickle checkpoints are a CheckpointError naming the file (and
    ending in ``fix``, what to do about it).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if _is_pickle(path):
        raise CheckpointError(f"{path}: pickle checkpoints are not loaded; convert to safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path} not found; check the checkpoint folder is complete")
    if path.name.endswith(".json"):
        return _load_shards(path)
    read_safetensors_header(path, fix)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # whatever the reader says, the file is bad
        raise _corrupt(path, str(e), fix) from e


def declared_tensors(path: Path) -> dict[str, Declared]:
    """The tensors a weights file (or every shard of an index) declares, from headers only."""
    if not path.name.endswith(".json"):
        return read_safetensors_header(path)
    declared: dict[str, Declared] = {}
    for shard in _shards(path):
        declared.update(read_safetensors_header(path.parent / shard))
    return declared


def _shards(index_path: Path) -> list[str]:
    """The shard files an ``*.safetensors.index.json`` names."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no weight_map; fix or replace the index file")
    shards = sorted(set(map(str, weight_map.values())))
    for shard in shards:  # an index naming itself (or any non-safetensors file) would recurse
        if not shard.endswith(".safetensors") or Path(shard).name != shard:
            raise CheckpointError(
                f"{index_path} names {shard!r} as a shard; shards are .safetensors files beside "
                "the index: fix or replace the index file"
            )
    return shards


def _load_shards(index_path: Path) -> dict[str, torch.Tensor]:
    weight_map = read_json(index_path).get("weight_map") or {}
    state: dict[str, torch.Tensor] = {}
    for shard in _shards(index_path):
        state.update(load_safetensors(index_path.parent / shard))
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
    """The state dict of a component folder (single file or shards), its checksums verified
    when the folder has them."""
    verify_checksums(folder)
    return load_safetensors(find_weights(folder))
