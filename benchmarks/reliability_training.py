"""Reliability probe of ``destatic train`` on the tiny test run (tests/training_fixtures.py):

* **kills**: an unbroken ``destatic train`` in a subprocess gives the reference; then each of
  ``--kills`` runs is SIGKILLed at a random moment of its training (after the imports), and
  each of ``--targeted`` runs as soon as ``checkpoints/latest`` names the final checkpoint (the
  export comes right after). The same command is run again to completion, and its final weights
  (model, EMA) are compared bit for bit with the reference, and ``model/`` with its final EMA
  weights. The table counts where the kills landed (judged from what the run left on disk) and
  whether the rerun ended identical, with its ``model/``.
* **damage**: a copy of the reference run as if killed after its step-4 checkpoint, with that
  checkpoint (or the pointer, the exported model, …) damaged in one of 47 ways, then the same
  command again (in-process, typer's ``CliRunner``). Each case is

  - **error**: a clean refusal (exit status 2, one ``error:`` line, no traceback);
  - **recovered**: exit 0 and the same final weights as the reference (damage that loses
    nothing, e.g. a deleted checkpoint: the run resumes from the one before);
  - **silent**: exit 0 with other weights or no ``model/`` (a wrong result without a word);
  - **traceback**: an uncaught exception.

  Cases marked "(checksums rewritten)" also rewrite ``checksums.json`` to match, as a buggy
  writer would: only the content checks can tell then. The ``model/`` cases load the exported
  folder with ``load_component`` instead.

    python benchmarks/reliability_training.py                # 20 + 3 kills, every damage case
    python benchmarks/reliability_training.py --kills 5 -v   # and each case with its message
    python benchmarks/reliability_training.py --kills 0 --targeted 0 -k step
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from tests.training_fixtures import write_config, write_squares

STEPS = 6  # the run of tests.training_fixtures: a checkpoint every step
STOP = 4  # the damage cases resume from this checkpoint
EXTRA = "keep_checkpoints = 9"  # every checkpoint kept: the damaged one has predecessors


# ---------------------------------------------------------------------------------------------
# runs and their results


def weights(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    """Model and EMA weights of checkpoint ``step`` of the run in ``out``."""
    from destatic.training.state import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / f"step-{step:08d}")
    return {**state["model"], **{f"ema.{k}": v for k, v in state["ema"].items()}}


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def exported_ok(out: Path) -> bool:
    """``model/`` holds the EMA weights of the final checkpoint."""
    from destatic.io import CheckpointError, load_weights

    try:
        exported = load_weights(out / "model" / "unet")
    except CheckpointError:
        return False
    ema = weights(out)
    return identical(exported, {k[11:]: v for k, v in ema.items() if k.startswith("ema.module.")})


def final_result(out: Path, reference: dict[str, torch.Tensor]) -> str:
    """ "identical" when the run in ``out`` ended with the reference weights and its model/."""
    from destatic.io import CheckpointError

    try:
        same = identical(weights(out), reference)
    except (CheckpointError, OSError):
        return "no final checkpoint"
    if not same:
        return "other weights"
    return "identical" if exported_ok(out) else "no model/"


def cli_train(config: Path) -> tuple[int, str, BaseException | None]:
    """(exit code, output, uncaught exception) of ``destatic train config`` in-process."""
    from typer.testing import CliRunner

    from destatic.cli import app

    result = CliRunner().invoke(app, ["train", str(config)])
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.output, exc


# ---------------------------------------------------------------------------------------------
# kills


def start_cli(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "destatic.cli", "train", str(config)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(done: Callable[[], bool], proc: subprocess.Popen) -> float:
    """Block until ``done()`` or until ``proc`` ended; the time then."""
    while not done() and proc.poll() is None:
        time.sleep(0.002)
    return time.perf_counter()


def final_checkpoint_named(out: Path) -> Callable[[], bool]:
    """Whether ``latest`` names the final checkpoint (the export comes right after)."""
    pointer = out / "checkpoints" / "latest"
    return lambda: pointer.is_file() and pointer.read_text().strip() == f"step-{STEPS:08d}"


PHASES = [
    "before the first checkpoint",
    "mid-run, after a checkpoint",
    "after the final checkpoint, before model/",
    "writing the final grid and plot",
    "finished before the kill",
]


def phase(out: Path, steps: int = STEPS) -> str:
    """Where a killed run stood, from what it left on disk."""
    from destatic.training.state import checkpoint_step, latest_checkpoint

    latest = latest_checkpoint(out / "checkpoints")
    if latest is None:
        return PHASES[0]
    step = checkpoint_step(latest)
    if step < steps:
        return PHASES[1]
    record = out / "model" / "export.json"
    if not record.is_file() or json.loads(record.read_text()).get("step") != steps:
        return PHASES[2]
    if (
        not (out / "loss.png").is_file()
        or not (out / "samples" / f"step-{steps:08d}.png").is_file()
    ):
        return PHASES[3]
    return PHASES[4]


@dataclass
class Kill:
    phase: str
    result: str


def unbroken(root: Path, folder: Path, name: str) -> tuple[Path, float]:
    """An unbroken ``destatic train`` subprocess: (its output folder, its time from the end of
    its imports, when the output folder appears, to its last sample grid)."""
    out = root / name
    proc = start_cli(write_config(root / f"{name}.toml", folder, out, EXTRA))
    t0 = wait_for(out.exists, proc)
    t1 = wait_for((out / "samples" / f"step-{STEPS:08d}.png").exists, proc)
    proc.wait()
    return out, t1 - t0


def kill_runs(
    root: Path, folder: Path, n: int, targeted: int, rng: random.Random
) -> tuple[list[Kill], float]:
    """The reference run, then ``n`` runs killed at random moments and ``targeted`` ones killed
    as soon as the final checkpoint is named, each run again to completion: (their outcomes,
    the training time of an unbroken run with warm caches, over which the moments are spread)."""
    from destatic.training import load_config, train

    reference_out, _ = unbroken(root, folder, "reference")  # also fills the caption cache
    reference = weights(reference_out)
    again, span = unbroken(root, folder, "again")
    assert identical(weights(again), reference), "two unbroken runs differ"
    shutil.rmtree(again)
    kills = []
    for i in range(n + targeted):
        out = root / f"kill-{i:03d}"
        config = write_config(root / f"kill-{i:03d}.toml", folder, out, EXTRA)
        proc = start_cli(config)
        if i < n:
            wait_for(out.exists, proc)
            time.sleep(rng.uniform(0, 1.1 * span))
        else:
            wait_for(final_checkpoint_named(out), proc)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        where = phase(out)
        try:
            train(load_config(config))  # the same command again
            result = final_result(out, reference)
        except Exception as e:  # reported, not raised
            result = f"rerun failed: {type(e).__name__}: {str(e)[:80]}"
        kills.append(Kill(where, result))
        how = "random" if i < n else "at the final checkpoint"
        print(f"kill {i:3d} ({how}): {where:45s} {result}", flush=True)
        shutil.rmtree(out)
    return kills, span


# ---------------------------------------------------------------------------------------------
# damage


def _flip(path: Path, offsets: Callable[[int, int], list[int]]) -> None:
    """XOR 0x10 into the bytes of ``path`` at ``offsets(header_end, size)``."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    for i in offsets(8 + n, len(data)):
        data[i] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path, share: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * share)])


