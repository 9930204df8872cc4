"""What a run shows while it trains: metrics (JSONL and TensorBoard), a loss-curve PNG and
sample grids with their prompts (:func:`~destatic.data.sheets.save_grid`)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from destatic.data.sheets import save_grid
from destatic.io import atomic_file

__all__ = ["Monitor", "plot_loss", "save_grid"]


class Monitor:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors the scalars to
    TensorBoard (``tb/``) when enabled and installed."""

    def __init__(self, folder: Path, tensorboard: bool = True, purge_step: int | None = None):
        """``purge_step``: the first step this process logs; a resumed run passes it so that
        TensorBoard drops the records a killed run wrote from there on (no duplicate steps)."""
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
                self.writer = SummaryWriter(str(folder / "tb"), purge_step=purge_step)

    def truncate(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run repeats them)."""
        if not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))

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
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
