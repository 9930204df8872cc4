"""Bad command lines end in a one-line ``error: …`` with exit status 2, before any sampling
where possible, and never lose results: the cases of benchmarks/reliability_cli.py that once
gave tracebacks, ran silently or lost images."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from destatic.cli import app
from tests.cli_fixtures import (
    BROKEN_MODELS,
    broken_model,
    disk_full_after,
    latent_model,
    read_only,
    write_inputs,
)

GEN = ["generate", "x", "--steps", "1", "--no-progress"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Broken inputs in ``in/``, broken models in ``models/``, an empty ``ro/`` folder."""
    root = tmp_path_factory.mktemp("reliability")
    write_inputs(root / "in")
    for name in BROKEN_MODELS:
        broken_model(root / "models", name)
    latent_model(root / "models")
    (root / "ro").mkdir()
    return root


def run(root: Path, args: list[str], tmp_path: Path, monkeypatch) -> object:
    """The CLI on ``args`` ({in}, {models}, {ro}, {out} filled in), run in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    dirs = {"in": root / "in", "models": root / "models", "ro": root / "ro", "out": tmp_path}
    return CliRunner().invoke(app, [a.format(**dirs) for a in args])


def assert_refused(result, fragment: str) -> None:
    """Exit status 2, no traceback, and ``fragment`` in the one ``error:`` line (or, for a
    refusal by the option parser, in its usage message)."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"{type(exc).__name__}: {exc}"
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    if errors:
        assert len(errors) == 1 and fragment in errors[0], result.output
    else:  # typer's usage box wraps the text
        assert fragment in " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