def _huge_length(path: Path) -> None:
    """The 8-byte header length claims 2.9 GB."""
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2_900_000_000) + data[8:])


def _huge_tensor(path: Path, name: str) -> None:
    """The header declares only ``name``, as 725 M floats (2.9 GB), and the file is that long
    (sparse: nothing stored)."""
    size = 2_900_000_000
    raw = json.dumps({name: {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}})
    path.write_bytes(struct.pack("<Q", len(raw)) + raw.encode())
    os.truncate(path, 8 + len(raw) + size)


def _edit_state(
    folder: Path,
    skeleton: Callable[[dict], None] | None = None,
    tensors: Callable[[dict], None] | None = None,
    checksums: bool = True,
) -> None:
    """Edit a checkpoint's state.json / state.safetensors (``checksums``: record matching
    checksums, as a buggy writer would)."""
    from safetensors.torch import load_file, save_file

    from destatic.io import write_checksums

    if skeleton is not None:
        data = json.loads((folder / "state.json").read_text())
        skeleton(data)
        (folder / "state.json").write_text(json.dumps(data))
    if tensors is not None:
        state = load_file(str(folder / "state.safetensors"))
        tensors(state)
        save_file(state, str(folder / "state.safetensors"))
    if checksums:
        write_checksums(folder, ["state.safetensors", "state.json"])


