"""Seconds per image for every family's tiny random pipeline: destatic against the diffusers
pipeline of that family, on the same folder, sampler, grid, steps, guidance and initial noise
(CPU, fp32, 2 threads, interleaved runs, median of 5).

    python benchmarks/families.py                 # about 5 minutes on 2 idle vCPUs
    python benchmarks/families.py --quick         # under a minute idle: batch 1, ≤ 4 steps
    python benchmarks/families.py --json out.json --repeats 7
    python benchmarks/families.py --only dit,pixart-alpha,pixart-sigma   # those rows only

Families (the tiny folders the tests build, imported from tests/):

* SD 1.x — ``StableDiffusionPipeline`` + ``DPMSolverMultistepScheduler`` against ``dpmpp_2m``
  (benchmarks/generation.py's pair);
* SDXL — ``StableDiffusionXLPipeline`` + ``DPMSolverMultistepScheduler`` against ``dpmpp_2m``;
* SD3 and SD3.5 Medium (dual attention, RMS q/k norms) — ``StableDiffusion3Pipeline`` +
  ``FlowMatchEulerDiscreteScheduler`` against ``euler`` on that scheduler's grid;
* Flux dev (20 steps, embedded guidance) and schnell (4 steps) — ``FluxPipeline`` +
  ``FlowMatchEulerDiscreteScheduler`` against the family defaults (``euler`` on ``simple``);
* an LCM-distilled SD folder — ``LatentConsistencyModelPipeline`` + ``LCMScheduler`` against the
  folder's defaults (4 × ``lcm``), fresh noise from the same per-image seeds;
* DiT (class-conditional, learned variance), PixArt-α and PixArt-Σ (T5, adaLN-single) —
  ``DiTPipeline`` / ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` +
  ``DPMSolverMultistepScheduler`` (linear β) against ``dpmpp_2m`` on that scheduler's grid.

``--only`` runs some families (keys: sd1, sdxl, sd3, sd3.5, flux-dev, flux-schnell, lcm, dit,
pixart-alpha, pixart-sigma). The results files (benchmarks/results/families.md and .json) are
merged by row (family, steps, batch): a run replaces its own rows and keeps the others, each with
the run (command, machine, load average) that measured it.

Each timed call is the whole job: prompt encoding, sampling, decoding and conversion to pixels
(PIL for destatic, ``output_type="np"`` for diffusers). The last column is the largest pixel
difference (0-255) between the two libraries' images, so each row times the same computation.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

import destatic
from benchmarks.generation import PROMPT, THREADS, compare, sd_pair
from destatic.pipelines.devices import cpu_description

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


@functools.cache
def _from_builder(module: str, builder: str):
    """(destatic pipeline, diffusers pipeline) of the folder ``builder`` of tests/``module``.py
    makes (DiT: ``build_dit``; PixArt-α / Σ: ``build_pixart`` / ``build_sigma``)."""
    build = getattr(importlib.import_module(f"tests.{module}"), builder)
    folder, reference = build(Path(tempfile.mkdtemp(prefix=f"{builder}_", dir=_TMP)))
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


def _dpmpp_2m(reference, **extra):
    """``reference``'s diffusers pipeline class on its components with DPMSolverMultistepScheduler
    on the tests' linear β schedule (DiT's and PixArt's), and that scheduler."""
    import diffusers

    from tests.test_pipeline import SCHEDULERS
    from tests.test_pipeline_dit import LINEAR

    scheduler = diffusers.DPMSolverMultistepScheduler(**LINEAR, **SCHEDULERS["dpmpp_2m"][1])
    pipe = type(reference)(**{**reference.components, "scheduler": scheduler}, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe, scheduler


def dit_pair(batch: int, steps: int):
    """DiTPipeline + DPMSolverMultistepScheduler against ``dpmpp_2m`` on its grid, class "golden
    retriever", guidance 4 (the family's and DiTPipeline's; the null class as the unconditional
    branch). DiTPipeline takes no latents: it draws them from a seed, and destatic gets the same
    noise (tests/test_pipeline_dit.py's ``same_latents``)."""
    from tests.test_pipeline_dit import ID2LABEL, same_latents

    pipe, base = _from_builder("test_pipeline_dit", "build_dit")
    reference, scheduler = _dpmpp_2m(base, id2label=ID2LABEL)
    sigmas, _, noise = same_latents(scheduler, steps, seed=0, shape=(batch, 4, 8, 8))
    label = "golden retriever"

    def ours() -> np.ndarray:
        return _images(
            pipe([label] * batch, sampler="dpmpp_2m", sigmas=sigmas, guidance=4.0, noise=noise)
        )

    def theirs() -> np.ndarray:
        return reference(
            reference.get_label_ids([label] * batch),
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
            num_inference_steps=steps,
            output_type="np",
        ).images

    return ours, theirs


def _pixart_pair(fixture: str, batch: int, steps: int):
    """PixArtAlphaPipeline / PixArtSigmaPipeline + DPMSolverMultistepScheduler (the folders'
    scheduler) against ``dpmpp_2m`` on its grid, guidance 4.5 (the family's and the pipelines'),
    24×16 px, T5 prompts with their masks (120 / 300 tokens); no resolution binning or caption
    cleaning on the diffusers side."""
    from tests.test_pipeline_dit import same_latents
    from tests.test_pipeline_pixart import SIZE

    pipe, base = _from_builder("test_pipeline_pixart", f"build_{fixture}")
    reference, scheduler = _dpmpp_2m(base)
    sigmas, z, noise = same_latents(scheduler, steps, seed=0, shape=(batch, 4, 8, 12))

    def ours() -> np.ndarray:
        images = pipe(
            [PROMPT] * batch, sampler="dpmpp_2m", sigmas=sigmas, guidance=4.5, noise=noise, **SIZE
        )
        return _images(images)

    def theirs() -> np.ndarray:
        return reference(
            [PROMPT] * batch,
            num_inference_steps=steps,
            guidance_scale=4.5,
            latents=z,
            clean_caption=False,
            use_resolution_binning=False,
            output_type="np",
            **SIZE,
        ).images

    return ours, theirs


Pair = Callable[[int, int], tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]]
#: (key for --only, family, diffusers pipeline + scheduler, steps, pair)
FAMILIES: list[tuple[str, str, str, int, Pair]] = [
    ("sd1", "SD 1.x", "StableDiffusionPipeline + DPM++ 2M", 20, sd_pair),
    ("sdxl", "SDXL", "StableDiffusionXLPipeline + DPM++ 2M", 20, sdxl_pair),
    (
        "sd3",
        "SD3",
        "StableDiffusion3Pipeline + FlowMatchEuler",
        20,
        functools.partial(_sd3_pair, False),
    ),
    (
        "sd3.5",
        "SD3.5 Medium (dual attention)",
        "StableDiffusion3Pipeline + FlowMatchEuler",
        20,
        functools.partial(_sd3_pair, True),
    ),
    (
        "flux-dev",
        "Flux dev",
        "FluxPipeline + FlowMatchEuler",
        20,
        functools.partial(_flux_pair, "dev"),
    ),
    (
        "flux-schnell",
        "Flux schnell",
        "FluxPipeline + FlowMatchEuler",
        4,
        functools.partial(_flux_pair, "schnell"),
    ),
    ("lcm", "LCM (distilled SD)", "LatentConsistencyModelPipeline + LCMScheduler", 4, lcm_pair),
    ("dit", "DiT (class-conditional)", "DiTPipeline + DPM++ 2M", 20, dit_pair),
    (
        "pixart-alpha",
        "PixArt-α",
        "PixArtAlphaPipeline + DPM++ 2M",
        20,
        functools.partial(_pixart_pair, "pixart"),
    ),
    (
        "pixart-sigma",
        "PixArt-Σ",
        "PixArtSigmaPipeline + DPM++ 2M",
        20,
        functools.partial(_pixart_pair, "sigma"),
    ),
]
KEYS = [key for key, *_ in FAMILIES]


