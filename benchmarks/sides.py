"""Speed comparisons run side by side, each (case, side) in a fresh Python process: the
machinery benchmarks/video.py and benchmarks/audio.py share.

A script builds its cases in the parent process (a model folder, what each side is asked, and
the tensors both start from: :func:`save_case`), then :func:`measure_side` runs the script again
as a child (``--side S --case NAME --work DIR``) for each side. The child (:func:`run_side`)
loads the model through the script's ``draw_call(case, side, tensors) -> Draw``, draws once (the
warm-up, saved as ``NAME-SIDE.npy`` for :func:`max_difference`), times ``--repeats`` more draws
and prints one JSON line: the median seconds (wall clock, and the process's CPU time, all
threads: less sensitive to other processes on a shared machine), the peak resident set
(``resource.getrusage(...).ru_maxrss``: torch's allocations included, which ``tracemalloc``
does not see), the resident set just before the first draw (Python, torch, the library and the
weights) and the median of any named parts of a draw the script timed (:attr:`Draw.parts`).
:func:`bench` prints the header (CPU model and flags, load average), runs the cases in a
temporary folder and writes the markdown table and its JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.families import load_average

SIDES = ("destatic", "diffusers")


@dataclass
class Draw:
    """One side's drawing function, its model loaded: ``run()`` returns the media as a numpy
    array; ``run`` may append the seconds of named pieces of a draw to ``parts`` (e.g. the
    decoder's), reported as medians over the timed draws; ``info`` (JSON) is passed on as it
    is (e.g. the model's sample rate)."""

    run: Callable[[], np.ndarray]
    parts: dict[str, list[float]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def seeded(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def rss_mib() -> float:
    """This process's resident set now (MiB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def save_case(work: Path, name: str, case: dict) -> dict:
    """Write ``case`` for the children: its ``tensors`` as ``NAME.safetensors``, the rest (JSON)
    as ``NAME.json``; returns the case without its tensors."""
    from safetensors.torch import save_file

    case = dict(case)
    tensors = {k: v.contiguous().clone() for k, v in case.pop("tensors", {}).items()}
    save_file(tensors, str(work / f"{name}.safetensors"))
    (work / f"{name}.json").write_text(json.dumps(case))
    return case


def run_side(
    work: Path,
    name: str,
    side: str,
    repeats: int,
    threads: int,
    draw_call: Callable[[dict, str, dict], Draw],
) -> None:
    """The child process: load, draw once (saved for the comparison), time ``repeats`` more;
    prints one JSON line (module docstring)."""
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    case = json.loads((work / f"{name}.json").read_text())
    tensors = load_file(str(work / f"{name}.safetensors"))
    with torch.no_grad():
        draw = draw_call(case, side, tensors)
        loaded = rss_mib()
        np.save(work / f"{name}-{side}.npy", draw.run())
        for times in draw.parts.values():
            times.clear()  # the warm-up's
        times, cpu_times = [], []
        for _ in range(repeats):
            t, cpu = time.perf_counter(), time.process_time()
            draw.run()
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    parts = {k: statistics.median(v) for k, v in draw.parts.items() if v}
    result = {
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "peak_mib": peak,
        "loaded_mib": loaded,
    }
    print(json.dumps({**result, "parts": parts, "info": draw.info}))


def measure_side(script: str, work: Path, name: str, side: str, settings: dict) -> dict:
    """:func:`run_side` of ``script`` in a fresh interpreter; its JSON line."""
    cmd = [sys.executable, script, "--side", side, "--case", name, "--work", str(work)]
    cmd += ["--repeats", str(settings["repeats"]), "--threads", str(settings["threads"])]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} on {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_sides(
    script: str, work: Path, name: str, sides: Iterable[str], settings: dict
) -> dict[str, dict]:
    """Side → :func:`measure_side`, taken ``settings["rounds"]`` times (default 1) in turn
    (A B A B …), each side's fastest round kept: on a shared machine a burst of load then
    slows a round rather than a whole side."""
    best: dict[str, dict] = {}
    for _ in range(settings.get("rounds", 1)):
        for side in sides:
            got = measure_side(script, work, name, side, settings)
            if side not in best or got["seconds"] < best[side]["seconds"]:
                best[side] = got
    return best


def max_difference(work: Path, name: str, scale: float = 1.0) -> float:
    """The largest absolute difference between the two sides' warm-up draws, times ``scale``."""
    a, b = (np.load(work / f"{name}-{side}.npy") for side in SIDES)
    if a.shape != b.shape:
        raise RuntimeError(f"{name}: destatic drew {a.shape}, diffusers {b.shape}")
    return float(np.abs(a.astype(np.float64) - b).max() * scale)


def add_child_options(parser: argparse.ArgumentParser, cases: Iterable[str] | None) -> None:
    """The hidden options a child process is started with (``cases``: the names ``--case``
    takes; None: any)."""
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    choices = None if cases is None else list(cases)
    parser.add_argument("--case", choices=choices, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)


def bench(
    title: str,
    machine: str,
    header: str,
    table_line: Callable[[dict], str],
    measure: Callable[[Path], list[dict]],
    markdown: Path | None,
    method: str,
    settings: dict,
) -> None:
    """Print the header, run ``measure(work)`` (it prints its rows) in a temporary folder, then
    write the table (``header``, then ``table_line(row)`` per row) to ``markdown`` and the rows
    to the ``.json`` beside it (unless ``markdown`` is None).
    ``method`` is the sentence or two saying how the figures were taken."""
    load_before = load_average()
    print(f"# {title}\n\n{machine}\nload average before: {load_before}\n")
    print(header, flush=True)
    work = Path(tempfile.mkdtemp(prefix="destatic_bench_"))
    try:
        rows = measure(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = load_average()
    print(f"\nload average after: {load_after}")
    if markdown is None:
        return
    run = {
        "command": " ".join([f"python benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "finished_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine,
        "settings": settings,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.with_suffix(".json").write_text(json.dumps({"run": run, "rows": rows}, indent=2))
    markdown.write_text(
        f"# {title}\n\n`{run['command']}` ({run['finished_utc']}). {machine}. {method} "
        f"Load average (1, 5, 15 min) before: {load_before}; after: {load_after}; the last "
        "column is the 1-minute load as the row finished.\n\n"
        f"{header}\n" + "\n".join(map(table_line, rows)) + "\n"
    )
    print(f"wrote {markdown} and {markdown.with_suffix('.json')}")
