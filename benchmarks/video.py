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
clip (the warm-up, whose frames are compared), then times ``--repeats`` more
(benchmarks/sides.py): its peak memory is the process's peak resident set, and "− loaded"
subtracts the resident set just before the first clip (Python, torch, the library and the
weights), which leaves about what sampling and decoding add. The last columns: the ratio of
the seconds (above 1: destatic faster) and the largest pixel difference (0–255) between the
two libraries' frames.

Results go to benchmarks/results/video.md and .json (none with ``--quick`` unless
``--markdown`` says where).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.families import cpu_line
from benchmarks.generation import THREADS
from benchmarks.sides import (
    Draw,
    add_child_options,
    bench,
    max_difference,
    measure_side,
    run_side,
    save_case,
    seeded,
)

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
    z = torch.randn(1, 16, 1 + (frames - 1) // 4, latent, latent, generator=seeded())
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
    z = torch.randn(1, 4, frames, latent, latent, generator=seeded())
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


# -- one side in a fresh process ----------------------------------------------------------------


def _draw_call(case: dict, side: str, tensors: dict) -> Draw:
    """Drawing one clip (B, F, H, W, C) in [0, 1] on ``side``, its model loaded."""
    if side == "destatic":
        import destatic

        pipe = destatic.load(case["folder"])
        extra = {"sigmas": tensors["sigmas"]} if "sigmas" in tensors else {}
        kwargs = {**case["ours"], **extra, "noise": tensors["noise"]}
        return Draw(lambda: pipe.generate(PROMPT, **kwargs).movedim(1, -1).numpy())
    import diffusers

    pipe = getattr(diffusers, case["pipeline"]).from_pretrained(case["folder"])
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**case["theirs"], "latents": tensors["latents"], "output_type": "np"}
    return Draw(lambda: np.asarray(pipe(PROMPT, **kwargs).frames))


# -- the parent: build, run every side, tabulate ------------------------------------------------


def measure(work: Path, settings: dict) -> list[dict]:
    """One row per family: both sides in fresh processes, printed as it finishes."""
    rows = []
    for name, make in CASES.items():
        case = save_case(
            work, name, make(work, settings["frames"], settings["size"], settings["steps"])
        )
        ours = measure_side(__file__, work, name, "destatic", settings)
        theirs = measure_side(__file__, work, name, "diffusers", settings)
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
            "max_pixel_diff": round(max_difference(work, name, scale=255), 3),
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
    add_child_options(parser, CASES)
    args = parser.parse_args()
    if args.side is not None:  # a child process
        run_side(args.work, args.case, args.side, args.repeats, args.threads, _draw_call)
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
    method = (
        f"Median of {settings['repeats']} clips after one warm-up clip per side, each side in "
        "a fresh process; peak memory is the process's peak resident set, in brackets less the "
        "resident set before the first clip."
    )
    title = "video pipelines against diffusers: seconds per clip and peak memory"
    measured = functools.partial(measure, settings=settings)
    bench(title, machine, HEADER, table_line, measured, markdown, method, settings)


if __name__ == "__main__":
    main()