# -- the machine --------------------------------------------------------------------------------


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


HEADER = (
    "| family | diffusers side | steps | batch | destatic s/image | diffusers s/image "
    "| diffusers/destatic | max Δ (0–255) | load |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def selected(only: str | None) -> list[tuple[str, str, str, int, Pair]]:
    """The FAMILIES rows ``--only`` names (comma-separated keys), in table order; all without."""
    if only is None:
        return FAMILIES
    wanted = {key.strip() for key in only.split(",") if key.strip()}
    unknown = sorted(wanted - set(KEYS))
    if unknown or not wanted:
        raise ValueError(
            f"--only: unknown family {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(KEYS)}"
        )
    return [row for row in FAMILIES if row[0] in wanted]


def measure(families, batches: tuple[int, ...], quick: bool, reps: int) -> list[dict]:
    """One row per family and batch: both sides timed by ``compare``, printed as it finishes."""
    rows = []
    for key, family, peer, steps, make in families:
        steps = min(steps, 4) if quick else steps
        for batch in batches:
            ours, theirs = make(batch, steps)
            t_ours, t_theirs, diff = compare(ours, theirs, batch, 0, reps)  # 1st call: warm-up
            row = {
                "key": key,
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
            print(table_line(row), flush=True)
    return rows


def table_line(row: dict) -> str:
    return (
        f"| {row['family']} | {row['diffusers']} | {row['steps']} | {row['batch']} "
        f"| {row['destatic_s_per_image']:.4f} | {row['diffusers_s_per_image']:.4f} "
        f"| {row['ratio']:.2f}× | {row['max_pixel_diff']:.0f} | {row['load_average_1min']:.1f} |"
    )


def _row_key(row: dict) -> tuple[str, int, int]:
    return row["key"], row["steps"], row["batch"]


def _read_results(path: Path) -> list[tuple[dict, dict]]:
    """(run, row) pairs of a results JSON; a file from before runs were recorded (one run's
    settings at the top level, rows without keys) reads as that one run."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if "runs" in data:
        return [(data["runs"][row.pop("run")], row) for row in data["rows"]]
    settings = ("machine", "threads", "repeats", "warmup_calls_per_side")
    loads = ("load_average_before", "load_average_after")
    run = {"command": "python benchmarks/families.py", **{k: data[k] for k in settings + loads}}
    keys = {family: key for key, family, *_ in FAMILIES}
    return [(run, {"key": keys.get(row["family"], row["family"]), **row}) for row in data["rows"]]


def merge(path: Path, run: dict, rows: list[dict]) -> dict:
    """The results in ``path`` with this run's rows in place of those with the same key (family
    key, steps, batch), the others kept with the runs that measured them; rows in table order."""
    new = {_row_key(row) for row in rows}
    pairs = [(r, row) for r, row in _read_results(path) if _row_key(row) not in new]
    pairs += [(run, row) for row in rows]
    order = {key: i for i, key in enumerate(KEYS)}
    pairs.sort(key=lambda p: (order.get(p[1]["key"], len(order)), -p[1]["steps"], p[1]["batch"]))
    runs: list[dict] = []
    for r, row in pairs:
        if r not in runs:
            runs.append(r)
        row["run"] = runs.index(r)
    return {"runs": runs, "rows": [row for _, row in pairs]}


def markdown_text(results: dict) -> str:
    """The results as a table, after one line per run: its command, machine, settings and load
    average, and the families it measured."""
    notes = []
    for i, run in enumerate(results["runs"]):
        families = dict.fromkeys(r["family"] for r in results["rows"] if r["run"] == i)
        when = f" ({run['finished_utc']})" if "finished_utc" in run else ""
        notes.append(
            f"{i + 1}. `{run['command']}`{when}: {', '.join(families)}. {run['machine']}; median "
            f"of {run['repeats']} interleaved runs after {run['warmup_calls_per_side']} warm-up "
            f"call per side; load average (1, 5, 15 min) before: {run['load_average_before']}; "
            f"after: {run['load_average_after']}"
        )
    return (
        "# every family against diffusers, s/image\n\n"
        "Rows are merged by (family, steps, batch): a run (`--only` some families) replaces its "
        "own rows and keeps the others with the run that measured them. Runs:\n\n"
        + "\n".join(notes)
        + "\n\nThe last column: the 1-minute load average as the row finished.\n\n"
        + HEADER
        + "\n"
        + "\n".join(table_line(row) for row in results["rows"])
        + "\n"
    )


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, at most 4 steps, 2 runs")
    parser.add_argument(
        "--only", help=f"comma-separated families to run (default all): {','.join(KEYS)}"
    )
    parser.add_argument(
        "--json", type=Path, help="the rows as JSON (default: the table's file, .json)"
    )
    parser.add_argument("--repeats", type=int, help="timed runs per side (default 5; quick 2)")
    parser.add_argument(
        "--markdown", type=Path, help=f"the table's file (default {RESULTS}; none when --quick)"
    )
    args = parser.parse_args()
    try:
        families = selected(args.only)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(THREADS)
    reps = args.repeats or (2 if args.quick else 5)
    markdown = args.markdown or (None if args.quick else RESULTS)
    results_json = args.json or (markdown.with_suffix(".json") if markdown else None)

    machine = (
        f"{cpu_description()}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{THREADS} threads, fp32"
    )
    load_before = load_average()
    print(f"# every family against diffusers\n\n{machine}\nload average before: {load_before}\n")
    print(HEADER, flush=True)
    try:
        rows = measure(families, (1,) if args.quick else (1, 4), args.quick, reps)
    finally:
        shutil.rmtree(_TMP, ignore_errors=True)
    load_after = load_average()
    print(f"\nload average after: {load_after}")

    if results_json is None:
        return
    run = {
        "command": " ".join(["python benchmarks/families.py", *sys.argv[1:]]),
        "finished_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine,
        "threads": THREADS,
        "repeats": reps,
        "warmup_calls_per_side": 1,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    results = merge(results_json, run, rows)
    kept = len(results["rows"]) - len(rows)
    results_json.parent.mkdir(parents=True, exist_ok=True)
    results_json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if markdown is not None:
        markdown.write_text(markdown_text(results))
    written = ", ".join(str(p) for p in (results_json, markdown) if p is not None)
    print(f"wrote {written}: {len(rows)} rows measured now, {kept} kept from earlier runs")


if __name__ == "__main__":
    main()
