"""A dataset chosen by name: the train or held-out split of the emoji, the clipart or an image
folder dataset at one size, each image with its caption choices.

Training draws from the train split (:mod:`destatic.training.data`); the sweeps score against
the held-out one (:mod:`destatic.metrics.sweep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DATASETS", "SPLITS", "CaptionedSplit", "load_split"]

DATASETS = ("emoji", "clipart", "folder")
SPLITS = ("train", "heldout")


@dataclass
class CaptionedSplit:
    """One split: ``images`` uint8 (N, H, W, 3) and each image's caption choices."""

    images: np.ndarray
    captions: list[list[str]]  # first = main caption, then alternatives

    def __len__(self) -> int:
        return len(self.images)


def load_split(
    dataset: str,
    size: int,
    split: str = "train",
    *,
    path: str = "",
    alt_captions: bool = True,
    progress: bool = True,
) -> CaptionedSplit:
    """The ``split`` of ``dataset`` (one of :data:`DATASETS`; ``path`` is the folder of
    ``"folder"``) at ``size``²; ``alt_captions``: also the emoji's alternative names."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset = {dataset!r}: choose one of {', '.join(DATASETS)}")
    if dataset == "emoji":
        from destatic.data.emoji import load_emoji

        ds = getattr(load_emoji(size, progress=progress), split)()
        alts = ds.alt_captions if alt_captions else [[] for _ in ds.captions]
        captions = [[c, *a] for c, a in zip(ds.captions, alts, strict=True)]
        return CaptionedSplit(ds.images, captions)
    if dataset == "clipart":
        from destatic.data.clipart import load_clipart

        ds = getattr(load_clipart(size, progress=progress), split)()
        return CaptionedSplit(ds.images, [[c] for c in ds.captions])
    if not path:
        raise ValueError('dataset = "folder" needs the path of the image folder')
    from destatic.data.folder import load_image_folder

    ds = getattr(load_image_folder(path, size), split)()
    return CaptionedSplit(ds.images, [[c] for c in ds.captions])
