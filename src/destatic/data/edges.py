"""Control maps from images: Canny edges (Canny 1986) via scikit-image, as ControlNet's
"canny" models use them — white edges on black, replicated to 3 channels."""

from __future__ import annotations

import numpy as np

__all__ = ["canny_edges"]


def canny_edges(
    images: np.ndarray, sigma: float = 1.0, low: float | None = None, high: float | None = None
) -> np.ndarray:
    """uint8 images [N, H, W, 3] (or one [H, W, 3]) → uint8 edge maps of the same shape.

    ``sigma`` is the Gaussian blur before the gradient; ``low``/``high`` the hysteresis
    thresholds on the gradient magnitude of the [0, 1] grey image (scikit-image's defaults when
    None)."""
    try:
        from skimage.color import rgb2gray
        from skimage.feature import canny
    except ImportError as e:
        raise ImportError("edge maps need scikit-image: pip install scikit-image") from e
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images [N, H, W, 3], got {batch.dtype} {batch.shape}")
    grey = rgb2gray(batch)  # [N, H, W] in [0, 1]
    edges = np.stack([canny(g, sigma=sigma, low_threshold=low, high_threshold=high) for g in grey])
    out = np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1)
    return out[0] if single else out
