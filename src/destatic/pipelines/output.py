"""Writing results safely: PNGs written atomically (a temporary file in the same folder,
fsync, rename), output folders checked before any work, and one-line errors that say which
file failed and what was kept."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from destatic.io import probe_writable, write_atomic

if TYPE_CHECKING:
    import PIL.Image
    import torch

__all__ = [
    "OutputError",
    "check_writable",
    "describe_os_error",
    "film_strips",
    "write_png_atomic",
]


class OutputError(ValueError):
    """A result that cannot be written; the one-line message says which, why and what to do."""


def describe_os_error(err: OSError) -> str:
    """A short reason for a failed write: "disk full", "read-only file system", …"""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    if err.errno is not None:
        return os.strerror(err.errno).lower()
    return str(err) or type(err).__name__


def write_png_atomic(
    path: str | os.PathLike, image: PIL.Image.Image, pnginfo: Any | None = None
) -> None:
    """Write ``image`` as the PNG ``path`` so that ``path`` is either absent, its old file, or
    the whole new PNG (:func:`destatic.io.write_atomic`)."""
    write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=pnginfo))


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Create ``folder`` (and its parents) if needed and prove a file can be written in it;
    else an :class:`OutputError` naming ``what`` (e.g. "-o") — before any work is done."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{what} {folder} is a file, not a folder; choose another path")
    try:
        probe_writable(folder)
    except FileExistsError:
        raise OutputError(
            f"{what} {folder}: a file stands where a folder is needed; choose another path"
        ) from None
    except OSError as err:
        raise OutputError(
            f"cannot write to {folder} ({describe_os_error(err)}); choose another {what}"
        ) from None


def film_strips(videos: torch.Tensor) -> torch.Tensor:
    """Clips ``(B, C, F, H, W)`` → images ``(B, C, H, F·W)``: each clip's frames side by side
    (progress grids, previews and sheets of a video model)."""
    b, c, f, h, w = videos.shape
    return videos.permute(0, 1, 3, 2, 4).reshape(b, c, h, f * w)
