"""``[train] parallel = "fsdp"``: two CPU processes (gloo) with FSDP2 against one process — the
same losses, weights and EMA — and checkpoints that move between the modes and resume exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from destatic.io.video import write_video
from destatic.training import ConfigError, load_config, train
from tests.test_video import moving_square
from tests.test_video import write_config as write_video_config
from tests.training_fixtures import (
    COLOURS,
    assert_same,
    final_weights,
    write_config,
    write_squares,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo via torchrun on POSIX")

#: [train] lines of every run here: every checkpoint kept.
EXTRA = "keep_checkpoints = 3"
FSDP = "train.parallel=fsdp"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_squares(tmp_path_factory.mktemp("shapes"), 24)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _torchrun(cfg: Path, *sets: str) -> None:
    """``destatic train cfg`` in 2 gloo processes with ``--set`` overrides ``sets``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(29500 + (os.getpid() + 7) % 1000)]
    cmd += ["-m", "destatic.cli", "train", str(cfg), "--set", "train.steps=3"]
    for s in sets:
        cmd += ["--set", s]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _curve(out: Path) -> list[float]:
    """The loss and (clipped-from) gradient norm of every step."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines for key in ("loss", "grad_norm")]


def _from_checkpoint(source: Path, step: int, out: Path) -> None:
    """A new run folder ``out`` holding only checkpoint ``step`` of run ``source``."""
    name = f"step-{step:08d}"
    shutil.copytree(source / "checkpoints" / name, out / "checkpoints" / name)


@pytest.fixture(scope="module")
def one(folder, tmp_path_factory) -> Path:
    """The reference: 3 steps in one process (global batch 4, no accumulation)."""
    root = tmp_path_factory.mktemp("one")
    cfg = load_config(write_config(root / "c.toml", folder, root / "run", EXTRA))
    cfg.train.steps = 3
    train(cfg)
    return root / "run"


def test_fsdp_two_processes_match_one(folder, one, tmp_path):
    """FSDP over 2 gloo processes × 2 accumulation steps (one row each) = one process: loss and
    gradient-norm curve (norms > grad_clip, so clipping acts), weights and EMA at every
    checkpoint; its step-2 checkpoint resumes in one process to the same final weights."""
    cfg = write_config(tmp_path / "c.toml", folder, tmp_path / "fsdp", EXTRA)
    _torchrun(cfg, FSDP, "train.grad_accum=2", "train.sample_every=2")
    fsdp = tmp_path / "fsdp"
    assert _curve(fsdp) == pytest.approx(_curve(one), rel=1e-5, abs=1e-7)
    for step in (1, 2, 3):  # whole tensors in the checkpoints, as one process writes them
        assert_same(final_weights(one, step), final_weights(fsdp, step), atol=1e-5)
    assert (fsdp / "model" / "unet").is_dir()
    assert (fsdp / "samples" / "step-00000002.png").is_file()  # gathered mid-run too

    _from_checkpoint(fsdp, 2, tmp_path / "resumed")
    resumed = load_config(write_config(tmp_path / "d.toml", folder, tmp_path / "resumed"))
    resumed.train.steps = 3
    train(resumed)
    assert_same(final_weights(one), final_weights(tmp_path / "resumed"), atol=1e-5)


@pytest.mark.slow
def test_checkpoints_move_from_one_process_to_fsdp_to_ddp(folder, one, tmp_path):
    """One process's step-1 checkpoint resumes under FSDP; that run's step-2 checkpoint resumes
    under DDP: both end with one process's weights."""
    _from_checkpoint(one, 1, tmp_path / "fsdp")
    _torchrun(write_config(tmp_path / "c.toml", folder, tmp_path / "fsdp", EXTRA), FSDP)
    assert_same(final_weights(one), final_weights(tmp_path / "fsdp"), atol=1e-5)
    _from_checkpoint(tmp_path / "fsdp", 2, tmp_path / "ddp")
    _torchrun(write_config(tmp_path / "d.toml", folder, tmp_path / "ddp", EXTRA))
    assert_same(final_weights(one), final_weights(tmp_path / "ddp"), atol=1e-5)


@pytest.mark.slow
def test_video_task_under_fsdp_matches_one_process(tmp_path):
    """The video DiT (its transformer block sharded apart from the rest) under FSDP = one
    process."""
    clips = tmp_path / "clips"
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for d, word in ((1, "right"), (-1, "left")):
            path = write_video(clips / f"{name}-{word}-{i}.gif", moving_square(rgb, d))
            path.with_suffix(".txt").write_text(f"a {name} square moves {word}")
    cfg = write_video_config(tmp_path / "c.toml", clips, tmp_path / "one")
    train(load_config(cfg, {"train.steps": 3}))
    cfg = write_video_config(tmp_path / "d.toml", clips, tmp_path / "fsdp")
    _torchrun(cfg, FSDP)
    assert _curve(tmp_path / "fsdp") == pytest.approx(_curve(tmp_path / "one"), rel=1e-5)
    assert_same(final_weights(tmp_path / "one"), final_weights(tmp_path / "fsdp"), atol=1e-5)


def test_fsdp_in_one_process_is_the_plain_run(folder, one, tmp_path):
    cfg = load_config(
        write_config(tmp_path / "c.toml", folder, tmp_path / "run", EXTRA),
        {"train.parallel": "fsdp", "train.steps": 3},
    )
    train(cfg)
    assert_same(final_weights(one), final_weights(tmp_path / "run"))


def test_unknown_parallel_mode_is_one_line(folder, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.parallel = 'zero3': choose one of ddp, fsdp"):
        load_config(
            write_config(tmp_path / "c.toml", folder, tmp_path / "run", 'parallel = "zero3"')
        )
