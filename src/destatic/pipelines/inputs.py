"""Image inputs as the pipeline takes them: files opened with one-line errors, images and
arrays as batched tensors in [0, 1], control images traced to edges, and :class:`Inputs`, a
request's inputs as tensors (built by :func:`destatic.pipelines.stages.prepare_inputs`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["ImageInput", "Inputs", "as_image_batch", "canny_map", "open_image", "per_image"]

ImageInput = Union[torch.Tensor, np.ndarray, "PIL.Image.Image", Sequence["PIL.Image.Image"]]


def open_image(path: str | os.PathLike, mode: str):
    """A PIL image in ``mode`` (its text chunks kept in ``.info``), or a ValueError naming the
    file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            converted = image.convert(mode)
            converted.info.update(image.info)
            return converted
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path} is not a readable image ({e})") from None


def canny_map(image):
    """A control image traced to Canny edges (RGB, white edges on black)."""
    from PIL import Image

    from destatic.data.edges import canny_edges

    return Image.fromarray(canny_edges(np.asarray(image.convert("RGB"))))


def as_image_batch(image: ImageInput, name: str, channels: int) -> torch.Tensor:
    """A PIL image (or list of them), a uint8 / float array [H, W, C] or [B, H, W, C], or a
    float tensor [B, C, H, W] / [C, H, W] in [0, 1] → float32 [B, channels, H, W] in [0, 1].
    A mask (``channels=1``) may come as an RGB or "L" image; its channels are averaged."""
    if isinstance(image, torch.Tensor):
        x = image.float()
        if x.ndim == 3:
            x = x[None]
    else:
        arrays = image if isinstance(image, (list, tuple)) else [image]
        if arrays and not isinstance(arrays[0], np.ndarray):
            mode = "L" if channels == 1 else "RGB"
            arrays = [np.asarray(a.convert(mode)) for a in arrays]
        a = np.stack([np.asarray(a) for a in arrays]) if len(arrays) > 1 else np.asarray(arrays[0])
        if a.ndim == 2 or (a.ndim == 3 and len(arrays) > 1 and arrays[0].ndim == 2):
            a = a[..., None]
        if a.ndim == 3:
            a = a[None]
        scale = 255.0 if a.dtype == np.uint8 else 1.0
        x = torch.from_numpy(np.array(a)).float().permute(0, 3, 1, 2) / scale
    if x.ndim != 4:
        raise ValueError(f"{name} must be [B, C, H, W] or one image, got {tuple(x.shape)}")
    if channels == 1 and x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels, expected {channels}")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"{name} values must lie in [0, 1] (uint8 arrays are scaled by 1/255)")
    return x


def per_image(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """One entry per generated image: a single entry is repeated, else counts must match."""
    if len(x) == batch:
        return x
    if len(x) == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"got {len(x)} {name}s for {batch} images; give one or one per image")


@dataclass
class Inputs:
    """A request's inputs as tensors, one entry per image, at the size it draws."""

    width: int
    height: int
    image: torch.Tensor | None = None  # [B, 3, H, W] in [0, 1]
    mask: torch.Tensor | None = None  # [B, 1, H, W], 1 = repaint
    control: torch.Tensor | None = None  # [B, C, H, W] control maps
    controlnet: nn.Module | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return (self.height, self.width)