REFUSED = {
    # NonFiniteError: refused up front, or one line when a model produces NaN
    "guidance inf": ([*GEN, "--guidance", "inf"], "--guidance"),
    "guidance nan": ([*GEN, "--guidance", "nan"], "--guidance"),
    "guidance beyond float32": ([*GEN, "--guidance", "1e39"], "--guidance"),
    "nan weights": ([*GEN, "--model", "{models}/nan_weights"], "NaN or inf"),
    # corrupt model folders
    "shard index names itself": ([*GEN, "--model", "{models}/self_shard"], "as a shard"),
    "norm_num_groups 0": ([*GEN, "--model", "{models}/zero_groups"], "norm_num_groups"),
    "groups not dividing": ([*GEN, "--model", "{models}/groups_not_dividing"], "must divide"),
    "sample_size 100000": ([*GEN, "--model", "{models}/huge_sample_size"], "sample_size"),
    "negative channels": ([*GEN, "--model", "{models}/negative_channels"], "block_out_channels"),
    "zero heads": ([*GEN, "--model", "{models}/zero_heads"], "attention_head_dim"),
    "channels as text": ([*GEN, "--model", "{models}/channels_as_text"], "in_channels"),
    # sizes and options that used to run or be ignored
    "size 0": ([*GEN, "--size", "0"], "--size"),
    "size 100000": ([*GEN, "--size", "100000"], "--size"),
    "size not a multiple": ([*GEN, "--model", "{models}/latent", "--size", "33"], "multiple of 2"),
    "size with image": ([*GEN, "--size", "32", "--image", "{in}/rgb.png"], "drop --size"),
    "strength without image": ([*GEN, "--strength", "0.5"], "--strength needs --image"),
    "canny without control": ([*GEN, "--canny"], "--canny needs --control"),
    "variation seed alone": ([*GEN, "--variation-seed", "3"], "needs --variation-strength"),
    "control scale inf": ([*GEN, "--control", "{in}/rgb.png", "--control-scale=inf"], "finite"),
    "lora scale nan": ([*GEN, "--lora", "{in}/wrong-keys.safetensors:nan"], "finite"),
    "from with steps": (["generate", "--from", "{in}/bad-steps.png", "--steps", "2"], "--steps"),
    "from with -n": (["generate", "--from", "{in}/bad-steps.png", "-n", "2"], "--variation"),
    "seed negative": ([*GEN, "--seed", "-1"], "--seed"),
    # outputs: decided before sampling
    "png out for 2 images": ([*GEN, "-n", "2", "-o", "{out}/two.png"], "names one PNG"),
    "out is a file": ([*GEN, "-o", "{in}/notes.txt"], "is a file"),
    "preview is a file": ([*GEN, "--preview", "{in}/notes.txt", "-o", "{out}"], "is a file"),
    "sheet is a folder": ([*GEN, "--sheet", "{in}", "-o", "{out}"], "is a folder"),
    "export onto its source": (
        ["export", "{models}/nan_weights", "{models}/nan_weights/"],
        "source",
    ),
    "export into a file": (["export", "{models}/no_unet", "{in}/notes.txt"], "is a file"),
    "export zero groups": (["export", "{models}/zero_groups/unet", "{out}/e"], "norm_num_groups"),
    "export self shard": (["export", "{models}/self_shard", "{out}/e"], "as a shard"),
    "lab json is a folder": (["lab", "--nfe", "4", "--json", "{in}"], "is a folder"),
}
EVAL = ["eval", "--n", "2", "--steps", "1", "--samplers", "euler", "--guidance-sweep", ""]
EVAL += ["--metrics", "retrieval", "--data", "folder", "--data-path", "{in}/captioned"]
BROKEN_EVAL = [*EVAL, "{models}/zero_groups"]
REFUSED |= {
    "eval broken model": ([*EVAL, "{models}/zero_groups", "-o", "{out}/e"], "norm_num_groups"),
    "eval missing data folder": ([*EVAL, "--data-path", "{out}/nope", "-o", "{out}/e"], "folder"),
    # checked before the (here broken) model is loaded
    "eval unknown metric": ([*BROKEN_EVAL, "--metrics", "bogus", "-o", "{out}/e"], "metric"),
    "eval unknown grid": ([*BROKEN_EVAL, "--grid", "bogus", "-o", "{out}/e"], "unknown grid"),
    "eval guidance sweep nan": ([*EVAL, "--guidance-sweep", "1,nan", "-o", "{out}/e"], "finite"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_bad_command_lines_are_refused_in_one_line(root, tmp_path, monkeypatch, case):
    args, fragment = REFUSED[case]
    assert_refused(run(root, args, tmp_path, monkeypatch), fragment)


READ_ONLY = {
    "generate folder": [*GEN, "-o", "{ro}/o"],
    "generate png": [*GEN, "-o", "{ro}/a.png"],
    "generate sheet": [*GEN, "--sheet", "{ro}/s.png", "-o", "{out}"],
    "generate preview": [*GEN, "--preview", "{ro}/p", "-o", "{out}"],
    "export": ["export", "{models}/bad_default_steps", "{ro}/e"],
    "eval": [*EVAL, "-o", "{ro}/e"],
    "lab json": ["lab", "--nfe", "4", "--sampler", "euler", "--json", "{ro}/lab.json"],
}


@pytest.mark.parametrize("case", READ_ONLY, ids=list(READ_ONLY))
def test_read_only_outputs_are_refused_before_any_work(root, tmp_path, monkeypatch, case):
    with read_only(root / "ro"):
        result = run(root, READ_ONLY[case], tmp_path, monkeypatch)
    assert_refused(result, "read-only file system")
    assert "sampling" not in result.output  # refused before the model ran
    assert not any((root / "ro").iterdir())


def test_a_full_disk_keeps_the_images_already_written(root, tmp_path, monkeypatch):
    with disk_full_after(1):
        result = run(root, [*GEN, "-n", "4", "-o", "{out}/full"], tmp_path, monkeypatch)
    assert_refused(result, "disk full")
    written = tmp_path / "full" / "000-x-seed0.png"
    assert f"kept 1 of 4 images: {written}" in result.output
    assert [p.name for p in (tmp_path / "full").iterdir()] == [written.name]  # no partial file
    assert Image.open(written).size == (32, 32)


def test_a_full_disk_leaves_no_partial_png(root, tmp_path, monkeypatch):
    with disk_full_after(0):
        result = run(root, [*GEN, "-o", "{out}/a.png"], tmp_path, monkeypatch)
    assert_refused(result, "none of the 1 images was written")
    assert list(tmp_path.iterdir()) == []


def test_a_png_in_a_new_folder_is_written(root, tmp_path, monkeypatch):
    result = run(root, [*GEN, "-o", "{out}/new/sub/a.png"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "new" / "sub" / "a.png").size == (32, 32)


def test_write_png_atomic_keeps_the_old_file_on_failure(tmp_path):
    from destatic.pipelines.output import write_png_atomic

    path = tmp_path / "a.png"
    write_png_atomic(path, Image.new("RGB", (4, 4), "red"))
    with disk_full_after(0), pytest.raises(OSError) as err:
        write_png_atomic(path, Image.new("RGB", (4, 4), "blue"))
    assert err.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    assert np.asarray(Image.open(path))[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    ("config", "change", "fragment"),
    [
        ("unet", {"norm_num_groups": 0}, "norm_num_groups must be a positive integer"),
        ("unet", {"norm_num_groups": 5}, "must divide every block_out_channels"),
        ("unet", {"sample_size": 100_000}, "sample_size=100000 is beyond 4096"),
        ("unet", {"attention_head_dim": 64}, "exceeds the 32 channels"),
        ("unet", {"layers_per_block": [1, 0]}, "layers_per_block"),
        ("vae", {"block_out_channels": [16, 0]}, "block_out_channels"),
        ("vae", {"scaling_factor": 0}, "scaling_factor"),
        ("vae", {"sample_size": 10_000}, "sample_size"),
        ("mmdit", {"patch_size": 0}, "patch_size"),
        ("mmdit", {"pos_embed_max_size": 100_000}, "pos_embed_max_size"),
        ("mmdit", {"sample_size": 1}, "smaller than one patch"),
        ("controlnet", {"conditioning_channels": 0}, "conditioning_channels"),
    ],
)
def test_model_configs_from_files_are_validated(config, change, fragment):
    from destatic.models.autoencoder import AutoencoderConfig
    from destatic.models.controlnet import ControlNetConfig
    from destatic.models.mmdit import MMDiTConfig
    from destatic.models.unet import UNetConfig
    from tests import tiny_sd

    kind, base = {
        "unet": (UNetConfig, tiny_sd.UNET),
        "vae": (AutoencoderConfig, tiny_sd.VAE),
        "mmdit": (MMDiTConfig, tiny_sd.MMDIT),
        "controlnet": (ControlNetConfig, tiny_sd.UNET),
    }[config]
    kind.from_diffusers(dict(base))  # the tiny configs themselves are valid
    with pytest.raises(ValueError, match=re.escape(fragment)):
        kind.from_diffusers({**base, **change})
