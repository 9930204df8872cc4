"""Time to quality: held-out quality against seconds per image for the bundled emoji model,
destatic's samplers against diffusers' schedulers driving the same network (issue 19, goal 4).

    python benchmarks/time_to_quality.py                        # 376 prompts, 4/6/8/12 steps
    python benchmarks/time_to_quality.py --n 64 --steps 8       # a quick run
    python benchmarks/time_to_quality.py --threads 1 --steps 8,4,6,12
    python benchmarks/time_to_quality.py --steps 6 --students '' --append   # add rows to the file

The bundled model (``destatic.load()``: pixel-space 32² U-Net, rectified flow, MiniLM) draws
one image per held-out emoji prompt (seeds ``seed + i``, as ``destatic eval`` does, so rows
compare with BENCHMARKS.md's eval figures) at guidance 3, in bf16 (``--dtype auto`` on a CPU
with bf16 matrix units), with:

* destatic: ``euler``, ``dpmpp_2m`` and ``uni_pc`` on the model's own grid (sgm_uniform), and
  ``dpmpp_2m`` in fp32 at 8 steps as a precision check;
* diffusers, the loop a diffusers user writes from the components (as generation.py's
  ``DiffusersLoop``; there is no stock pipeline for this model): ``UNet2DConditionModel`` on the
  bundled ``unet`` folder, the same MiniLM encoder, the same initial noise and classifier-free
  guidance, driven by ``FlowMatchEulerDiscreteScheduler`` (the model's own scheduler config),
  and ``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` configured for flow
  matching (``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``, ``flow_shift`` =
  the config's ``shift``), each on its own default grid; bf16 weights, bf16 latents and
  channels_last (diffusers' documented speed advice), and ``DPMSolverMultistep`` in fp32 at 8
  steps beside destatic's fp32 check;
* the distilled students (``--students``, default the bundled ``emoji_lcm``; a reflow student's
  folder such as ``runs/emoji_reflow/model`` too) at 1, 2 and 4 steps with their stored sampler,
  grid and folded-in guidance 3: one network pass per step where the teacher's guided step
  costs two (batched).

Each row: FID (Inception, against the real held-out images) and top-1 prompt retrieval (the
bundled evaluator) of the n images; network calls per image (NFE, a guided cond + uncond pair
counts once); seconds per image at batch 64 (the whole generation of the n images: prompt
encoding, sampling, decoding) and at batch 1 (median of 5 single-prompt generations after one
warm-up). Before the sweep, a parity check draws a small batch with each diffusers scheduler in
fp32 and with destatic's matching sampler on that scheduler's grid: the Euler pixels must match
(generation.py's check), and DPM++ 2M and UniPC are compared as well, with the network fed the
scheduler's integer timesteps and fed t·1000 exactly. Results go to
benchmarks/results/time_to_quality.json (rewritten after every row, so a stopped run keeps its
rows; ``--append`` keeps the file's rows that this run does not measure).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from generation import PROMPT, DiffusersLoop, destatic_grid, pixels, uint8

import destatic
from destatic.pipelines.devices import cpu_description, pick_dtype
from destatic.sampling.noise import generators, randn

SAMPLERS = ("euler", "dpmpp_2m", "uni_pc")
# diffusers scheduler → destatic's sampler of the same method (for the parity check)
SCHEDULERS = {
    "FlowMatchEulerDiscrete": "euler",
    "DPMSolverMultistep": "dpmpp_2m",
    "UniPCMultistep": "uni_pc",
}
CHECK_STEPS = 8  # the fp32 rows
BATCH = 64
SINGLE_REPS = 5
RESULTS = Path(__file__).parent / "results" / "time_to_quality.json"


@functools.cache
def bundled():
    """The bundled pipeline in fp32, read for its process, grid and text length only."""
    return destatic.load()


def flow_scheduler(name: str):
    """A fresh diffusers scheduler for the bundled model: the stored FlowMatchEuler config, or
    DPM-Solver++ / UniPC built from it for flow matching (diffusers' flow options)."""
    import diffusers

    folder = destatic.DEFAULT_MODEL / "scheduler"
    base = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder)
    if name == "FlowMatchEulerDiscrete":
        return base
    cls = getattr(diffusers, f"{name}Scheduler")
    return cls.from_config(
        base.config,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=base.config.shift,
    )


