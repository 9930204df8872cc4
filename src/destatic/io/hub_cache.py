"""Repository ids (``stabilityai/sdxl-turbo``) resolved from the local Hugging Face cache only.

The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``
(``~/.cache/huggingface/hub``): a repo lives in ``models--org--name/snapshots/<revision>/``,
``refs/main`` naming the revision. Nothing here touches the network: a repo id that is not in
the cache is a one-line :class:`CheckpointError` saying so.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from destatic.io.errors import CheckpointError

__all__ = ["cached_snapshot", "hub_cache_dir", "is_repo_id", "resolve_repo_id"]

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder this environment points at (it may not exist)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "huggingface" / "hub"


def is_repo_id(path: str | os.PathLike) -> bool:
    """Whether ``path`` reads as ``org/name`` (and is no file or folder on disk)."""
    text = os.fspath(path)
    return bool(_REPO_ID.fullmatch(text)) and not Path(text).exists()


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The snapshot folder of ``repo_id`` in the local cache: the one ``refs/<revision>``
    names, else the newest snapshot present; ``None`` when the repo is not cached."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / revision
    if ref.is_file():
        folder = snapshots / ref.read_text(encoding="utf-8").strip()
        if folder.is_dir():
            return folder
    if (snapshots / revision).is_dir():  # a commit hash given as the revision
        return snapshots / revision
    found = [p for p in snapshots.iterdir() if p.is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_repo_id(repo_id: str) -> Path:
    """The cached snapshot folder of ``repo_id``, or a one-line CheckpointError (nothing is
    downloaded)."""
    folder = cached_snapshot(repo_id)
    if folder is None:
        raise CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache ({hub_cache_dir()}); destatic "
            "never downloads: fetch it with `huggingface-cli download "
            f"{repo_id}` (or give a folder or .safetensors file)"
        )
    return folder
