"""What every single-file format shares: the format registry, the shipped configs with a
``config=`` folder over them, the offline tokenizer search, and :func:`fill` — a network built
from the file's tensors through a name function (our parameter → :class:`Piece` of the file)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.io import CheckpointError, read_json, read_safetensors_header
from destatic.io.hub_cache import cached_snapshot, hub_cache_dir
from destatic.models.registry import load_into
from destatic.pipelines.families import Components, Family

__all__ = [
    "CONFIGS",
    "SINGLE_FILE_FORMATS",
    "Header",
    "Piece",
    "SingleFileFormat",
    "configs",
    "fill",
    "find_tokenizer",
    "load_single_file",
    "prefixed",
    "register_single_file",
    "single_file_state",
]

CONFIGS = Path(__file__).parent.parent / "families" / "configs"
Header = Mapping[str, tuple[str, tuple[int, ...]]]
Loader = Callable[[Path, Header, Path | None, Path | None], tuple[Components, Family]]


@dataclass(frozen=True)
class SingleFileFormat:
    """One kind of single-file checkpoint: ``looks_for`` (the keys that tell it, for errors),
    ``matches(header)`` and ``load(path, header, config, tokenizer) -> (Components, Family)``."""

    name: str
    looks_for: str
    matches: Callable[[Header], bool]
    load: Loader


SINGLE_FILE_FORMATS: dict[str, SingleFileFormat] = {}


def register_single_file(fmt: SingleFileFormat) -> SingleFileFormat:
    """Add ``fmt`` to :data:`SINGLE_FILE_FORMATS` (first match wins, in registration order)."""
    SINGLE_FILE_FORMATS[fmt.name] = fmt
    return fmt


def load_single_file(
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> tuple[Components, Family]:
    """The components and family of a single ``.safetensors`` checkpoint (see the package
    docstring); a file no format claims is one line listing what was looked for."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: single-file checkpoints load from .safetensors only (pickle files such as "
            ".ckpt are never unpickled); convert it to safetensors"
        )
    header = read_safetensors_header(path)
    for fmt in SINGLE_FILE_FORMATS.values():
        if fmt.matches(header):
            return fmt.load(
                path,
                header,
                None if config is None else Path(config),
                None if tokenizer is None else Path(tokenizer),
            )
    looked = "; ".join(f"{f.name}: {f.looks_for}" for f in SINGLE_FILE_FORMATS.values())
    sample = ", ".join(sorted(header)[:3]) or "no tensors"
    raise CheckpointError(
        f"{path} is no single-file checkpoint destatic knows (its keys start {sample}); "
        f"looked for {looked}"
    )


# --- configs and tokenizers ------------------------------------------------------------------

#: Where each part of a shipped config set sits in a diffusers folder given as ``config=``.
CONFIG_PARTS = {
    "unet": "unet/config.json",
    "transformer": "transformer/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "text_encoder_3": "text_encoder_3/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}


def configs(name: str, folder: Path | None) -> dict[str, Any]:
    """The shipped config set ``name`` with each part the ``folder`` has put over it."""
    cfg = json.loads((CONFIGS / f"{name}.json").read_text(encoding="utf-8"))
    if folder is None:
        return cfg
    if not folder.is_dir():
        raise CheckpointError(f"config folder {folder} does not exist; check the path")
    for part, rel in CONFIG_PARTS.items():
        if (folder / rel).is_file():
            cfg[part] = read_json(folder / rel)
    return cfg


def plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config without its ``_``-prefixed bookkeeping keys (for transformers' config classes)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _has_tokenizer(folder: Path) -> bool:
    files = ("vocab.json", "merges.txt")
    if all((folder / f).is_file() for f in files) or (folder / "tokenizer.json").is_file():
        return True
    return (folder / "spiece.model").is_file()


def find_tokenizer(
    what: str,
    tokenizer: Path | None,
    config: Path | None,
    repos: list[str],
    sub: str = "tokenizer",
    kind: str = "CLIP",
) -> Path:
    """The first tokenizer folder among ``tokenizer`` (itself when ``sub`` is ``tokenizer``, or
    its ``sub/``), ``config/sub`` and the cached snapshots of ``repos`` (their root or ``sub/``);
    else a one-line error."""
    if tokenizer is not None:
        own = (tokenizer, tokenizer / sub) if sub == "tokenizer" else (tokenizer / sub,)
        for folder in own:
            if _has_tokenizer(folder):
                return folder
        if sub == "tokenizer":
            raise CheckpointError(
                f"tokenizer folder {tokenizer} has no vocab.json + merges.txt or tokenizer.json"
            )
    if config is not None and _has_tokenizer(config / sub):
        return config / sub
    for repo in repos:
        snapshot = cached_snapshot(repo)
        for folder in () if snapshot is None else (snapshot, snapshot / sub):
            if _has_tokenizer(folder):
                return folder
    raise CheckpointError(
        f"{what} needs a {kind} tokenizer ({sub}/) and none is available offline: looked in the "
        f"Hugging Face cache ({hub_cache_dir()}) for {', '.join(repos)}; give a tokenizer folder "
        f"(tokenizer=… / --tokenizer DIR with {sub}/, or config=DIR with {sub}/) or cache one "
        f"with `huggingface-cli download {repos[0]}` — destatic never downloads"
    )


# --- weights ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Where one parameter lies in the file: tensor ``name``, transposed (OpenCLIP's
    ``text_projection`` is ``x @ P``, a Linear weight is ``P.T``), then rows ``rows`` of it or
    the ``part[0]``-th of ``part[1]`` equal row slices (a fused q/k/v), then with its two halves
    swapped (``swap``: the original final adaLN gives (shift, scale), diffusers' (scale, shift))."""

    name: str
    part: tuple[int, int] = (0, 1)
    rows: tuple[int, int] | None = None
    swap: bool = False
    transpose: bool = False

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this piece of a file tensor of ``shape``."""
        if self.transpose:
            shape = shape[::-1]
        if self.rows is not None:
            return (self.rows[1] - self.rows[0], *shape[1:])
        count = self.part[1]
        return (shape[0] // count, *shape[1:]) if count > 1 else shape

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This piece of the file tensor ``tensor``."""
        if self.transpose:
            tensor = tensor.T
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]]
        elif self.part[1] > 1:
            tensor = tensor.chunk(self.part[1], dim=0)[self.part[0]]
        if self.swap:
            first, second = tensor.chunk(2, dim=0)
            tensor = torch.cat([second, first], dim=0)
        return tensor


