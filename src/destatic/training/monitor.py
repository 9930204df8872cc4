"""What a run shows while it trains: metrics (JSONL and TensorBoard), a loss-curve PNG and
sample grids with their prompts."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["Monitor", "plot_loss", "save_grid"]


class Monitor:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors the scalars to
    TensorBoard (``tb/``) when enabled and installed."""

    def __init__(self, folder: Path, tensorboard: bool = True):
        self.folder = folder
        self.path = folder / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn(
                    "TensorBoard logging is off: pip install tensorboard (metrics.jsonl is kept)",
                    stacklevel=2,
                )
            else:
                self.writer = SummaryWriter(str(folder / "tb"))

    def truncate(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run repeats them)."""
        if not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self.writer.add_scalar(k, v, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; none when it has not been written yet."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: skip it
            continue
    return records


def plot_loss(metrics: Path, out: Path) -> None:
    """Loss against step (raw and an exponential moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics) if "loss" in r]
    if not records:
        return
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    smooth, avg = [], loss[0]
    for v in loss:
        avg = 0.9 * avg + 0.1 * v
        smooth.append(avg)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label="moving average")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".tmp-{out.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out)


def save_grid(
    images: torch.Tensor, labels: list[str], out: Path, columns: int = 8, scale: int = 0
) -> None:
    """Images [B, 3, H, W] in [0, 1] in a grid, each with its label underneath."""
    from PIL import Image, ImageDraw, ImageFont

    b, _, h, w = images.shape
    scale = scale or max(1, 96 // max(h, w))
    cell_w, cell_h = w * scale, h * scale
    columns = min(columns, b)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out)