def parity(batch: int = 8, steps: int = CHECK_STEPS) -> list[dict]:
    """Max and mean pixel differences (0-255) in fp32 on ``batch`` images of generation.py's
    prompt and noise: :class:`DiffusersLoop` with each scheduler against destatic's matching
    sampler on that scheduler's grid."""
    noise = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loop = DiffusersLoop(torch.float32)
    pipe = destatic.load()
    prompts = [PROMPT] * batch
    rows = []

    def diff(name: str, a: np.ndarray, b: np.ndarray) -> None:
        d = np.abs(pixels(a) - pixels(b))
        rows.append({"check": name, "max": float(d.max()), "mean": float(d.mean())})
        print(f"  parity: {name}: max Δ {d.max():.0f}, mean Δ {d.mean():.3f}", flush=True)

    for name, sampler in SCHEDULERS.items():
        scheduler = flow_scheduler(name)
        mine = uint8(loop(prompts, noise, scheduler, steps, 3.0))
        exact = uint8(loop(prompts, noise, scheduler, steps, 3.0, exact_t=True))
        grid = destatic_grid(scheduler)
        ours = uint8(
            pipe.generate(
                prompts, steps=steps, sampler=sampler, guidance=3.0, noise=noise, sigmas=grid
            )
        )
        diff(f"diffusers {name} vs destatic {sampler} on its grid", mine, ours)
        diff(f"diffusers {name} (network fed t·1000 exactly) vs destatic {sampler}", exact, ours)
    return rows


@dataclass
class Row:
    library: str
    scheduler: str
    steps: int
    dtype: str
    grid: str
    nfe: int
    n: int
    fid: float | None = None
    top1: float | None = None
    top5: float | None = None
    seconds: float = 0.0  # generation of the n images at batch 64
    s_per_image_b64: float = 0.0
    s_per_image_b1: float = 0.0
    cpu_s_per_image_b64: float = 0.0  # process CPU time
    cpu_s_per_image_b1: float = 0.0
    t_grid: list[float] | None = None  # the flow times t = σ/(1+σ) of the steps, 0 last
    threads: int = 0  # torch threads of the run that measured the row

    def cells(self) -> list[str]:
        return [
            self.library,
            self.scheduler,
            self.dtype,
            self.grid,
            str(self.steps),
            str(self.nfe),
            f"{self.fid:.1f}",
            f"{100 * self.top1:.1f}",
            f"{self.s_per_image_b64:.4f}",
            f"{self.s_per_image_b1:.4f}",
            f"{self.cpu_s_per_image_b64:.4f}",
            f"{self.cpu_s_per_image_b1:.4f}",
            str(self.threads),
        ]


HEAD = [
    "library",
    "sampler / scheduler",
    "dtype",
    "grid",
    "steps",
    "NFE",
    "FID",
    "top-1 %",
    "s/image batch 64",
    "s/image batch 1",
    "CPU s/image batch 64",
    "CPU s/image batch 1",
    "threads",
]


def table(rows: Sequence[Row]) -> str:
    order = {name: i for i, name in enumerate([*SAMPLERS, *SCHEDULERS])}
    rows = sorted(
        rows, key=lambda r: (r.library, order.get(r.scheduler, 9), r.scheduler, r.dtype, r.steps)
    )
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * 4 + "---:|" * (len(HEAD) - 4)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def flow_times(library: str, name: str, steps: int, grid: str) -> list[float]:
    """The grid a row runs on as flow times t (1: pure noise, 0: the image)."""
    if library in ("destatic", "student"):
        from destatic.sampling.grids import make_sigmas

        sigmas = make_sigmas(grid, steps, process=bundled().process).to(torch.float64)
        t = torch.where(sigmas.isinf(), torch.ones_like(sigmas), sigmas / (1 + sigmas))
    else:
        scheduler = flow_scheduler(name)
        scheduler.set_timesteps(steps)
        t = scheduler.sigmas.to(torch.float64)
    return [round(float(v), 6) for v in t]


def drawer(library: str, name: str, dtype: torch.dtype, pipes: dict, loops: dict) -> Callable:
    """``draw(prompts, seeds, steps)`` → float images [B, 3, 32, 32] in [0, 1] for one row
    (``library`` "student": ``name`` is the student's model, drawn with its stored defaults)."""
    if library == "student":
        pipe = destatic.load(name).to(dtype=dtype)

        def draw(prompts, seeds, steps):
            return pipe.generate(prompts, steps=steps, guidance=3.0, seed=seeds)

        return draw
    if library == "destatic":
        pipe = pipes[dtype]

        def draw(prompts, seeds, steps):
            return pipe.generate(prompts, sampler=name, steps=steps, guidance=3.0, seed=seeds)

        return draw
    loop = loops[dtype]

    def draw(prompts, seeds, steps):
        noise = randn((len(prompts), 3, 32, 32), generators(seeds))
        return loop(prompts, noise, flow_scheduler(name), steps, 3.0)

    return draw


