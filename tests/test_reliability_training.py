"""Training under failure: a kill between the final checkpoint and the export, a full or read-only
disk, checkpoints damaged in ways safetensors cannot see (flipped bits, integer tensors, bad
steps, a lost scheduler state), model files whose header claims more than they hold, configs
that cannot build a network, TensorBoard across a resume and the modes of what a run writes.
Each ends in one line or the right result, and nothing is lost."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from destatic.io import CheckpointError, load_weights, write_checksums
from destatic.models.registry import load_component, save_component
from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.training import ConfigError, TrainingError, load_config, train
from destatic.training import trainer as trainer_module
from destatic.training.state import DamagedCheckpoint, latest_checkpoint, load_checkpoint
from tests.cli_fixtures import read_only
from tests.training_fixtures import (
    PIXEL_UNET,
    assert_same,
    final_weights,
    write_config,
    write_squares,
)

STEPS = 4


class Killed(BaseException):
    """Stands for a kill in the middle of a run (nothing after it runs but ``finally``)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_squares(tmp_path_factory.mktemp("shapes"), 12)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


#: The tiny run of tests.training_fixtures shortened to ``STEPS`` steps, every checkpoint kept.
RUN = {"train.steps": STEPS, "train.keep_checkpoints": 9}


def _config(folder: Path, out: Path, extra: str = "", **overrides):
    """The config of :data:`RUN` on ``folder`` writing to ``out`` (saved as ``out.toml``)."""
    path = write_config(out.with_suffix(".toml"), folder, out, extra)
    return load_config(path, {**RUN, **overrides})


@pytest.fixture(scope="module")
def straight(folder, tmp_path_factory) -> Path:
    """A finished, never interrupted run: checkpoints step-1 … step-4, model/, samples, plot."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(_config(folder, out))
    return out


def _copy_run(run: Path, out: Path) -> Path:
    """A copy of the run in ``run`` at ``out``, with its config (``out.toml``) writing there."""
    shutil.copytree(run, out)
    text = run.with_suffix(".toml").read_text().replace(f'"{run}"', f'"{out}"')
    out.with_suffix(".toml").write_text(text)
    return out


@pytest.fixture
def stopped(straight, tmp_path) -> Path:
    """The straight run as if killed after its step-3 checkpoint (step-4 gone)."""
    out = _copy_run(straight, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / "latest").write_text("step-00000003\n")
    return out


def _resume(out: Path, **overrides) -> Path:
    """The same command again (the run's config, with ``overrides``)."""
    return train(load_config(out.with_suffix(".toml"), {**RUN, **overrides}))


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _assert_exported(out: Path, steps: int = STEPS) -> None:
    """model/ holds the EMA of the final checkpoint; the final grid and the plot are there."""
    ema = load_checkpoint(latest_checkpoint(out / "checkpoints"))["ema"]
    exported = load_weights(out / "model" / "unet")
    assert_same(exported, {k[7:]: v for k, v in ema.items() if k.startswith("module.")})
    assert json.loads((out / "export.json").read_text()) == {"step": steps}
    assert (out / "samples" / f"step-{steps:08d}.png").is_file()
    assert (out / "loss.png").is_file()


# ---------------------------------------------------------------------------------------------
# 1. a kill after the final checkpoint


def test_a_kill_between_final_checkpoint_and_export_then_rerun_exports(
    folder, tmp_path, monkeypatch
):
    """Killed right after the final checkpoint (the only one): no model/ yet; the same command
    again trains nothing and writes model/, the last grid and loss.png."""
    out = tmp_path / "run"
    cfg = _config(folder, out, **{"train.checkpoint_every": STEPS})
    real = trainer_module._Run.export

    def killed(self):
        raise Killed

    monkeypatch.setattr(trainer_module._Run, "export", killed)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(trainer_module._Run, "export", real)
    assert latest_checkpoint(out / "checkpoints").name == f"step-{STEPS:08d}"
    assert not (out / "model").exists()
    metrics = (out / "metrics.jsonl").read_text()
    assert train(cfg) == out / "model"
    _assert_exported(out)
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing trained again


@pytest.mark.slow
def test_sigkill_between_final_checkpoint_and_export_then_rerun_exports(folder, tmp_path):
    """A real SIGKILL right after the final checkpoint: the rerun trains nothing and writes
    model/, the last sample grid and loss.png."""
    cfg = write_config(tmp_path / "c.toml", folder, tmp_path / "run")
    driver = (
        "import os, signal, sys\n"
        "from destatic.training import load_config, train, trainer\n"
        "trainer._Run.export = lambda self: os.kill(os.getpid(), signal.SIGKILL)\n"
        "train(load_config(sys.argv[1], {'train.steps': 2, 'train.checkpoint_every': 2}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", driver, str(cfg)], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    out = tmp_path / "run"
    assert latest_checkpoint(out / "checkpoints").name == "step-00000002"
    assert not (out / "model").exists()
    train(load_config(cfg, {"train.steps": 2, "train.checkpoint_every": 2}))
    _assert_exported(out, steps=2)


@pytest.mark.parametrize("lost", ["model", "stale model", "samples and plot"])
def test_a_finished_run_always_ends_with_its_outputs(straight, tmp_path, lost):
    """Whatever a kill after the final checkpoint left out (no model/, the model/ of an earlier
    checkpoint, no grid or plot), the rerun writes it, without a training step."""
    out = _copy_run(straight, tmp_path / "run")
    if lost == "model":
        shutil.rmtree(out / "model")
    elif lost == "stale model":
        (out / "export.json").write_text('{"step": 3}')
        ema3 = load_checkpoint(out / "checkpoints" / "step-00000003")["ema"]
        unet = UNet2DCondition(UNetConfig(**PIXEL_UNET))
        unet.load_state_dict({k[7:]: v for k, v in ema3.items() if k.startswith("module.")})
        save_component(unet, out / "model" / "unet", class_name="UNet2DCondition", config={})
    else:
        shutil.rmtree(out / "samples")
        (out / "loss.png").unlink()
    metrics = (out / "metrics.jsonl").read_text()
    assert _resume(out) == out / "model"
    _assert_exported(out)
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing trained again


# ---------------------------------------------------------------------------------------------
# 2. full and read-only disks


def _no_space(*args, **kwargs):
    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
        'left on device" })'
    )


