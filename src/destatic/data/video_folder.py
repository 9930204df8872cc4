"""Any folder of videos with captions, as a captioned clip dataset.

The layout is the image folder's sidecar convention (:mod:`destatic.data.folder`): a
``name.txt`` caption beside each ``name.mp4`` / ``.gif`` / ``.webp`` / ``.webm`` / ``.mov`` (and
the other suffixes of :data:`destatic.io.video.READ_SUFFIXES`), searched recursively, hidden
files and folders skipped. Each video gives ``frames`` frames, either spread evenly over the
whole clip (frame ``round(i·(n−1)/(frames−1))`` of ``n``) or, with ``stride``, the first
``frames`` frames ``0, stride, 2·stride, …``; each frame is centre-cropped to a square and
resized (LANCZOS) to ``size``², giving uint8 ``(N, frames, size, size, 3)``.

Files that are empty, unreadable or corrupt, too short for the frames asked, or without a
(non-empty) caption are skipped, counted per reason and reported in one warning; a folder with
nothing left is one ValueError that says what was found. Nothing is cached (as the image
folder). The train/held-out split is :func:`destatic.data.emoji.split_of` of the file name
relative to ``root``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from destatic.data.base import SplitDataset
from destatic.data.emoji import split_of
from destatic.data.folder import SHOWN_NAMES, _from_sidecars, resize_square
from destatic.io.video import READ_SUFFIXES, count_frames, iter_frames

__all__ = ["VIDEO_SUFFIXES", "CaptionedVideos", "frame_indices", "load_video_folder"]

VIDEO_SUFFIXES = READ_SUFFIXES


@dataclass
class CaptionedVideos(SplitDataset):
    """Clips ``(N, frames, size, size, 3)`` uint8, a caption and a relative file name each."""

    clips: np.ndarray
    captions: list[str]
    names: list[str]
    split: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U7"))


class TooShort(ValueError):
    """A video with fewer frames than asked for."""


def frame_indices(total: int, frames: int, stride: int | None = None) -> list[int]:
    """Which of ``total`` frames to keep: ``frames`` spread evenly, or every ``stride``-th from
    the first. Raises :class:`TooShort` when ``total`` does not have them."""
    last = (frames - 1) * stride if stride else frames - 1
    if total <= last:
        raise TooShort(f"{total} frames, needs {last + 1}")
    if stride:
        return list(range(0, last + 1, stride))
    return np.round(np.linspace(0, total - 1, frames)).astype(int).tolist()


def _square(frame: np.ndarray, size: int) -> np.ndarray:
    """A frame centre-cropped to a square and LANCZOS-resized to ``size``²."""
    from PIL import Image

    h, w = frame.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return resize_square(Image.fromarray(frame[top : top + s, left : left + s]), size)


def _decode(path: Path, size: int, frames: int, stride: int | None) -> np.ndarray:
    """``(frames, size, size, 3)`` of the video at ``path``: when the file declares its frame
    count (MP4 and the like), only the kept frames are resized and decoding stops after the
    last; otherwise every frame is read first."""
    declared = count_frames(path) if path.suffix.lower() not in (".gif", ".webp") else None
    if declared:
        keep = frame_indices(declared, frames, stride)
        wanted, out = set(keep), []
        for i, frame in enumerate(iter_frames(path)):
            if i in wanted:
                out.append(_square(frame, size))
            if i >= keep[-1]:
                break
        if len(out) == frames:
            return np.stack(out)
        # the declared count was wrong: read everything
    every = [_square(f, size) for f in iter_frames(path)]
    return np.stack([every[i] for i in frame_indices(len(every), frames, stride)])


def load_video_folder(
    root: str | Path,
    size: int,
    frames: int,
    *,
    stride: int | None = None,
    progress: bool = True,
) -> CaptionedVideos:
    """Every captioned, readable, long-enough video under ``root`` as ``frames`` frames at
    ``size``² (see the module docstring); ``progress``: a bar over the files."""
    if size < 1 or frames < 1 or (stride is not None and stride < 1):
        raise ValueError(f"need size, frames, stride ≥ 1, got {size}, {frames}, {stride}")
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    skipped: dict[str, list[str]] = {
        "empty": [],
        "unreadable": [],
        "too short": [],
        "without caption": [],
    }
    entries = _from_sidecars(root, skipped, VIDEO_SUFFIXES)
    clips, captions, names = [], [], []
    for path, name, caption in tqdm(entries, desc="videos", unit="file", disable=not progress):
        if path.stat().st_size == 0:
            skipped["empty"].append(name)
            continue
        try:
            clip = _decode(path, size, frames, stride)
        except TooShort:
            skipped["too short"].append(name)
            continue
        except ValueError:  # io.video's one-line error for a damaged file
            skipped["unreadable"].append(name)
            continue
        clips.append(clip)
        captions.append(caption)
        names.append(name)
    summary = ", ".join(
        f"{len(v)} {reason} ({', '.join(v[:SHOWN_NAMES])}{', …' if len(v) > SHOWN_NAMES else ''})"
        for reason, v in skipped.items()
        if v
    )
    if not clips:
        raise ValueError(
            f"no captioned, readable videos of {frames} frames or more in {root} "
            f"({len(entries)} with a .txt caption; skipped: {summary or 'nothing'}; "
            f"video suffixes: {', '.join(sorted(VIDEO_SUFFIXES))})"
        )
    if summary:
        warnings.warn(f"{root}: skipped {sum(map(len, skipped.values()))}: {summary}", stacklevel=2)
    return CaptionedVideos(
        clips=np.stack(clips),
        captions=captions,
        names=names,
        split=np.array([split_of(n) for n in names], dtype="<U7"),
    )
