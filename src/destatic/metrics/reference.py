"""Inception features of a dataset's real images, computed once and cached on disk.

The cache lives in ``$DESTATIC_CACHE/features`` (see :func:`destatic.data.base.cache_root`), one
``.npy`` per image set, named by a sha1 of the images (bytes and shape) and a sha1 of the
network file with its preprocessing, so new images or another network never reuse stale
features. A damaged cache file is recomputed, never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path

import numpy as np

from destatic.data.base import cache_root
from destatic.io import write_atomic
from destatic.metrics.inception import FEATURE_DIM, InceptionFeatures

__all__ = ["cached_features"]


@functools.cache
def _file_sha1(path: str, size: int, mtime_ns: int) -> str:
    """sha1 of a file, once per process (and again only if the file changes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def _network_key(extractor: InceptionFeatures) -> str:
    stat = Path(extractor.path).stat()
    h = hashlib.sha1(_file_sha1(str(extractor.path), stat.st_size, stat.st_mtime_ns).encode())
    h.update(extractor.preprocessing.encode())
    return h.hexdigest()


def _images_key(images: np.ndarray) -> str:
    h = hashlib.sha1(f"{images.dtype}{images.shape}".encode())
    h.update(images.tobytes())
    return h.hexdigest()


def _read(path: Path, n: int) -> np.ndarray | None:
    """The cached features [n, 2048], or None when missing or damaged."""
    if not path.is_file():
        return None
    try:
        features = np.load(path, allow_pickle=False)
    except Exception:  # a damaged cache is recomputed, never trusted
        return None
    ok = (
        features.dtype == np.float64
        and features.shape == (n, FEATURE_DIM)
        and np.isfinite(features).all()
    )
    return features if ok else None


def cached_features(
    images: np.ndarray,
    extractor: InceptionFeatures,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """``extractor(images)`` (float64 [N, 2048]) for uint8 images [N, H, W, C], read from the
    cache in ``cache_dir`` (default ``$DESTATIC_CACHE/features``) when computed before."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be a uint8 numpy array [N, H, W, C], got "
            f"{getattr(images, 'dtype', type(images).__name__)} "
            f"of shape {getattr(images, 'shape', '?')}"
        )
    images = np.ascontiguousarray(images)
    name = f"{_images_key(images)[:20]}-{_network_key(extractor)[:12]}.npy"
    path = Path(cache_dir or cache_root() / "features") / name
    features = _read(path, len(images))
    if features is not None:
        return features
    features = extractor(images, progress=progress)
    try:
        write_atomic(path, lambda f: np.save(f, features, allow_pickle=False))
    except OSError as e:  # a cache that cannot be written only costs time
        warnings.warn(f"could not cache {path.name} ({e.strerror or e})", stacklevel=2)
    return features