def test_a_full_disk_at_a_checkpoint_is_one_line_naming_the_last_good_one(
    folder, tmp_path, monkeypatch
):
    """safetensors' own error (not an OSError) at the third checkpoint: one line, the step-2
    checkpoint named and intact, no temporary folder left; the CLI prints just that line."""
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def filling(tensors, path, *args, **kwargs):
        if Path(path).parent.parent.name == "checkpoints":
            calls["n"] += 1
            if calls["n"] == 3:
                _no_space()
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", filling)
    cfg = write_config(tmp_path / "c.toml", folder, tmp_path / "run")
    from typer.testing import CliRunner

    from destatic.cli import app

    result = CliRunner().invoke(app, ["train", str(cfg), "--set", "train.steps=4"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "No space left on device" in line
    good = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert str(good) in line
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") == good
    assert load_checkpoint(good)["step"] == 2
    leftovers = [p.name for p in (tmp_path / "run").rglob(".tmp-*")]
    assert leftovers == []


def test_a_full_disk_while_saving_a_model_is_one_line(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _no_space)
    unet = UNet2DCondition(UNetConfig(**PIXEL_UNET))
    with pytest.raises(CheckpointError) as err:
        save_component(unet, tmp_path / "unet", class_name="UNet2DCondition", config={})
    assert "No space left on device" in _one_line(err)
    assert os.listdir(tmp_path / "unet") == []


def test_a_read_only_output_dir_is_one_line_before_training(folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = _config(folder, out)
    with read_only(out), pytest.raises(ConfigError) as err:
        train(cfg)
    message = _one_line(err)
    assert "not writable" in message and "Read-only file system" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="chmod does not stop root")
def test_a_chmod_read_only_output_dir_is_one_line(folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = _config(folder, out)
    out.chmod(0o555)
    try:
        with pytest.raises(ConfigError) as err:
            train(cfg)
    finally:
        out.chmod(0o755)
    assert "not writable" in _one_line(err)


def test_a_disk_turning_read_only_mid_run_is_one_line(folder, tmp_path, monkeypatch):
    """The disk goes read-only right after the first checkpoint: the export fails with one line
    naming that checkpoint, which stays intact."""
    out = tmp_path / "run"
    cfg = _config(folder, out)
    real = trainer_module.save_checkpoint

    with contextlib.ExitStack() as later:

        def then_read_only(*args, **kwargs):
            saved = real(*args, **kwargs)
            later.enter_context(read_only(out))
            return saved

        monkeypatch.setattr(trainer_module, "save_checkpoint", then_read_only)
        with pytest.raises(TrainingError) as err:
            train(cfg)
    message = _one_line(err)
    assert "Read-only file system" in message
    assert str(out / "checkpoints" / "step-00000001") in message
    assert load_checkpoint(latest_checkpoint(out / "checkpoints"))["step"] == 1
    assert not list(out.rglob(".tmp-*"))


# ---------------------------------------------------------------------------------------------
# 3. damaged checkpoints


def _rewrite(folder: Path, *, skeleton=None, tensors=None) -> None:
    """Change a checkpoint's state.json / state.safetensors and record matching checksums, as a
    buggy writer would: only the content checks can tell then."""
    if skeleton is not None:
        data = json.loads((folder / "state.json").read_text())
        skeleton(data)
        (folder / "state.json").write_text(json.dumps(data))
    if tensors is not None:
        state = load_file(str(folder / "state.safetensors"))
        tensors(state)
        save_file(state, str(folder / "state.safetensors"))
    write_checksums(folder, ["state.safetensors", "state.json"])


def _flip_tensor_bytes(folder: Path) -> None:
    path = folder / "state.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    for i in range(8 + n + 1000, len(data), len(data) // 7):  # inside the tensor data
        data[i] ^= 0x10
    path.write_bytes(bytes(data))


def _to_int(state: dict[str, torch.Tensor]) -> None:
    for k in [k for k in state if k.startswith("model.")]:
        state[k] = state[k].round().to(torch.int32)


def _set(key: str, value):
    return lambda data: data.__setitem__(key, value)


def _shrink_a_moment(state: dict[str, torch.Tensor]) -> None:
    key = next(k for k in state if "exp_avg" in k)
    state[key] = state[key][:1]


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped bytes in tensor data": (_flip_tensor_bytes, "does not match its SHA-256"),
    "step edited, checksum kept": (
        lambda f: (f / "state.json").write_text(
            (f / "state.json").read_text().replace('"step": 3', '"step": 30')
        ),
        "state.json does not match its SHA-256",
    ),
    "checksums lost": (lambda f: (f / "checksums.json").unlink(), "checksums.json is missing"),
    "int tensors": (lambda f: _rewrite(f, tensors=_to_int), "expected float32"),
    "step -5": (lambda f: _rewrite(f, skeleton=_set("step", -5)), "step = -5"),
    "step 30": (lambda f: _rewrite(f, skeleton=_set("step", 30)), "step = 30 but the folder"),
    "step 1e9": (lambda f: _rewrite(f, skeleton=_set("step", 1e9)), "step = 1000000000.0"),
    "empty scheduler": (lambda f: _rewrite(f, skeleton=_set("scheduler", {})), "scheduler."),
    "scheduler behind": (
        lambda f: _rewrite(f, skeleton=lambda d: d["scheduler"].__setitem__("last_epoch", 1)),
        "scheduler.last_epoch = 1",
    ),
    "optimizer state emptied": (
        lambda f: _rewrite(f, skeleton=lambda d: d["optimizer"].__setitem__("state", {})),
        "optimizer.state is empty after 3 steps",
    ),
    "ema keys lost": (
        lambda f: _rewrite(f, skeleton=lambda d: d["ema"].pop("n_averaged")),
        "ema.n_averaged is missing",
    ),
    "optimizer moments reshaped": (
        lambda f: _rewrite(f, tensors=_shrink_a_moment),
        "optimizer.state.",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_one_line_naming_the_previous_good_one(stopped, damage):
    corrupt, expected = DAMAGE[damage]
    damaged = stopped / "checkpoints" / "step-00000003"
    corrupt(damaged)
    with pytest.raises(DamagedCheckpoint) as err:
        _resume(stopped)
    message = _one_line(err)
    assert expected in message, message
    previous = stopped / "checkpoints" / "step-00000002"
    assert f"delete {damaged} to resume from the previous good checkpoint {previous}" in message


def test_following_the_advice_resumes_to_the_same_weights(straight, stopped):
    damaged = stopped / "checkpoints" / "step-00000003"
    _flip_tensor_bytes(damaged)
    with pytest.raises(DamagedCheckpoint):
        _resume(stopped)
    shutil.rmtree(damaged)
    _resume(stopped)
    assert_same(final_weights(straight, STEPS), final_weights(stopped, STEPS))
    _assert_exported(stopped)


def test_a_garbage_latest_pointer_falls_back_to_the_newest_checkpoint(straight, stopped):
    (stopped / "checkpoints" / "latest").write_bytes(b"\x88\xff../../elsewhere\n")
    _resume(stopped)
    assert_same(final_weights(straight, STEPS), final_weights(stopped, STEPS))


def test_a_step_past_train_steps_is_refused(stopped):
    with pytest.raises(ConfigError) as err:
        _resume(stopped, **{"train.steps": 2})
    assert "is at step 3, past train.steps = 2" in _one_line(err)


def test_a_checkpoint_of_the_first_format_still_resumes(straight, stopped):
    """Written before checksums existed: no checksums.json and no format key; it resumes."""
    for step in (1, 2, 3):
        folder = stopped / "checkpoints" / f"step-{step:08d}"
        data = json.loads((folder / "state.json").read_text())
        del data["__format__"]
        (folder / "state.json").write_text(json.dumps(data))
        (folder / "checksums.json").unlink()
    _resume(stopped)
    assert_same(final_weights(straight, STEPS), final_weights(stopped, STEPS))


# ---------------------------------------------------------------------------------------------
# 3b, 4. model folders: checksums, dtypes and headers that claim more than the file


@pytest.fixture
def unet_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    unet = UNet2DCondition(UNetConfig(**PIXEL_UNET))
    config = UNetConfig(**PIXEL_UNET).to_dict()
    save_component(unet, tmp_path / "unet", class_name="UNet2DCondition", config=config)
    return tmp_path / "unet"


def test_a_flipped_byte_in_saved_weights_is_caught(unet_folder):
    assert json.loads((unet_folder / "checksums.json").read_text())["sha256"].keys() == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
    }
    load_component(unet_folder)  # intact: loads
    path = unet_folder / "diffusion_pytorch_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_component(unet_folder)
    assert "does not match its SHA-256" in _one_line(err)
    (unet_folder / "checksums.json").unlink()  # a diffusers folder has none: loads unverified
    load_component(unet_folder)


def test_integer_tensors_in_model_weights_are_refused(unet_folder):
    path = unet_folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["conv_in.weight"] = state["conv_in.weight"].to(torch.int32)
    save_file(state, str(path))
    (unet_folder / "checksums.json").unlink()
    with pytest.raises(CheckpointError) as err:
        load_component(unet_folder)
    assert "dtype mismatches conv_in.weight: expected float vs file integer" in _one_line(err)


def test_a_header_claiming_gigabytes_is_refused_before_reading(unet_folder, monkeypatch):
    """A weights file whose header declares conv_in.weight as 725 M floats (2.9 GB) and that is
    that long (sparse: nothing stored): refused from the header, no tensor read."""
    (unet_folder / "checksums.json").unlink()
    size = 2_900_000_000
    entry = {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}
    raw = json.dumps({"conv_in.weight": entry}).encode()
    path = unet_folder / "diffusion_pytorch_model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + size)
    import safetensors.torch

    def never(*args, **kwargs):
        raise AssertionError("the tensors were read")

    monkeypatch.setattr(safetensors.torch, "load_file", never)
    with pytest.raises(CheckpointError) as err:
        load_component(unet_folder)
    message = _one_line(err)
    assert "do not fit" in message and "conv_in.weight: expected (16, 3, 3, 3)" in message


# ---------------------------------------------------------------------------------------------
# 5. configs that cannot build a network or have no data


def test_norm_groups_that_do_not_divide_the_widths_fail_when_the_config_is_read(folder, tmp_path):
    text = write_config(tmp_path / "c.toml", folder, tmp_path / "run").read_text()
    (tmp_path / "c.toml").write_text(text.replace("norm_num_groups = 8", "norm_num_groups = 7"))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.toml")
    assert "norm_num_groups" in _one_line(err)


@pytest.mark.parametrize("data", ["missing", "empty"])
def test_a_missing_or_empty_image_folder_is_one_line(tmp_path, data):
    images = tmp_path / "images"
    if data == "empty":
        images.mkdir()
        (images / "notes.txt").write_text("no images here")
    cfg = load_config(write_config(tmp_path / "c.toml", images, tmp_path / "run"))
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert "data.path" in _one_line(err)
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# 6. TensorBoard across a resume, and the modes of what a run writes


def _tensorboard_steps(tb: Path) -> list[int]:
    """The steps of the "loss" scalars TensorBoard shows: event files in order, each purge
    marker (SessionLog START at step s) dropping the records at s and later."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    files = [list(EventFileLoader(str(p)).Load()) for p in tb.glob("events.out.tfevents.*")]
    steps: list[int] = []
    for events in sorted(files, key=lambda e: e[0].wall_time):
        for event in events:
            if event.session_log.status == SessionLog.START:
                steps = [s for s in steps if s < event.step]
            if any(v.tag == "loss" for v in event.summary.value):
                steps.append(event.step)
    return steps


def test_tensorboard_shows_each_step_once_after_a_resume(folder, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    cfg = _config(folder, out, **{"train.tensorboard": True, "train.checkpoint_every": 2})
    real = trainer_module._Run.train_step

    def crash_at_step_4(self):
        if self.step == 3:
            raise Killed  # after logging step 3; the last checkpoint is step 2
        return real(self)

    monkeypatch.setattr(trainer_module._Run, "train_step", crash_at_step_4)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(trainer_module._Run, "train_step", real)
    train(cfg)
    assert _tensorboard_steps(out / "tb") == [1, 2, 3, 4]


def test_outputs_have_the_normal_modes(straight):
    mask = os.umask(0o022)
    os.umask(mask)
    folders = [straight / "model", straight / "model" / "unet"]
    folders += list((straight / "checkpoints").glob("step-*"))
    for path in folders:
        assert path.stat().st_mode & 0o777 == 0o777 & ~mask, path
    files = [p for f in folders for p in f.iterdir() if p.is_file()]
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
