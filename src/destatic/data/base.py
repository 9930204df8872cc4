"""What every captioned dataset shares: per-item fields and the fixed train / held-out split."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import numpy as np

__all__ = ["SplitDataset"]

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