def measure(draw: Callable, prompts: list[str], steps: int, seed: int) -> tuple:
    """(float images of all prompts at batch 64, their wall and CPU seconds, median wall and CPU
    seconds of a 1-prompt call). CPU time (the process's) is less swayed by other work on a
    shared machine than wall time."""
    draw(prompts[:1], [seed], steps)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    images = []
    for lo in range(0, len(prompts), BATCH):
        hi = min(len(prompts), lo + BATCH)
        images.append(draw(prompts[lo:hi], list(range(seed + lo, seed + hi)), steps).float())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    single, single_cpu = [], []
    for i in range(SINGLE_REPS):
        t, c = time.perf_counter(), time.process_time()
        draw(prompts[i : i + 1], [seed + i], steps)
        single.append(time.perf_counter() - t)
        single_cpu.append(time.process_time() - c)
    return (
        torch.cat(images),
        wall,
        cpu,
        statistics.median(single),
        statistics.median(single_cpu),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=0, help="held-out prompts (0: all 376)")
    parser.add_argument("--steps", default="4,6,8,12", help="comma-separated step counts")
    parser.add_argument("--dtype", default="auto", help="the sweep's precision (auto: bf16 here)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-parity", action="store_true", help="skip the pixel parity check")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--students", default="emoji_lcm", help="comma-separated student models ('' = none)"
    )
    parser.add_argument("--student-steps", default="1,2,4")
    parser.add_argument("--append", action="store_true", help="keep --out's other rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers

    from destatic.metrics.evaluator import load_evaluator
    from destatic.metrics.inception import InceptionFeatures
    from destatic.metrics.sweep import reference_set, score_images
    from destatic.sampling import sampler_info

    dtype = pick_dtype(args.dtype, torch.device("cpu"))
    fp32 = torch.float32
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", fp32: "fp32"}
    steps_list = [int(s) for s in args.steps.split(",") if s.strip()]
    machine = f"{cpu_description()}, torch {torch.__version__}, diffusers {diffusers.__version__}"
    print(f"# time to quality, bundled emoji model, guidance 3; {machine}\n", flush=True)
    checks = [] if args.no_parity else parity()

    reference = reference_set("emoji", 32, n=args.n, seed=args.seed)
    prompts = reference.prompts
    evaluator, inception = load_evaluator(), InceptionFeatures()
    default_grid = bundled().sampling_defaults.get("grid") or "default"
    pipes = {d: destatic.load().to(dtype=d) for d in {dtype, fp32}}
    loops = {d: DiffusersLoop(d) for d in {dtype, fp32}}

    plan = []  # (library, sampler or scheduler, dtype, steps)
    for steps in steps_list:
        plan += [("destatic", s, dtype, steps) for s in SAMPLERS]
        plan += [("diffusers", s, dtype, steps) for s in SCHEDULERS]
        if steps == CHECK_STEPS and dtype != fp32:
            plan += [("destatic", "dpmpp_2m", fp32, steps)]
            plan += [("diffusers", "DPMSolverMultistep", fp32, steps)]
    for student in filter(None, args.students.split(",")):
        plan += [("student", student, dtype, int(s)) for s in args.student_steps.split(",")]
    kept: list[Row] = []
    if args.append and args.out.exists():
        measured = {(lib, name, names[d], steps) for lib, name, d, steps in plan}
        old = [Row(**r) for r in json.loads(args.out.read_text(encoding="utf-8"))["rows"]]
        kept = [r for r in old if (r.library, r.scheduler, r.dtype, r.steps) not in measured]
    rows: list[Row] = []
    for library, name, d, steps in plan:
        draw = drawer(library, name, d, pipes, loops)
        images, seconds, cpu, single, single_cpu = measure(draw, prompts, steps, args.seed)
        scores = score_images(
            images,
            reference,
            evaluator=evaluator,
            inception=inception,
            metrics=["retrieval", "fid"],
        )
        nfe = sampler_info(name).nfe(steps) if library == "destatic" else steps
        grid = {"destatic": default_grid, "diffusers": "its default"}.get(library)
        if library == "student":
            grid = destatic.load(name).sampling_defaults["grid"]
        row = Row(library, name, steps, names[d], grid, nfe, len(prompts))
        row.t_grid = flow_times(library, name, steps, grid)
        row.fid, row.top1, row.top5 = scores.fid, scores.top1, scores.top5
        row.seconds, row.s_per_image_b64 = seconds, seconds / len(prompts)
        row.s_per_image_b1, row.cpu_s_per_image_b1 = single, single_cpu
        row.cpu_s_per_image_b64 = cpu / len(prompts)
        row.threads = args.threads
        rows.append(row)
        print("| " + " | ".join(row.cells()) + " |", flush=True)
        payload = {
            "machine": machine,
            "threads": "per row",
            "n": len(prompts),
            "seed": args.seed,
            "guidance": 3.0,
            "parity": checks,
            "rows": [asdict(r) for r in kept + rows],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"\n{machine}; n = {len(prompts)} held-out prompts, seed {args.seed}\n")
    print(table(kept + rows))


if __name__ == "__main__":
    main()
