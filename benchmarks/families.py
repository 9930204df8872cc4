"""Seconds per image for every family's tiny random pipeline: destatic against the diffusers
pipeline of that family, on the same folder, sampler, grid, steps, guidance and initial noise
(CPU, fp32, 2 threads, interleaved runs, median of 5).

    python benchmarks/families.py                 # about 5 minutes on 2 idle vCPUs
    python benchmarks/families.py --quick         # under a minute idle: batch 1, ≤ 4 steps
    python benchmarks/families.py --json out.json --repeats 7

Families (the tiny folders the tests build, imported from tests/):

* SD 1.x — ``StableDiffusionPipeline`` + ``DPMSolverMultistepScheduler`` against ``dpmpp_2m``
  (benchmarks/generation.py's pair);
* SDXL — ``StableDiffusionXLPipeline`` + ``DPMSolverMultistepScheduler`` against ``dpmpp_2m``;
* SD3 and SD3.5 Medium (dual attention, RMS q/k norms) — ``StableDiffusion3Pipeline`` +
  ``FlowMatchEulerDiscreteScheduler`` against ``euler`` on that scheduler's grid;
* Flux dev (20 steps, embedded guidance) and schnell (4 steps) — ``FluxPipeline`` +
  ``FlowMatchEulerDiscreteScheduler`` against the family defaults (``euler`` on ``simple``);
* an LCM-distilled SD folder — ``LatentConsistencyModelPipeline`` + ``LCMScheduler`` against the
  folder's defaults (4 × ``lcm``), fresh noise from the same per-image seeds.

Each timed call is the whole job: prompt encoding, sampling, decoding and conversion to pixels
(PIL for destatic, ``output_type="np"`` for diffusers). The last column is the largest pixel
difference (0-255) between the two libraries' images, so each row times the same computation.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

import destatic
from benchmarks.generation import PROMPT, THREADS, compare, sd_pair

RESULTS = Path(__file__).parent / "results" / "families.md"
SEED = 7  # the fresh draws of the LCM sampler
_TMP = Path(tempfile.mkdtemp(prefix="destatic_families_"))


def _noise(batch: int, *shape: int) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))


def _images(pil_images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pil_images])


# -- builders: each family's folder once, from the tests' own builders --------------------------


@functools.cache
def _sdxl():
    from tests.test_pipeline_sdxl import _build

    folder, reference = _build(_TMP / "sdxl", refiner=False)
    return destatic.load(folder), reference


@functools.cache
def _sd3(dual: bool):
    from tests import tiny_sd

    tmp = _TMP / ("sd35" if dual else "sd3")
    if dual:
        from tests.test_mmdit_sd35 import sd35_pipeline

        reference = sd35_pipeline(tmp)
    else:
        reference = tiny_sd.sd3_pipeline(tmp)
        reference.save_pretrained(tmp / "pipeline", safe_serialization=True)
    return destatic.load(tmp / "pipeline"), reference


@functools.cache
def _flux(variant: str):
    from tests.test_pipeline_flux import VARIANTS, flux_pipeline

    tmp = _TMP / f"flux_{variant}"
    reference = flux_pipeline(tmp, VARIANTS[variant][0], seed=list(VARIANTS).index(variant))
    reference.save_pretrained(tmp / "pipeline", safe_serialization=True)
    return destatic.load(tmp / "pipeline"), reference


@functools.cache
def _lcm():
    from tests.test_lcm_scheduler import _folder

    folder, reference = _folder(_TMP / "lcm", distilled=True)
    return destatic.load(folder), reference


# -- pairs: (ours, theirs) for a batch and a step count -----------------------------------------


def sdxl_pair(batch: int, steps: int):
    """StableDiffusionXLPipeline + DPMSolverMultistepScheduler against ``dpmpp_2m`` on its grid,
    guidance 5 (the family's), the empty negative prompt as diffusers' zeros."""
    import diffusers

    from tests.test_pipeline import SD, scheduler_sigmas
    from tests.test_pipeline_sdxl import DPMPP_2M

    pipe, base = _sdxl()
    scheduler = getattr(diffusers, DPMPP_2M[0])(**SD, **DPMPP_2M[1])
    reference = diffusers.StableDiffusionXLPipeline(**{**base.components, "scheduler": scheduler})
    reference.set_progress_bar_config(disable=True)
    scheduler.set_timesteps(steps)
    sigmas = scheduler_sigmas(scheduler)
    start = float(sigmas[0])
    z = _noise(batch, 4, 8, 8)
    size = {"height": 16, "width": 16}

    def ours() -> np.ndarray:
        images = pipe(
            [PROMPT] * batch, sampler="dpmpp_2m", sigmas=sigmas, guidance=5.0, noise=z, **size
        )
        return _images(images)

    def theirs() -> np.ndarray:
        return reference(
            [PROMPT] * batch,
            num_inference_steps=steps,
            guidance_scale=5.0,
            latents=z * start / math.sqrt(1 + start**2),  # VP state x/√(1+σ²)
            output_type="np",
            **size,
        ).images

    return ours, theirs


def _sd3_pair(dual: bool, batch: int, steps: int):
    """StableDiffusion3Pipeline + FlowMatchEulerDiscreteScheduler (shift 3) against ``euler``
    on that scheduler's grid, guidance 7 (both libraries' SD3 default)."""
    from tests.test_pipeline_sd3 import _flow_sigmas

    pipe, reference = _sd3(dual)
    reference.scheduler.set_timesteps(steps)  # as the pipeline call does
    sigmas = _flow_sigmas(reference.scheduler)
    z = _noise(batch, 4, 8, 8)  # the flow state at t = 1 is the unit noise itself
    size = {"height": 16, "width": 16}

    def ours() -> np.ndarray:
        images = pipe(
            [PROMPT] * batch, sampler="euler", sigmas=sigmas, guidance=7.0, noise=z, **size
        )
        return _images(images)

    def theirs() -> np.ndarray:
        return reference(
            [PROMPT] * batch,
            num_inference_steps=steps,
            guidance_scale=7.0,
            latents=z,
            output_type="np",
            **size,
        ).images

    return ours, theirs


def _flux_pair(variant: str, batch: int, steps: int):
    """FluxPipeline + FlowMatchEulerDiscreteScheduler (resolution shift) against the family's
    defaults (``euler`` on ``simple``: the same grid); dev's guidance 3.5 is a network input,
    schnell has none (one pass per step on both sides)."""
    from tests.test_pipeline_flux import SIZE, VARIANTS, _packed

    pipe, reference = _flux(variant)
    guidance_embeds, length = VARIANTS[variant]
    guidance = 3.5 if guidance_embeds else 1.0
    z = _noise(batch, 4, 8, 16)

    def ours() -> np.ndarray:
        return _images(pipe([PROMPT] * batch, steps=steps, guidance=guidance, noise=z, **SIZE))

    def theirs() -> np.ndarray:
        return reference(
            [PROMPT] * batch,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=_packed(z),
            max_sequence_length=length,
            output_type="np",
            **SIZE,
        ).images

    return ours, theirs


def lcm_pair(batch: int, steps: int):
    """LatentConsistencyModelPipeline + LCMScheduler against the folder's defaults (``lcm`` on
    the ``lcm`` grid, guidance 8.5 embedded in the U-Net); image i's fresh noise from seed
    SEED + i on both sides (diffusers: one generator per image)."""
    pipe, reference = _lcm()
    sigma_max = pipe.process.sigma_max
    z = _noise(batch, 4, 8, 8)
    latents = z * sigma_max / math.sqrt(1 + sigma_max**2)
    size = {"height": 16, "width": 16}

    def ours() -> np.ndarray:
        return _images(pipe([PROMPT] * batch, steps=steps, seed=SEED, noise=z, **size))

    def theirs() -> np.ndarray:
        return reference(
            [PROMPT] * batch,
            num_inference_steps=steps,
            guidance_scale=8.5,
            latents=latents,
            generator=[torch.Generator().manual_seed(SEED + i) for i in range(batch)],
            output_type="np",
            **size,
        ).images

    return ours, theirs


Pair = Callable[[int, int], tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]]
#: (family, diffusers pipeline + scheduler, steps, pair)
FAMILIES: list[tuple[str, str, int, Pair]] = [
    ("SD 1.x", "StableDiffusionPipeline + DPM++ 2M", 20, sd_pair),
    ("SDXL", "StableDiffusionXLPipeline + DPM++ 2M", 20, sdxl_pair),
    ("SD3", "StableDiffusion3Pipeline + FlowMatchEuler", 20, functools.partial(_sd3_pair, False)),
    (
        "SD3.5 Medium (dual attention)",
        "StableDiffusion3Pipeline + FlowMatchEuler",
        20,
        functools.partial(_sd3_pair, True),
    ),
    ("Flux dev", "FluxPipeline + FlowMatchEuler", 20, functools.partial(_flux_pair, "dev")),
    ("Flux schnell", "FluxPipeline + FlowMatchEuler", 4, functools.partial(_flux_pair, "schnell")),
    ("LCM (distilled SD)", "LatentConsistencyModelPipeline + LCMScheduler", 4, lcm_pair),
]


# -- the machine --------------------------------------------------------------------------------


def cpu_line() -> str:
    """The CPU model and the vector extensions torch's CPU kernels care about."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first CPU's
    except OSError:
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    extensions = [f for f in ("avx2", "avx512f", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(extensions) or 'no avx2'}), {os.cpu_count()} logical CPUs"


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, at most 4 steps, 2 runs")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--repeats", type=int, help="timed runs per side (default 5; quick 2)")
    parser.add_argument(
        "--markdown", type=Path, help=f"the table's file (default {RESULTS}; none when --quick)"
    )
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    reps = args.repeats or (2 if args.quick else 5)
    warmup = 0  # compare's first call of each side (the images) is the warm-up
    batches = (1,) if args.quick else (1, 4)
    markdown = args.markdown or (None if args.quick else RESULTS)

    machine = (
        f"{cpu_line()}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{THREADS} threads, fp32"
    )
    load_before = load_average()
    rows = []
    header = (
        "| family | diffusers side | steps | batch | destatic s/image | diffusers s/image "
        "| diffusers/destatic | max Δ (0–255) | load |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    print(f"# every family against diffusers\n\n{machine}\nload average before: {load_before}\n")
    print(header, flush=True)
    lines = []
    try:
        for family, peer, steps, make in FAMILIES:
            steps = min(steps, 4) if args.quick else steps
            for batch in batches:
                ours, theirs = make(batch, steps)
                t_ours, t_theirs, diff = compare(ours, theirs, batch, warmup, reps)
                row = {
                    "family": family,
                    "diffusers": peer,
                    "steps": steps,
                    "batch": batch,
                    "destatic_s_per_image": round(t_ours, 5),
                    "diffusers_s_per_image": round(t_theirs, 5),
                    "ratio": round(t_theirs / t_ours, 3),
                    "max_pixel_diff": diff,
                    "load_average_1min": round(os.getloadavg()[0], 2),
                }
                rows.append(row)
                line = (
                    f"| {family} | {peer} | {steps} | {batch} | {t_ours:.4f} | {t_theirs:.4f} "
                    f"| {t_theirs / t_ours:.2f}× | {diff:.0f} | {os.getloadavg()[0]:.1f} |"
                )
                lines.append(line)
                print(line, flush=True)
    finally:
        shutil.rmtree(_TMP, ignore_errors=True)
    load_after = load_average()
    print(f"\nload average after: {load_after}")

    note = (
        f"median of {reps} interleaved runs after one warm-up call per side, "
        f"{THREADS} threads, fp32; load average (1, 5, 15 min) before: {load_before}; "
        f"after: {load_after}; the last column: the 1-minute load average as the row finished"
    )
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(
            f"# every family against diffusers, s/image\n\n"
            f"`python benchmarks/families.py{' --quick' if args.quick else ''}`\n\n"
            f"{machine}  \n{note}\n\n{header}\n" + "\n".join(lines) + "\n"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "threads": THREADS,
                    "repeats": reps,
                    "warmup_calls_per_side": 1,
                    "load_average_before": load_before,
                    "load_average_after": load_after,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
