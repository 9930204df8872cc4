"""Seconds per clip and peak memory of the video pipelines: destatic against diffusers on the
same tiny random folders, sampler, steps, guidance and initial latents (CPU, fp32, 2 threads
unless ``--threads``; on a busy machine 2 threads can be many times slower than 1).

    python benchmarks/video.py            # 16 frames (Wan: 17) of 64×64, 10 steps, median of 3
    python benchmarks/video.py --quick    # 4 frames (Wan: 5) of 32×32, 2 steps, 1 run: a check

Families (the tiny folders the tests build, from tests/):

* Wan 2.1 — ``WanPipeline`` + ``UniPCMultistepScheduler`` (flow sigmas, shift 3) against the
  family's defaults (``uni_pc`` on ``sgm_uniform``: the same grid), guidance 5; frames 4k + 1;
* AnimateDiff — ``AnimateDiffPipeline`` (SD U-Net + MotionAdapter, DDIM) against ``ddim`` on
  that scheduler's grid, guidance 7.5; the VAE decodes the frames as images on both sides.

Each (family, library) runs in a fresh Python process that loads the saved folder, draws one
clip (the warm-up, whose frames are compared), then times ``--repeats`` more: its peak memory is
the process's peak resident set (``resource.getrusage(...).ru_maxrss``: torch's allocations
included, which ``tracemalloc`` does not see), and "− loaded" subtracts the resident set just
before the first clip (Python, torch, the library and the weights), which leaves about what
sampling and decoding add. The last columns: the ratio of the seconds (above 1: destatic
faster) and the largest pixel difference (0–255) between the two libraries' frames.

Results go to benchmarks/results/video.md and .json (none with ``--quick`` unless
``--markdown`` says where).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.families import cpu_line, load_average
from benchmarks.generation import THREADS

RESULTS = Path(__file__).parent / "results" / "video.md"
PROMPT = "a red apple"
FULL = {"frames": 16, "size": 64, "steps": 10, "repeats": 3, "threads": THREADS}
QUICK = {"frames": 4, "size": 32, "steps": 2, "repeats": 1, "threads": THREADS}


# -- the folders and what each side is asked (built once, in the parent process) ----------------


def wan_case(tmp: Path, frames: int, size: int, steps: int) -> dict:
    """The tiny WanPipeline of tests/test_pipeline_wan.py (UniPC) and both sides' arguments:
    the family's defaults on our side draw diffusers' UniPC grid."""
    import diffusers

    from tests import tiny_sd
    from tests.test_pipeline_wan import TINY_VAE, TINY_WAN, UNIPC, _pipeline, _umt5

    frames = frames // 4 * 4 + 1  # 4k + 1, as WanPipeline draws
    torch.manual_seed(0)
    encoder, tokenizer = _umt5()
    reference = _pipeline(
        dict(
            tokenizer=tokenizer,
            text_encoder=tiny_sd.perturb(encoder).eval(),
            transformer=tiny_sd.perturb(diffusers.WanTransformer3DModel(**TINY_WAN)).eval(),
            vae=tiny_sd.perturb(diffusers.AutoencoderKLWan(**TINY_VAE)).eval(),
        ),
        diffusers.UniPCMultistepScheduler(**UNIPC),
    )
    reference.save_pretrained(tmp / "wan", safe_serialization=True)
    latent = size // 8
    z = torch.randn(1, 16, 1 + (frames - 1) // 4, latent, latent, generator=_seeded())
    common = {"negative_prompt": "", "num_frames": frames, "width": size, "height": size}
    return {
        "family": "Wan 2.1",
        "diffusers": "WanPipeline + UniPC",
        "pipeline": "WanPipeline",
        "folder": str(tmp / "wan"),
        "frames": frames,
        "tensors": {"noise": z, "latents": z},  # the flow state at t = 1 is the noise itself
        "ours": {**common, "steps": steps, "guidance": 5.0},
        "theirs": {**common, "num_inference_steps": steps, "guidance_scale": 5.0},
    }


def animatediff_case(tmp: Path, frames: int, size: int, steps: int) -> dict:
    """The tiny AnimateDiffPipeline of tests/test_pipeline_animatediff.py (DDIM) and both
    sides' arguments: ``ddim`` on the σ of the scheduler's timesteps."""
    import diffusers

    from tests.test_pipeline import SCHEDULERS, SD, scheduler_sigmas
    from tests.test_pipeline_animatediff import build_animatediff

    folder = build_animatediff(tmp / "animatediff")[0]
    scheduler = diffusers.DDIMScheduler(**SD, **SCHEDULERS["ddim"][1])
    scheduler.set_timesteps(steps)
    sigmas = scheduler_sigmas(scheduler)
    start = float(sigmas[0])
    latent = size // 2  # the tiny VAE: 2× down
    z = torch.randn(1, 4, frames, latent, latent, generator=_seeded())
    common = {"num_frames": frames, "width": size, "height": size}
    return {
        "family": "AnimateDiff (SD 1.x + MotionAdapter)",
        "diffusers": "AnimateDiffPipeline + DDIM",
        "pipeline": "AnimateDiffPipeline",
        "folder": str(folder),
        "frames": frames,
        # diffusers' DDIM state is the VP latent x/√(1+σ²) (tests/test_pipeline.py)
        "tensors": {"noise": z, "latents": z * start / math.sqrt(1 + start**2), "sigmas": sigmas},
        "ours": {**common, "sampler": "ddim", "guidance": 7.5},
        "theirs": {**common, "num_inference_steps": steps, "guidance_scale": 7.5},
    }


CASES = {"wan": wan_case, "animatediff": animatediff_case}


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# -- one side in a fresh process ----------------------------------------------------------------


def _rss_mib() -> float:
    """This process's resident set now (MiB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _draw_call(case: dict, side: str, tensors: dict):
    """A function drawing one clip (B, F, H, W, C) in [0, 1] on ``side``, its model loaded."""
    if side == "destatic":
        import destatic

        pipe = destatic.load(case["folder"])
        extra = {"sigmas": tensors["sigmas"]} if "sigmas" in tensors else {}
        kwargs = {**case["ours"], **extra, "noise": tensors["noise"]}
        return lambda: pipe.generate(PROMPT, **kwargs).movedim(1, -1).numpy()
    import diffusers

    pipe = getattr(diffusers, case["pipeline"]).from_pretrained(case["folder"])
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**case["theirs"], "latents": tensors["latents"], "output_type": "np"}
    return lambda: np.asarray(pipe(PROMPT, **kwargs).frames)