def _setter(*keys, value) -> Callable[[dict], None]:
    """Set ``data[k0][k1]… = value`` (``value=...``: delete the entry)."""

    def edit(data: dict) -> None:
        for k in keys[:-1]:
            data = data[k]
        if value is ...:
            del data[keys[-1]]
        else:
            data[keys[-1]] = value

    return edit


def _tensors(prefix: str, change: Callable[[torch.Tensor], torch.Tensor]):
    """Apply ``change`` to every tensor whose key starts with ``prefix``."""

    def edit(state: dict) -> None:
        for k in [k for k in state if k.startswith(prefix)]:
            state[k] = change(state[k]).contiguous()

    return edit


def _first_moment(state: dict) -> None:
    key = next(k for k in state if "exp_avg" in k)
    state[key] = state[key].flatten()[:1].clone()


def _replace(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


def _middle(h: int, n: int) -> list[int]:
    return [(h + n) // 2]


def _spread(h: int, n: int) -> list[int]:
    return list(range(h, n, (n - h) // 16))[:16]


@dataclass
class Damage:
    """One way of damaging the run, applied to ``where``: "ckpt" the step-STOP checkpoint
    folder, "run" the output folder (stopped after step STOP), "finished" the output folder of
    the finished run, "model" its exported unet folder (loaded rather than trained on)."""

    name: str
    where: str
    apply: Callable[[Path], object]


S, J, W = "state.safetensors", "state.json", "diffusion_pytorch_model.safetensors"
CKPTS, LATEST, RECORD = "checkpoints", "checkpoints/latest", "export.json"


def _ckpt(name: str, fn: Callable[[Path], object]) -> Damage:
    return Damage(name, "ckpt", fn)


def _rewritten(name: str, **edit) -> Damage:
    return Damage(f"{name} (checksums rewritten)", "ckpt", lambda f: _edit_state(f, **edit))


def _all_checkpoints(out: Path) -> None:
    for step in range(1, STOP + 1):
        _flip(out / CKPTS / f"step-{step:08d}" / S, _middle)


def _drop_stop(out: Path) -> None:
    shutil.rmtree(out / CKPTS / f"step-{STOP:08d}")


def _huge_model(unet: Path) -> None:
    (unet / "checksums.json").unlink()
    _huge_tensor(unet / W, "conv_in.weight")


def _double(t: torch.Tensor) -> torch.Tensor:
    return t * 2


def _lr_string(data: dict) -> None:
    data["optimizer"]["param_groups"][0]["lr"] = "0.001"


DAMAGES = [
    _ckpt("flip 1 byte in tensor data", lambda f: _flip(f / S, _middle)),
    _ckpt("flip 16 bytes in tensor data", lambda f: _flip(f / S, _spread)),
    _ckpt("flip 1 byte in the tensor header", lambda f: _flip(f / S, lambda h, n: [h // 2])),
    _ckpt("truncate tensors to half", lambda f: _truncate(f / S, 0.5)),
    _ckpt("truncate tensors to 0 bytes", lambda f: _truncate(f / S, 0)),
    _ckpt("tensors: garbage", lambda f: (f / S).write_bytes(os.urandom(4096))),
    _ckpt("tensors: header length 2.9 GB", lambda f: _huge_length(f / S)),
    _ckpt("tensors: declared 2.9 GB tensor, sparse file", lambda f: _huge_tensor(f / S, "step")),
    _ckpt("tensors deleted", lambda f: (f / S).unlink()),
    _ckpt("state.json deleted", lambda f: (f / J).unlink()),
    _ckpt("state.json truncated", lambda f: _truncate(f / J, 0.5)),
    _ckpt("state.json: flip 1 byte", lambda f: _flip(f / J, lambda h, n: [n // 2])),
    _ckpt("state.json: a list", lambda f: (f / J).write_text("[]")),
    _ckpt("state.json: step 4 -> 3 by hand", lambda f: _replace(f / J, '"step": 4,', '"step": 3,')),
    _ckpt("checksums.json deleted", lambda f: (f / "checksums.json").unlink()),
    _ckpt("checksums.json garbage", lambda f: (f / "checksums.json").write_text("{nope")),
    _rewritten("step -5", skeleton=_setter("step", value=-5)),
    _rewritten("step 30", skeleton=_setter("step", value=30)),
    _rewritten("step 1e9", skeleton=_setter("step", value=1e9)),
    _rewritten("step '4' (a string)", skeleton=_setter("step", value="4")),
    _rewritten("bad_steps -1", skeleton=_setter("bad_steps", value=-1)),
    _rewritten("model tensors int32", tensors=_tensors("model.", lambda t: t.round().int())),
    _rewritten("model tensors float64", tensors=_tensors("model.", lambda t: t.double())),
    _rewritten("ema tensors int64", tensors=_tensors("ema.module.", lambda t: t.long())),
    _rewritten("an optimizer moment reshaped", tensors=_first_moment),
    _rewritten("optimizer state emptied", skeleton=_setter("optimizer", "state", value={})),
    _rewritten("optimizer lr a string", skeleton=_lr_string),
    _rewritten("scheduler state emptied", skeleton=_setter("scheduler", value={})),
    _rewritten("scheduler last_epoch 1", skeleton=_setter("scheduler", "last_epoch", value=1)),
    _rewritten("ema n_averaged lost", skeleton=_setter("ema", "n_averaged", value=...)),
    _rewritten("rng state lost", skeleton=_setter("rng", value=...)),
    _rewritten("rng state shortened", tensors=_tensors("rng.generator", lambda t: t[:100])),
    _rewritten("model weights NaN", tensors=_tensors("model.conv_in", lambda t: t * math.nan)),
    _rewritten(
        "[model] config changed", skeleton=_setter("config", "model", "text_max_length", value=9)
    ),
    _rewritten("weights x2 (consistent, other values)", tensors=_tensors("model.", _double)),
    Damage("every checkpoint damaged", "run", _all_checkpoints),
    Damage("checkpoint folder deleted", "run", _drop_stop),
    Damage("latest names a missing folder", "run", lambda o: (o / LATEST).write_text("step-99")),
    Damage("latest: garbage", "run", lambda o: (o / LATEST).write_bytes(os.urandom(64))),
    Damage("a half-written .tmp-step folder", "run", lambda o: (o / CKPTS / ".tmp-step-5").mkdir()),
    Damage("model/ deleted", "finished", lambda o: shutil.rmtree(o / "model")),
    Damage("model/ of step 5", "finished", lambda o: _replace(o / RECORD, "6", "5")),
    Damage("export.json garbage", "finished", lambda o: (o / RECORD).write_text("{")),
    Damage("model/unet: flip 1 byte in weights", "model", lambda u: _flip(u / W, _middle)),
    Damage("model/unet: truncated weights", "model", lambda u: _truncate(u / W, 0.5)),
    Damage("model/unet: declared 2.9 GB tensor, sparse, no checksums", "model", _huge_model),
    Damage(
        "model/unet: config edited (norm groups 7)",
        "model",
        lambda u: _replace(u / "config.json", '"norm_num_groups": 8', '"norm_num_groups": 7'),
    ),
]  # fmt: skip


def stopped_copy(reference: Path, out: Path, folder: Path, finished: bool) -> Path:
    """A copy of the reference run at ``out`` (killed after checkpoint STOP unless
    ``finished``), and its config."""
    shutil.copytree(reference, out)
    if not finished:
        for step in range(STOP + 1, STEPS + 1):
            shutil.rmtree(out / "checkpoints" / f"step-{step:08d}")
        (out / "checkpoints" / "latest").write_text(f"step-{STOP:08d}\n")
    return write_config(out.with_suffix(".toml"), folder, out, EXTRA)


def one_line_error(code: int, output: str) -> str | None:
    """The message of a clean refusal, else None."""
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    if code == 2 and len(errors) == 1 and "Traceback" not in output:
        return errors[0][7:]
    return None


def run_damage(case: Damage, root: Path, folder: Path, reference: dict) -> tuple[str, str]:
    """(outcome, message) of one damage case."""
    from destatic.io import CheckpointError
    from destatic.models.registry import load_component

    out = root / "case"
    shutil.rmtree(out, ignore_errors=True)
    config = stopped_copy(root / "reference", out, folder, case.where in ("finished", "model"))
    if case.where == "model":
        case.apply(out / "model" / "unet")
        try:
            load_component(out / "model" / "unet")
        except CheckpointError as e:
            return ("error", str(e)) if "\n" not in str(e) else ("traceback", str(e))
        except Exception as e:  # reported
            return "traceback", f"{type(e).__name__}: {e}"
        return (
            ("recovered", "loads intact") if exported_ok(out) else ("silent", "loads other weights")
        )
    case.apply(out / "checkpoints" / f"step-{STOP:08d}" if case.where == "ckpt" else out)
    code, output, exc = cli_train(config)
    if exc is not None:
        return "traceback", f"{type(exc).__name__}: {exc}"
    message = one_line_error(code, output)
    if message is not None:
        return "error", message
    if code != 0:
        return f"exit {code}", output.strip().splitlines()[-1] if output.strip() else ""
    result = final_result(out, reference)
    return ("recovered" if result == "identical" else "silent"), result


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="runs SIGKILLed at random (20)")
    parser.add_argument(
        "--targeted", type=int, default=3, help="runs SIGKILLed at the final checkpoint (3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="of the kill moments")
    parser.add_argument("-k", default="", help="only damage cases whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every damage case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="destatic-train-probe-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("DESTATIC_CACHE", str(root / "cache"))
        folder = write_squares(root / "shapes", 12)
        kills, span = kill_runs(root, folder, args.kills, args.targeted, random.Random(args.seed))
        print(f"\nan unbroken run: {STEPS} steps, {span:.1f} s from its imports to its last grid")
        print("\n| where the kill landed | kills | rerun identical, with model/ |\n|---|---:|---:|")
        by_phase = Counter(k.phase for k in kills)
        for where in sorted(by_phase, key=PHASES.index):
            ok = sum(k.phase == where and k.result == "identical" for k in kills)
            print(f"| {where} | {by_phase[where]} | {ok} |")
        good = sum(k.result == "identical" for k in kills)
        print(f"| **total** | {len(kills)} | {good} |\n")

        reference = weights(root / "reference")
        cases = [c for c in DAMAGES if args.k in c.name]
        counts: Counter[str] = Counter()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("| damage | outcome | message |\n|---|---|---|")
        for case in cases:
            outcome, text = run_damage(case, root, folder, reference)
            counts[outcome] += 1
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            grew = f" (peak RSS +{(peak - rss) / 1024:.0f} MB)" if peak - rss > 100 * 1024 else ""
            rss = max(rss, peak)
            shown = text.replace(str(root), "$TMP")[:200] if args.verbose else ""
            print(f"| {case.name} | {outcome}{grew} | {shown} |", flush=True)
    print("\n| outcome | damage cases |\n|---|---:|")
    for outcome in ("error", "recovered", "silent", "traceback"):
        print(f"| {outcome} | {counts.pop(outcome, 0)} |")
    for outcome, n in sorted(counts.items()):
        print(f"| {outcome} | {n} |")
    print(f"| **total** | {len(cases)} |")
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
