"""Labelled image sheets: a grid of images, each with its caption underneath (a training run's
sample grids, ``destatic generate --sheet``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from destatic.io import write_atomic

__all__ = ["grid_image", "save_grid"]


def save_grid(
    images: torch.Tensor, labels: list[str], out: Path, columns: int = 8, scale: int = 0
) -> None:
    """Images [B, 3, H, W] in [0, 1] in a grid, each with its label underneath (a PNG)."""
    sheet = grid_image(images, labels, columns, scale)
    write_atomic(out, lambda f: sheet.save(f, format="PNG"))


def grid_image(images: torch.Tensor, labels: list[str], columns: int = 8, scale: int = 0):
    """The PIL image of :func:`save_grid`: images [B, 3, H, W] in [0, 1], each enlarged by
    ``scale`` (default: to about 96 pixels) with its label underneath, ``columns`` a row."""
    from PIL import Image, ImageDraw, ImageFont

    b, _, h, w = images.shape
    scale = scale or max(1, 96 // h)
    cell_w, cell_h = w * scale, h * scale
    columns = max(1, min(columns, b, round(columns * h / w)))  # wide film strips: fewer
    rows = math.ceil(b / columns)
    font = ImageFont.load_default()
    text_h = 28
    width = max(cell_w, 128)
    sheet = Image.new("RGB", (columns * width, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, (a, label) in enumerate(zip(arrays, labels, strict=True)):
        r, c = divmod(i, columns)
        tile = Image.fromarray(a).resize((cell_w, cell_h), Image.NEAREST)
        x0, y0 = c * width + (width - cell_w) // 2, r * (cell_h + text_h)
        sheet.paste(tile, (x0, y0))
        words, lines = label.split(), [""]
        for word in words:  # wrap to the cell width
            trial = f"{lines[-1]} {word}".strip()
            if draw.textlength(trial, font=font) <= width - 4 or not lines[-1]:
                lines[-1] = trial
            else:
                lines.append(word)
        draw.multiline_text(
            (c * width + 2, y0 + cell_h + 1), "\n".join(lines[:2]), fill="black", font=font
        )
    return sheet