def run_side(work: Path, name: str, side: str, repeats: int, threads: int) -> None:
    """The child process: load, draw one clip (saved for the comparison), time ``repeats``
    more; prints one JSON line."""
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    case = json.loads((work / f"{name}.json").read_text())
    tensors = load_file(str(work / f"{name}.safetensors"))
    with torch.no_grad():
        draw = _draw_call(case, side, tensors)
        loaded = _rss_mib()
        np.save(work / f"{name}-{side}.npy", draw())
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            draw()
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": statistics.median(times), "peak_mib": peak, "loaded_mib": loaded}))


def measure_side(work: Path, name: str, side: str, settings: dict) -> dict:
    """:func:`run_side` in a fresh interpreter; its JSON line."""
    cmd = [sys.executable, __file__, "--side", side, "--case", name, "--work", str(work)]
    cmd += ["--repeats", str(settings["repeats"]), "--threads", str(settings["threads"])]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} on {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the parent: build, run every side, tabulate ------------------------------------------------


def measure(work: Path, settings: dict) -> list[dict]:
    """One row per family: both sides in fresh processes, printed as it finishes."""
    from safetensors.torch import save_file

    rows = []
    for name, make in CASES.items():
        case = make(work, settings["frames"], settings["size"], settings["steps"])
        tensors = {k: v.contiguous().clone() for k, v in case.pop("tensors").items()}
        save_file(tensors, str(work / f"{name}.safetensors"))
        (work / f"{name}.json").write_text(json.dumps(case))
        ours = measure_side(work, name, "destatic", settings)
        theirs = measure_side(work, name, "diffusers", settings)
        a, b = (np.load(work / f"{name}-{side}.npy") for side in ("destatic", "diffusers"))
        row = {
            "family": case["family"],
            "diffusers": case["diffusers"],
            "frames": case["frames"],
            "size": settings["size"],
            "steps": settings["steps"],
            "destatic_s_per_clip": round(ours["seconds"], 3),
            "diffusers_s_per_clip": round(theirs["seconds"], 3),
            "ratio": round(theirs["seconds"] / ours["seconds"], 3),
            "destatic_peak_mib": round(ours["peak_mib"]),
            "diffusers_peak_mib": round(theirs["peak_mib"]),
            "destatic_sampling_mib": round(ours["peak_mib"] - ours["loaded_mib"]),
            "diffusers_sampling_mib": round(theirs["peak_mib"] - theirs["loaded_mib"]),
            "max_pixel_diff": float(np.abs(a * 255 - b * 255).max().round(3)),
            "load_average_1min": round(os.getloadavg()[0], 2),
        }
        rows.append(row)
        print(table_line(row), flush=True)
    return rows


HEADER = (
    "| family | diffusers side | frames | size | steps | destatic s/clip | diffusers s/clip "
    "| diffusers/destatic | destatic peak MiB (− loaded) | diffusers peak MiB (− loaded) "
    "| max Δ (0–255) | load |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def table_line(row: dict) -> str:
    return (
        f"| {row['family']} | {row['diffusers']} | {row['frames']} | {row['size']}² "
        f"| {row['steps']} | {row['destatic_s_per_clip']:.3f} | {row['diffusers_s_per_clip']:.3f} "
        f"| {row['ratio']:.2f}× | {row['destatic_peak_mib']} ({row['destatic_sampling_mib']}) "
        f"| {row['diffusers_peak_mib']} ({row['diffusers_sampling_mib']}) "
        f"| {row['max_pixel_diff']:.3f} | {row['load_average_1min']:.1f} |"
    )


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 frames of 32², 2 steps, 1 run")
    parser.add_argument("--frames", type=int, help="frames per clip (default 16; Wan: 4k + 1)")
    parser.add_argument("--size", type=int, help="width = height in pixels (default 64)")
    parser.add_argument("--steps", type=int, help="sampling steps (default 10)")
    parser.add_argument("--repeats", type=int, help="timed clips per side (default 3)")
    parser.add_argument("--threads", type=int, help=f"torch threads (default {THREADS})")
    parser.add_argument(
        "--markdown", type=Path, help=f"the table's file (default {RESULTS}; none when --quick)"
    )
    parser.add_argument("--side", choices=("destatic", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:  # a child process
        run_side(args.work, args.case, args.side, args.repeats, args.threads)
        return
    chosen = {k: getattr(args, k) for k in FULL if getattr(args, k) is not None}
    settings = {**(QUICK if args.quick else FULL), **chosen}
    if (
        settings["size"] % 16
        or min(settings["frames"], settings["repeats"], settings["threads"]) < 1
    ):
        parser.error("--size must be a multiple of 16; --frames, --repeats, --threads at least 1")
    markdown = args.markdown or (None if args.quick else RESULTS)

    machine = (
        f"{cpu_line()}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{settings['threads']} threads, fp32"
    )
    load_before = load_average()
    print(f"# video pipelines against diffusers\n\n{machine}\nload average before: {load_before}\n")
    print(HEADER, flush=True)
    work = Path(tempfile.mkdtemp(prefix="destatic_video_bench_"))
    try:
        rows = measure(work, settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = load_average()
    print(f"\nload average after: {load_after}")
    if markdown is None:
        return
    run = {
        "command": " ".join(["python benchmarks/video.py", *sys.argv[1:]]),
        "finished_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine,
        "settings": settings,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.with_suffix(".json").write_text(json.dumps({"run": run, "rows": rows}, indent=2))
    markdown.write_text(
        "# video pipelines against diffusers: seconds per clip and peak memory\n\n"
        f"`{run['command']}` ({run['finished_utc']}). {machine}. Median of "
        f"{settings['repeats']} clips after one warm-up clip per side, each side in a fresh "
        "process; peak memory is the process's peak resident set, in brackets less the "
        f"resident set before the first clip. Load average (1, 5, 15 min) before: {load_before}; "
        f"after: {load_after}; the last column is the 1-minute load as the row finished.\n\n"
        f"{HEADER}\n" + "\n".join(table_line(row) for row in rows) + "\n"
    )
    print(f"wrote {markdown} and {markdown.with_suffix('.json')}")


if __name__ == "__main__":
    main()
