"""Shared by the training tests: captioned coloured squares, the tiny pixel-space U-Net trained on
them, a config that trains it in seconds, and comparisons of the weights that runs end with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from destatic.training import latest_checkpoint
from destatic.training.state import load_checkpoint

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}

#: A 16² pixel-space U-Net small enough to train for a few steps in a test (diffusers' names).
PIXEL_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=2,
    norm_num_groups=8,
    cross_attention_dim=384,
)


#: The [model.unet] table of :data:`PIXEL_UNET` for a training config.
TINY_UNET = """
[model.unet]
block_out_channels = [16, 32]
down_block_types = ["CrossAttnDownBlock2D", "DownBlock2D"]
up_block_types = ["UpBlock2D", "CrossAttnUpBlock2D"]
layers_per_block = 1
attention_head_dim = 2
norm_num_groups = 8
"""


def write_config(path: Path, folder: Path, out: Path, extra: str = "") -> Path:
    """A 6-step config of the tiny U-Net on ``folder`` writing to ``out`` (``extra``: more [train]
    lines, or further tables after them). fp32 unless ``extra`` sets ``precision``: the
    equivalence tests (accumulation, processes, FSDP) hold exactly only in fp32, and ``auto``
    would be bf16 on a CPU with AMX."""
    precision = "" if "precision" in extra else 'precision = "fp32"\n'
    path.write_text(
        f"""
[data]
dataset = "folder"
path = "{folder}"
size = 16

[model]
text_max_length = 8
{TINY_UNET}

[optim]
lr = 1e-3
warmup_steps = 2
schedule = "cosine"

[train]
steps = 6
batch_size = 4
checkpoint_every = 1
log_every = 1
sample_every = 0
threads = 1
progress = false
tensorboard = false
{precision}{extra}

[sample]
prompts = ["a red square", "a blue square"]
steps = 3

[output]
dir = "{out}"
"""
    )
    return path


def write_squares(root: Path, count: int, *, placed: bool = True) -> Path:
    """``count`` white 16² images with an 8² red, green or blue square (colours in turn; at
    random places when ``placed``, else centred) and ``name.txt`` captions "a red square"."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        name, rgb = list(COLOURS.items())[i % 3]
        a = np.full((16, 16, 3), 255, np.uint8)
        r0, c0 = rng.integers(0, 8, size=2) if placed else (4, 4)
        a[r0 : r0 + 8, c0 : c0 + 8] = rgb
        Image.fromarray(a).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a {name} square")
    return root


def final_weights(out: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """The model and EMA weights of a run's latest checkpoint, or of checkpoint ``step`` (EMA
    keys prefixed ``ema.``)."""
    root = out / "checkpoints"
    state = load_checkpoint(latest_checkpoint(root) if step is None else root / f"step-{step:08d}")
    return {**state["model"], **{f"ema.{k}": v for k, v in state["ema"].items()}}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0):
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, worst


def poison_losses(monkeypatch, task_cls: type, bad: Callable[[int], bool]) -> None:
    """Make ``task_cls.loss`` NaN on the calls ``n`` (counted from 1) where ``bad(n)``."""
    real = task_cls.loss
    calls = {"n": 0}

    def poisoned(self, model, batch, device):
        calls["n"] += 1
        loss = real(self, model, batch, device)
        return loss * float("nan") if bad(calls["n"]) else loss

    monkeypatch.setattr(task_cls, "loss", poisoned)


def kill_after_checkpoint(cfg_path: Path, out: Path, step: int) -> int:
    """Start ``destatic train cfg_path`` in a process, SIGKILL it once checkpoint ``step`` (or a
    later one) is written under ``out``, and return the step of its newest checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "destatic.cli", "train", str(cfg_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pointer = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if pointer.is_file() and pointer.read_text().strip() >= f"step-{step:08d}":
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return load_checkpoint(latest_checkpoint(out / "checkpoints"))["step"]
