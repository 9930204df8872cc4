"""Reliability probe of the ``destatic`` command line: about 150 bad argument combinations
for ``generate``, ``export``, ``eval``, ``samplers``, ``lab`` and ``data``, each classified as

* **error**: a clean refusal (exit status 2, no traceback), the message shown with ``-v``;
* **traceback**: an uncaught exception;
* **ran**: exit status 0 (for a bad argument: silently ignored or guessed around);
* **exit N** / **hung**: another status, or still running after ``--timeout`` seconds.

    python benchmarks/reliability_cli.py              # the table of counts
    python benchmarks/reliability_cli.py -v           # and every case with its outcome
    python benchmarks/reliability_cli.py -k shard     # only cases whose name contains "shard"
    python benchmarks/reliability_cli.py --skip huge  # leave out cases whose name has "huge"

Cases run in-process (typer's ``CliRunner``) on the bundled model with ``--steps 1``, in a
temporary folder holding the broken inputs of ``tests/cli_fixtures.py``; a full disk and a
read-only folder are simulated there (``disk_full_after``, ``read_only``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from tests.cli_fixtures import (
    BROKEN_MODELS,
    broken_model,
    disk_full_after,
    latent_model,
    read_only,
    write_inputs,
)


@dataclass
class Case:
    """One command line; ``patch`` (if any) is entered around the run."""

    name: str
    args: list[str]
    patch: Callable[[], contextlib.AbstractContextManager] | None = None


def generate_cases(root: Path) -> list[Case]:
    """``destatic generate`` with bad arguments, inputs and models."""
    i, m, ro = root / "in", root / "models", root / "ro"
    g = ["generate", "x", "--steps", "1", "--no-progress"]
    out = ["-o", str(root / "work" / "o")]
    cases = [
        Case("gen no prompt", ["generate"]),
        Case("gen prompt and --from", [*g, "--from", str(i / "plain.png")]),
        Case("gen --from missing", ["generate", "--from", str(i / "missing.png")]),
        Case("gen --from plain png", ["generate", "--from", str(i / "plain.png")]),
        Case("gen --from junk png", ["generate", "--from", str(i / "junk.png")]),
        Case("gen --from text file", ["generate", "--from", str(i / "notes.txt")]),
        Case("gen --from folder", ["generate", "--from", str(i)]),
        Case("gen --from damaged params", ["generate", "--from", str(i / "damaged.png")]),
        Case("gen --from unknown sampler", ["generate", "--from", str(i / "bad-sampler.png")]),
        Case("gen --from negative steps", ["generate", "--from", str(i / "bad-steps.png")]),
        Case("gen --from missing model", ["generate", "--from", str(i / "bad-model.png")]),
        Case("gen unknown sampler", [*g, "--sampler", "bogus", *out]),
        Case("gen unknown grid", [*g, "--grid", "bogus", *out]),
        Case("gen steps 0", [*g, "--steps", "0", *out]),
        Case("gen steps negative", [*g, "--steps", "-3", *out]),
        Case("gen steps huge", [*g, "--steps", "1000000000", *out]),
        Case("gen steps not a number", [*g, "--steps", "abc", *out]),
        Case("gen size 0", [*g, "--size", "0", *out]),
        Case("gen size negative", [*g, "--size", "-32", *out]),
        Case("gen size with image", [*g, "--size", "32", "--image", str(i / "rgb.png"), *out]),
        Case("gen size huge", [*g, "--size", "100000", *out]),
        Case("gen size not a multiple", [*g, "--model", str(m / "latent"), "--size", "33", *out]),
        Case("gen guidance inf", [*g, "--guidance", "inf", *out]),
        Case("gen guidance nan", [*g, "--guidance", "nan", *out]),
        Case("gen guidance negative", [*g, "--guidance", "-1", *out]),
        Case("gen guidance huge", [*g, "--guidance", "1e39", *out]),
        Case("gen -n 0", [*g, "-n", "0", *out]),
        Case("gen -n negative", [*g, "-n", "-2", *out]),
        Case("gen seed negative", [*g, "--seed", "-1", *out]),
        Case("gen seed beyond 64 bits", [*g, "--seed", str(2**64), *out]),
        Case("gen upscale 0", [*g, "--upscale", "0", *out]),
        Case("gen upscale 17", [*g, "--upscale", "17", *out]),
        Case("gen strength without image", [*g, "--strength", "0.5", *out]),
        Case("gen strength 0", [*g, "--image", str(i / "rgb.png"), "--strength", "0", *out]),
        Case("gen strength nan", [*g, "--image", str(i / "rgb.png"), "--strength", "nan", *out]),
        Case("gen strength 2", [*g, "--image", str(i / "rgb.png"), "--strength", "2", *out]),
        Case("gen image missing", [*g, "--image", str(i / "missing.png"), *out]),
        Case("gen image text file", [*g, "--image", str(i / "notes.txt"), *out]),
        Case("gen image junk png", [*g, "--image", str(i / "junk.png"), *out]),
        Case("gen image a folder", [*g, "--image", str(i), *out]),
        Case("gen mask without image", [*g, "--mask", str(i / "mask16.png"), *out]),
        Case("gen mask missing", [*g, "--image", str(i / "rgb.png"), "--mask", "nope.png", *out]),
        Case(
            "gen mask size mismatch",
            [*g, "--image", str(i / "rgb.png"), "--mask", str(i / "mask16.png"), *out],
        ),
        Case(
            "gen mask text file",
            [*g, "--image", str(i / "rgb.png"), "--mask", str(i / "notes.txt"), *out],
        ),
        Case("gen control text file", [*g, "--control", str(i / "notes.txt"), *out]),
        Case("gen control missing", [*g, "--control", str(i / "missing.png"), *out]),
        Case("gen control wrong size", [*g, "--control", str(i / "mask16.png"), *out]),
        Case("gen controlnet without control", [*g, "--controlnet", str(m / "no_unet"), *out]),
        Case(
            "gen controlnet missing",
            [*g, "--controlnet", str(root / "nope"), "--control", str(i / "rgb.png"), *out],
        ),
        Case(
            "gen controlnet is a pipeline",
            [*g, "--controlnet", str(m / "no_scheduler"), "--control", str(i / "rgb.png"), *out],
        ),
        Case(
            "gen control window empty",
            [*g, "--control", str(i / "rgb.png"), "--control-start", "0.8", "--control-end", "0.2"],
        ),
        Case("gen control scale nan", [*g, "--control", str(i / "rgb.png"), "--control-scale=nan"]),
        Case("gen control scale inf", [*g, "--control", str(i / "rgb.png"), "--control-scale=inf"]),
        Case("gen canny without control", [*g, "--canny", *out]),
        Case("gen control end without control", [*g, "--control-end", "0.5", *out]),
        Case("gen variation seed alone", [*g, "--variation-seed", "3", *out]),
        Case(
            "gen --from with --steps",
            ["generate", "--from", str(i / "bad-steps.png"), "--steps", "2"],
        ),
        Case(
            "gen --from with --seed",
            ["generate", "--from", str(i / "bad-steps.png"), "--seed", "2"],
        ),
        Case(
            "gen --from -n without variation",
            ["generate", "--from", str(i / "bad-steps.png"), "-n", "2"],
        ),
        Case("gen variation strength without seed", [*g, "--variation-strength", "0.5", *out]),
        Case("gen variation strength nan", [*g, "--variation-strength", "nan", *out]),
        Case("gen model missing", [*g, "--model", str(root / "nope"), *out]),
        Case("gen model a file", [*g, "--model", str(i / "notes.txt"), *out]),
        Case("gen model empty folder", [*g, "--model", str(root / "work"), *out]),
        Case("gen lora missing", [*g, "--lora", str(i / "missing.safetensors"), *out]),
        Case("gen lora junk", [*g, "--lora", str(i / "junk.safetensors"), *out]),
        Case("gen lora wrong keys", [*g, "--lora", str(i / "wrong-keys.safetensors"), *out]),
        Case("gen lora a folder", [*g, "--lora", str(i), *out]),
        Case("gen lora scale nan", [*g, "--lora", f"{i / 'wrong-keys.safetensors'}:nan", *out]),
        Case("gen lora bad scale", [*g, "--lora", f"{i / 'wrong-keys.safetensors'}:big", *out]),
        Case("gen lora empty", [*g, "--lora", "", *out]),
        Case("gen preview is a file", [*g, "--preview", str(i / "notes.txt"), *out]),
        Case("gen out .png for 2 images", [*g, "-n", "2", "-o", str(root / "work" / "two.png")]),
        Case("gen out is a file", [*g, "-o", str(i / "notes.txt")]),
        Case("gen sheet is a folder", [*g, "--sheet", str(i), *out]),
        Case("gen out read-only", [*g, "-o", str(ro / "o")], lambda: read_only(ro)),
        Case("gen out .png read-only", [*g, "-o", str(ro / "a.png")], lambda: read_only(ro)),
        Case(
            "gen sheet read-only", [*g, "--sheet", str(ro / "s.png"), *out], lambda: read_only(ro)
        ),
        Case(
            "gen preview read-only", [*g, "--preview", str(ro / "p"), *out], lambda: read_only(ro)
        ),
        Case(
            "gen disk full", [*g, "-n", "4", "-o", str(root / "full")], lambda: disk_full_after(1)
        ),
        Case("gen disk full .png", [*g, "-o", str(root / "full.png")], lambda: disk_full_after(0)),
    ]
    for name in BROKEN_MODELS:  # the model's default steps: a broken default must show
        args = ["generate", "x", "--no-progress", "--model", str(m / name), *out]
        cases.append(Case(f"gen model {name}", args))
    return cases


def other_cases(root: Path) -> list[Case]:
    """``export``, ``eval``, ``samplers``, ``lab`` and ``data`` with bad arguments."""
    i, m, ro, w = root / "in", root / "models", root / "ro", root / "work"
    fast_eval = ["eval", "--n", "2", "--steps", "1", "--samplers", "euler", "--guidance-sweep", ""]
    fast_eval += ["--metrics", "retrieval", "-o", str(w / "eval")]
    fast_eval += ["--data", "folder", "--data-path", str(i / "captioned")]
    lab = ["lab", "--dims", "2", "--nfe", "4", "--sampler", "euler", "--samples", "16"]
    cases = [
        Case("export source missing", ["export", str(root / "nope"), str(w / "e")]),
        Case("export source a file", ["export", str(i / "notes.txt"), str(w / "e")]),
        Case("export source empty folder", ["export", str(w), str(w / "e")]),
        Case("export dest in a file", ["export", str(m / "no_unet"), str(i / "notes.txt" / "e")]),
        Case("export dest a file", ["export", str(m / "huge_sample_size"), str(i / "notes.txt")]),
        Case("export dest is source", ["export", str(m / "nan_weights"), str(m / "nan_weights")]),
        Case(
            "export dest read-only",
            ["export", str(m / "bad_default_steps"), str(ro / "e")],
            lambda: read_only(ro),
        ),
        Case("export component zero groups", ["export", str(m / "zero_groups" / "unet"), str(w)]),
        Case("export self shard", ["export", str(m / "self_shard"), str(w / "e2")]),
        Case("eval model missing", [*fast_eval, str(root / "nope")]),
        Case("eval model broken", [*fast_eval, str(m / "zero_groups")]),
        Case("eval unknown sampler", [*fast_eval, "--samplers", "bogus"]),
        Case("eval unknown guidance sampler", [*fast_eval, "--guidance-sampler", "bogus"]),
        Case("eval unknown grid", [*fast_eval, "--grid", "bogus"]),
        Case("eval steps 0", [*fast_eval, "--steps", "0"]),
        Case("eval steps not numbers", [*fast_eval, "--steps", "a,b"]),
        Case("eval steps empty", [*fast_eval, "--steps", ""]),
        Case("eval steps huge", [*fast_eval, "--steps", "1000000000"]),
        Case("eval guidance steps huge", [*fast_eval, "--guidance-steps", "1000000000"]),
        Case("eval guidance inf", [*fast_eval, "--guidance", "inf"]),
        Case("eval guidance sweep nan", [*fast_eval, "--guidance-sweep", "1,nan"]),
        Case("eval guidance sweep words", [*fast_eval, "--guidance-sweep", "low,high"]),
        Case("eval unknown metric", [*fast_eval, "--metrics", "bogus"]),
        Case("eval no metric", [*fast_eval, "--metrics", ","]),
        Case("eval unknown dataset", [*fast_eval, "--data", "bogus"]),
        Case("eval folder without path", [*fast_eval, "--data-path", ""]),
        Case("eval folder missing", [*fast_eval, "--data", "folder", "--data-path", "nope"]),
        Case("eval evaluator missing", [*fast_eval, "--evaluator", str(root / "nope")]),
        Case("eval evaluator broken", [*fast_eval, "--evaluator", str(m / "no_unet")]),
        Case("eval batch size 0", [*fast_eval, "--batch-size", "0"]),
        Case("eval out is a file", [*fast_eval, "-o", str(i / "notes.txt")]),
        Case("eval out read-only", [*fast_eval, "-o", str(ro / "e")], lambda: read_only(ro)),
        Case("samplers extra argument", ["samplers", "bogus"]),
        Case("lab unknown sampler", [*lab, "--sampler", "bogus"]),
        Case("lab unknown grid", [*lab, "--grid", "bogus"]),
        Case("lab dims 0", [*lab, "--dims", "0"]),
        Case("lab dims words", [*lab, "--dims", "two"]),
        Case("lab nfe 0", [*lab, "--nfe", "0"]),
        Case("lab nfe huge", [*lab, "--nfe", "1000000000"]),
        Case("lab nfe inf", [*lab, "--nfe", "inf"]),
        Case("lab samples 1", [*lab, "--samples", "1"]),
        Case("lab json read-only", [*lab, "--json", str(ro / "lab.json")], lambda: read_only(ro)),
        Case("lab json is a folder", [*lab, "--json", str(w)]),
        Case("data emoji size 0", ["data", "emoji", "--size", "0"]),
        Case("data emoji size words", ["data", "emoji", "--size", "big"]),
        Case("data clipart size negative", ["data", "clipart", "--size", "-4"]),
        Case("data unknown dataset", ["data", "bogus"]),
        Case("unknown command", ["bogus"]),
    ]
    return cases


def prepare(root: Path) -> list[Case]:
    """Write the broken inputs and models under ``root``; every case."""
    write_inputs(root / "in")
    for name in BROKEN_MODELS:
        broken_model(root / "models", name)
    latent_model(root / "models")
    for sub in ("work", "ro"):
        (root / sub).mkdir()
    return generate_cases(root) + other_cases(root)


class Hung(BaseException):
    """A case still running after the timeout (a BaseException: CliRunner keeps Exceptions)."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`Hung` in the main thread after ``seconds``."""

    def alarm(signum, frame):
        raise Hung

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def message(output: str) -> str:
    """The last meaningful line of a run's output (box-drawing borders stripped)."""
    lines = [line.strip(" │╭╮╰╯─") for line in output.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Try ", "Usage: "))]
    return lines[-1][:150] if lines else ""


def run_case(case: Case, root: Path, timeout: int) -> tuple[str, str]:
    """(outcome, message) of one case, run in ``root/work``."""
    from typer.testing import CliRunner

    from destatic.cli import app

    os.chdir(root / "work")
    patch = case.patch() if case.patch else contextlib.nullcontext()
    try:
        with time_limit(timeout), patch:
            result = CliRunner().invoke(app, case.args)
    except Hung:
        return "hung", f"still running after {timeout} s"
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        return "traceback", f"{type(exc).__name__}: {exc}".splitlines()[0][:150]
    if result.exit_code == 0:
        return "ran", message(result.output)
    outcome = "error" if result.exit_code == 2 else f"exit {result.exit_code}"
    return outcome, message(result.output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--skip", default=None, help="leave out cases whose name contains this")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per case")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    counts: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="destatic-probe-") as tmp:
        root = Path(tmp)
        cases = [c for c in prepare(root) if args.k in c.name]
        cases = [c for c in cases if args.skip is None or args.skip not in c.name]
        start = time.perf_counter()
        for case in cases:
            outcome, text = run_case(case, root, args.timeout)
            counts[outcome] += 1
            if args.verbose or outcome != "error":
                print(f"{outcome:9s} {case.name:38s} {text}", flush=True)
        os.chdir(Path(__file__).parents[1])
    elapsed = time.perf_counter() - start
    print("\n| outcome | cases |\n|---|---:|")
    for outcome in ("error", "traceback", "ran", "hung"):
        print(f"| {outcome} | {counts.pop(outcome, 0)} |")
    for outcome, n in sorted(counts.items()):
        print(f"| {outcome} | {n} |")
    print(f"| **total** | {len(cases)} |\n\n{len(cases)} cases in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