#: A name function's answer: the file tensor's name, or a :class:`Piece` of it.
Source = str | Piece


def prefixed(prefix: str, source: Source) -> Source:
    """``source`` under ``prefix`` (``model.diffusion_model.``…)."""
    if isinstance(source, str):
        return prefix + source
    return dataclasses.replace(source, name=prefix + source.name)


def _piece(source: Source) -> Piece:
    return Piece(source) if isinstance(source, str) else source


def fill(
    build: Callable[[], nn.Module],
    path: Path,
    header: Header,
    name: Callable[[str], Source],
    where: str,
    absent: Mapping[str, Callable[[tuple[int, ...]], torch.Tensor]] | None = None,
) -> nn.Module:
    """The module ``build()`` makes, every parameter loaded from the file piece ``name(key)``
    (1×1-conv tensors fit Linear slots; extra file tensors are ignored); a key of ``absent``
    whose piece the file lacks takes ``absent[key](shape)`` instead. Names and shapes are
    checked against the header on a weightless (meta-device) copy first, so a file that does
    not fit fails at once, before a tensor is read. That copy then takes the file's tensors as
    its own (``assign``): the network is never randomly initialised, unless it has buffers
    outside its state dict (CLIP's ``position_ids``), which only a real build computes."""
    from safetensors import safe_open

    with torch.device("meta"):
        empty = build()
    own = empty.state_dict()
    pieces = {k: _piece(name(k)) for k in own}
    made = {
        k: make(tuple(own[k].shape))
        for k, make in (absent or {}).items()
        if k in pieces and pieces[k].name not in header
    }
    pieces = {k: p for k, p in pieces.items() if k not in made}
    missing = sorted({p.name for p in pieces.values() if p.name not in header})
    shapes = [
        f"{p.name}: expected {tuple(own[k].shape)} vs file {header[p.name][1]}"
        for k, p in pieces.items()
        if p.name in header and _squeeze(p.shape(header[p.name][1])) != _squeeze(own[k].shape)
    ]
    problems = [
        f"{label} {', '.join(items[:3])}{f' (+{len(items) - 3} more)' if len(items) > 3 else ''}"
        for label, items in (("missing keys", missing), ("shape mismatches", shapes))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{path}: the {where} does not fit its config: {'; '.join(problems)}; give "
            "config=FOLDER (--config) with the matching diffusers configs"
        )
    state, taken = dict(made), {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for k, p in pieces.items():
            if p not in taken:  # tied weights (T5's embedding) stay one tensor
                taken[p] = p.take(f.get_tensor(p.name)).reshape(own[k].shape).contiguous()
            state[k] = taken[p]
    computed = any(b.is_meta for k, b in empty.named_buffers() if k not in own)
    module = build() if computed else empty
    load_into(module, state, where=f"{path} ({where})", assign=not computed)
    return module.eval()


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without trailing unit axes (a 1×1 convolution's kernel is a Linear weight)."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def single_file_state(
    state: Mapping[str, torch.Tensor], name: Callable[[str], Source]
) -> dict[str, torch.Tensor]:
    """The file tensors that hold ``state`` under ``name`` — :func:`fill` run backwards (fused
    pieces joined along rows in order, swaps and transposes undone), e.g. to write a single
    file from a folder's weights."""
    groups: dict[str, list[tuple[Piece, torch.Tensor]]] = {}
    for k, v in state.items():
        p = _piece(name(k))
        if all(p != seen for seen, _ in groups.get(p.name, [])):  # tied weights: stored once
            groups.setdefault(p.name, []).append((p, v.detach()))
    out = {}
    for file_name, items in groups.items():
        parts = []
        for p, v in items:
            if p.swap:
                first, second = v.chunk(2, dim=0)
                v = torch.cat([second, first], dim=0)
            order = p.rows[0] if p.rows is not None else p.part[0]
            parts.append((order, v))
        tensor = torch.cat([v for _, v in sorted(parts, key=lambda t: t[0])], dim=0)
        out[file_name] = (tensor.T if items[0][0].transpose else tensor).contiguous().clone()
    return out
