"""What every captioned dataset shares: per-item fields and the fixed train / held-out split."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TypeVar

import numpy as np

__all__ = ["SplitDataset", "cache_root", "read_cache"]

D = TypeVar("D", bound="SplitDataset")


class SplitDataset:
    """Mixin for dataclasses whose every field holds one entry per item (arrays or lists) and
    whose ``split`` field says "train" or "heldout" for each."""

    captions: list[str]
    split: np.ndarray

    def __len__(self) -> int:
        return len(self.captions)

    def _subset(self: D, mask: np.ndarray) -> D:
        idx = np.flatnonzero(mask)
        values = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            values[f.name] = (
                value[idx] if isinstance(value, np.ndarray) else [value[i] for i in idx]
            )
        return type(self)(**values)

    def train(self: D) -> D:
        return self._subset(self.split == "train")

    def heldout(self: D) -> D:
        return self._subset(self.split == "heldout")


def cache_root() -> Path:
    """``$DESTATIC_CACHE``, else ``~/.cache/destatic``: where built datasets are cached."""
    base = os.environ.get("DESTATIC_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "destatic"


def read_cache(npz_path: Path, json_path: Path, **expected) -> tuple[np.ndarray, dict] | None:
    """``(images, metadata)`` of a dataset cache (``images`` in the npz, one caption per image
    in the json), or None when a file is missing, a metadata key differs from ``expected``, or
    the counts disagree: the caller then rebuilds it."""
    if not (npz_path.is_file() and json_path.is_file()):
        return None
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    if any(meta.get(key) != value for key, value in expected.items()):
        return None
    with np.load(npz_path) as z:
        images = z["images"]
    return (images, meta) if len(images) == len(meta["captions"]) else None
