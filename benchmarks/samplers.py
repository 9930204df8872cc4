"""Sampler error against NFE: every destatic sampler beside diffusers' schedulers and
k-diffusion's samplers, on one exact-score problem and one set of noises.

    python benchmarks/samplers.py                      # the full run (a few minutes on 2 cores)
    python benchmarks/samplers.py --json out.json      # also write every row as JSON

The problem is :class:`destatic.lab.LabProblem`: a mixture of 8 Gaussians (std 0.1, unit
variance per coordinate) whose posterior mean is known in closed form, Stable Diffusion's VP
noise process (σ from 0.0292 to 14.6146) and ``n`` shared noises z. Every sampler, ours or a
peer's, starts from the same state ``x = σ_max·z`` and asks the exact denoiser; errors are

* **RMS** to the reference: the float64 DOP853 solution of the probability-flow ODE from that
  same state (how well a deterministic sampler solves the ODE);
* **median** and **flips**: the median sample's RMS error, and how many samples end more than
  ``FLIP`` from their reference (on another mixture component). In 16-D the RMS at high NFE is
  mostly two to four such samples out of 4096, so a ranking by RMS there is a ranking by who
  flips fewer boundary samples; the median says how well the rest of the path is solved (at
  4 NFE the median error itself nears ``FLIP`` and flips just counts large errors);
* **SW2**: sliced Wasserstein-2 to exact mixture samples (sample quality; the only meaningful
  number for a stochastic sampler, whose RMS to one ODE path is not an error).

How the peers are driven (see ``shared/research/anchors.md`` for why each point matters):

* diffusers schedulers get the SD 1.x config (scaled_linear β 0.00085 → 0.012, 1000 steps,
  ε-prediction), ``clip_sample=False`` and their own timestep selection for the step count.
  At each call the exact ε is computed at the σ the scheduler uses for that step
  (``scheduler.sigmas[i]``; for DDIM σ of ``alphas_cumprod[t]``): ``ε = (x - D(x, σ))/σ``
  with ``x`` the σ-space state (``x_t·√(1+σ²)`` for the VP-latent schedulers).
* VP-latent schedulers (DDIM, DPMSolverMultistep, UniPC) would start from ``x_t = z``, i.e.
  ``√(1+σ_max²)·z`` in σ-space; they are given ``x_t = σ_max·z/√(1+σ_max²)`` instead, the same
  start as everyone else. DDIM uses ``set_alpha_to_one=True`` (its last step lands on σ = 0,
  where the reference is), and ``steps_offset=1`` with leading spacing (SD's config). Leading
  spacing starts below σ_max (t = 751 of 999 at 4 steps): it is given the same array anyway,
  and its error includes treating that state as if it were at the lower noise level.
* Beyond the usual configurations, the peers also run with the knobs destatic's best rows use
  (UniPC bh1, DPM-Solver++ third order, exponential grids), so that "best peer" is the best
  these libraries reach here. diffusers' UniPC bh1 returns NaN with its default
  ``final_sigmas_type="zero"`` (B(h) = -h is infinite on the last step); it is reported as failed.
* k-diffusion's samplers take the exact denoiser directly, on ``get_sigmas_karras`` (and
  ``get_sigmas_exponential``). Its stochastic ``dpmpp_2m_sde`` gets the same seeded draws as
  destatic's stochastic samplers (one ``noise_sampler`` stream), so even the stochastic pair is
  compared path by path.

The parity table reruns the destatic sampler of the same algorithm on exactly the σ grid a peer
used, from exactly the peer's start: the difference between the two outputs should be at the
level of float32 rounding (diffusers computes its tables in float32). A larger difference
points at a bug on one side, or at a peer that departs from its own grid (diffusers' DDIM steps
to ``t - 1000//steps``, which is not the next timestep of trailing spacing unless ``steps``
divides 1000).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from destatic.lab import LabProblem, rms, sliced_wasserstein
from destatic.sampling import SAMPLER_INFO, make_sigmas, noise_sampler, sample

# lab2d/lab16d are the grids optimised by benchmarks/optimize_grids.py on training noise disjoint
# from this run's noise (the AYS approach the issue allows); the summary also shows karras alone.
OUR_GRIDS = ("karras", "exponential", "ays", "normal", "trailing", "lab2d", "lab16d")
SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
# peer sampler -> the destatic sampler that implements the same algorithm
SAME_ALGORITHM = {
    "DDIM": "ddim",
    "Euler": "euler",
    "Heun": "heun",
    "LMS": "lms",
    "DPMSolverMultistep": "dpmpp_2m",
    "UniPC": "uni_pc",
    "UniPC bh1": "uni_pc_bh1",
    "DPMSolverMultistep order 3": "dpmpp_3m",
    "euler": "euler",
    "heun": "heun",
    "lms": "lms",
    "dpmpp_2m": "dpmpp_2m",
    "dpm_2": "dpm_2",
    "dpmpp_2m_sde": "dpmpp_2m_sde",
    "dpmpp_3m_sde eta=0": "dpmpp_3m",
}
PARITY_TOL = 1e-4  # relative to the state's scale (~1): well above float32 table rounding
FLIP = 0.25  # per-sample error above 2.5 component stds: the sample changed component


@dataclass
class Row:
    dim: int
    library: str  # destatic, diffusers or k-diffusion
    sampler: str
    grid: str
    budget: int  # NFE asked for
    nfe: int  # model evaluations actually made
    rms: float  # to the reference ODE solution (meaningless for stochastic samplers)
    median: float  # median over samples of each sample's RMS error to the reference
    flips: int  # samples more than FLIP from their reference: they changed mixture component
    sw2: float  # to true mixture samples
    stochastic: bool
    seconds: float
    error: str = ""

    @property
    def label(self) -> str:
        prefix = "" if self.library == "destatic" else f"{self.library} "
        return f"{prefix}{self.sampler} ({self.grid})"


@dataclass
class Parity:
    dim: int
    peer: str  # label of the peer row
    ours: str  # the destatic sampler run on the peer's own grid
    budget: int
    rms_peer: float
    rms_ours: float
    difference: float  # RMS distance between the two outputs
    median_difference: float  # median over samples of the per-sample RMS distance
    note: str = ""

    @property
    def same(self) -> bool:
        return self.difference < PARITY_TOL

    @property
    def same_but_outliers(self) -> bool:
        """Equal for almost every sample; a few near a component boundary amplify rounding."""
        return not self.same and self.median_difference < PARITY_TOL / 10


@dataclass
class PeerRun:
    out: torch.Tensor
    nfe: int
    start: torch.Tensor  # σ-space state at sigmas[0]
    sigmas: torch.Tensor  # the σ of each model call, then the last σ (0)


# --- the exact model, counted ------------------------------------------------------------------


class Counted:
    """The exact denoiser D(x, σ) with a call counter."""

    def __init__(self, problem: LabProblem):
        self.mixture = problem.mixture
        self.calls = 0
        self.sigmas: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        self.sigmas.append(float(sigma[0]))
        return self.mixture(x, sigma.expand(x.shape[0]))


def peer_grid(called: list[float]) -> torch.Tensor:
    """A destatic grid from the σ of a peer's model calls: merged repeats, then 0."""
    sig = torch.tensor(called, dtype=torch.float64)
    return torch.cat([torch.unique_consecutive(sig), sig.new_zeros(1)])


# --- diffusers ---------------------------------------------------------------------------------

# name, grid label, scheduler class, config overrides, "vp" (state x_t) or "sigma" (state x)
DIFFUSERS = [
    ("DDIM", "trailing", "DDIMScheduler", {"timestep_spacing": "trailing"}, "vp"),
    ("DDIM", "leading", "DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1}, "vp"),
    ("Euler", "default", "EulerDiscreteScheduler", {}, "sigma"),
    ("Euler", "karras", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, "sigma"),
    ("Heun", "karras", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, "sigma"),
    ("LMS", "karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}, "sigma"),
    ("DPMSolverMultistep", "default", "DPMSolverMultistepScheduler", {}, "vp"),
    (
        "DPMSolverMultistep",
        "karras",
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True},
        "vp",
    ),
    ("UniPC", "default", "UniPCMultistepScheduler", {}, "vp"),
    ("UniPC", "karras", "UniPCMultistepScheduler", {"use_karras_sigmas": True}, "vp"),
]
# Beyond the usual list: the same knobs destatic's best rows use (bh1, third order, the
# exponential grid), so that "best peer" is the best these libraries can do here.
KARRAS, EXPONENTIAL = {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}
DIFFUSERS_EXTRA = [
    ("UniPC bh1", "karras", "UniPCMultistepScheduler", {**KARRAS, "solver_type": "bh1"}, "vp"),
    ("UniPC", "exponential", "UniPCMultistepScheduler", EXPONENTIAL, "vp"),
    ("DPMSolverMultistep", "exponential", "DPMSolverMultistepScheduler", EXPONENTIAL, "vp"),
    (
        "DPMSolverMultistep order 3",
        "karras",
        "DPMSolverMultistepScheduler",
        {**KARRAS, "solver_order": 3},
        "vp",
    ),
]


def make_scheduler(cls_name: str, overrides: dict):
    import diffusers

    config = dict(SD_CONFIG, **overrides)
    if cls_name == "DDIMScheduler":
        config.update(clip_sample=False, set_alpha_to_one=True)
    return getattr(diffusers, cls_name)(**config)


def run_diffusers(problem: LabProblem, cls_name: str, overrides: dict, space: str, steps: int):
    """One diffusers scheduler loop with the exact ε at each of its steps."""
    sched = make_scheduler(cls_name, overrides)
    sched.set_timesteps(steps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    model = Counted(problem)
    sigma_max = problem.process.sigma_max
    x = problem.start(sigma_max)
    state = x / math.sqrt(1 + sigma_max**2) if space == "vp" else x
    for i, t in enumerate(sched.timesteps):
        sched.scale_model_input(state, t)  # only to initialise the step index: D needs σ-space
        if cls_name == "DDIMScheduler":
            alpha_bar = float(sched.alphas_cumprod[int(t)])
            sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
        else:
            sigma = float(sched.sigmas[i])
        x_sigma = state * math.sqrt(1 + sigma**2) if space == "vp" else state
        if i == 0:
            start = x_sigma.clone()
        denoised = model(x_sigma, torch.tensor([sigma], dtype=torch.float64))
        eps = (x_sigma - denoised) / sigma
        state = sched.step(eps, t, state).prev_sample
        if getattr(sched, "step_index", None) is not None and sched.step_index != i + 1:
            raise RuntimeError(f"{cls_name}: step index {sched.step_index} after step {i}")
    # every configuration here ends at σ = 0, where x_t = x
    return PeerRun(state.to(torch.float64), model.calls, start, peer_grid(model.sigmas))


# --- k-diffusion -------------------------------------------------------------------------------


def load_k_sampling() -> types.ModuleType:
    """``k_diffusion.sampling``; loaded by file path when the package ``__init__`` fails on its
    training dependencies (torchvision, clip, wandb, scikit-image…). That file needs only
    ``utils.append_dims`` from the package, which is stood in for here (same three lines)."""
    try:
        import k_diffusion.sampling as ks

        return ks
    except ImportError:
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "k-diffusion is not installed: pip install torchsde torchdiffeq && "
            "pip install --no-deps k-diffusion==0.1.1.post1"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("_k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("_k_diffusion.utils")

    def append_dims(x, target_dims):
        dims_to_append = target_dims - x.ndim
        if dims_to_append < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}")
        return x[(...,) + (None,) * dims_to_append]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules["_k_diffusion"] = package
    sys.modules["_k_diffusion.utils"] = utils
    file_spec = importlib.util.spec_from_file_location(
        "_k_diffusion.sampling", folder / "sampling.py"
    )
    module = importlib.util.module_from_spec(file_spec)
    sys.modules["_k_diffusion.sampling"] = module
    file_spec.loader.exec_module(module)
    return module


# (sampler, grid): the usual list, then the extra knobs (third order, the exponential grid)
K_RUNS = [
    ("euler", "karras"),
    ("heun", "karras"),
    ("lms", "karras"),
    ("dpmpp_2m", "karras"),
    ("dpm_2", "karras"),
    ("dpmpp_2m_sde", "karras"),
    ("dpmpp_3m_sde eta=0", "karras"),
    ("euler", "exponential"),
    ("lms", "exponential"),
    ("dpmpp_2m", "exponential"),
    ("dpmpp_3m_sde eta=0", "exponential"),
]


def run_k(ks, problem: LabProblem, name: str, grid: str, steps: int) -> PeerRun:
    process = problem.process
    get_sigmas = getattr(ks, f"get_sigmas_{grid}")
    sigmas = get_sigmas(steps, process.sigma_min, process.sigma_max).to(torch.float64)
    model = Counted(problem)
    x = problem.start(process.sigma_max)
    options: dict = {"disable": True}
    if name == "dpmpp_2m_sde":  # the draws destatic's stochastic samplers get here
        options["noise_sampler"] = draws(problem)
    if name == "dpmpp_3m_sde eta=0":
        name = "dpmpp_3m_sde"
        options.update(eta=0.0, noise_sampler=lambda sigma, sigma_next: None)  # never drawn
    with torch.no_grad():
        out = getattr(ks, f"sample_{name}")(model, x.clone(), sigmas, **options)
    return PeerRun(out.to(torch.float64), model.calls, x, sigmas)


# --- measuring ---------------------------------------------------------------------------------


def draws(problem: LabProblem):
    """A fresh seeded noise stream (k-diffusion's ``noise_sampler(sigma, sigma_next)``): every
    stochastic sampler, destatic's and k-diffusion's, gets the same draws in the same order."""
    return noise_sampler(problem.noise, torch.Generator().manual_seed(problem.seed + 100))


def per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each sample's RMS distance over its coordinates."""
    return ((a.to(torch.float64) - b.to(torch.float64)) ** 2).mean(dim=1).sqrt()


def score(problem, library, name, grid, budget, nfe, out, stochastic, seconds) -> Row:
    """A table row for the final states ``out`` of one run."""
    if not bool(torch.isfinite(out).all()):
        return unscored(
            problem, library, name, grid, budget, nfe, stochastic, seconds, "non-finite output"
        )
    errors = per_sample(out, problem.reference)
    return Row(
        problem.dim,
        library,
        name,
        grid,
        budget,
        nfe,
        rms(out, problem.reference),
        float(errors.median()),
        int((errors > FLIP).sum()),
        sliced_wasserstein(out, problem.true_samples),
        stochastic,
        seconds,
    )


def unscored(problem, library, name, grid, budget, nfe, stochastic, seconds, error) -> Row:
    """A row without metrics: the run blew up (a blow-up is a result too)."""
    nan = math.nan
    return Row(
        problem.dim, library, name, grid, budget, nfe, nan, nan, -1, nan, stochastic, seconds, error
    )


def failed(problem, library, name, grid, budget, stochastic, t0, err) -> Row:
    """A row for a run that raised."""
    seconds = time.perf_counter() - t0
    message = f"{type(err).__name__}: {err}"
    return unscored(problem, library, name, grid, budget, 0, stochastic, seconds, message)


def measure(problem, library, name, grid, budget, stochastic, fn, *args):
    """Run a peer, ``fn(*args) -> PeerRun``, and score it."""
    t0 = time.perf_counter()
    try:
        run = fn(*args)
    except Exception as err:
        return failed(problem, library, name, grid, budget, stochastic, t0, err), None
    seconds = time.perf_counter() - t0
    return score(problem, library, name, grid, budget, run.nfe, run.out, stochastic, seconds), run


def ours(problem: LabProblem, name: str, grid: str, budget: int) -> Row:
    """A destatic sampler on a named grid with at most ``budget`` evaluations, with the steps
    and grid :meth:`LabProblem.row` uses; stochastic ones get the shared :func:`draws`."""
    info = SAMPLER_INFO[name]
    t0 = time.perf_counter()
    try:
        steps = info.steps_for(budget)
        sigmas = make_sigmas(grid, steps, process=problem.process)
        out = problem.run(name, sigmas, noise=draws(problem) if info.stochastic else None)
    except Exception as err:
        return failed(problem, "destatic", name, grid, budget, info.stochastic, t0, err)
    seconds = time.perf_counter() - t0
    nfe = info.nfe(len(sigmas) - 1)
    return score(problem, "destatic", name, grid, budget, nfe, out, info.stochastic, seconds)


def parity(problem: LabProblem, peer: Row, run: PeerRun) -> Parity:
    """Our sampler of the same algorithm on exactly the peer's grid, from the peer's start."""
    name = SAME_ALGORITHM[peer.sampler]
    note = ""
    try:
        out = sample(name, problem.mixture, run.start.clone(), run.sigmas, noise=draws(problem))
        difference = rms(out, run.out)
        median_difference = float(per_sample(out, run.out).median())
        rms_ours = rms(out, problem.reference)
    except Exception as err:
        difference = median_difference = rms_ours = math.nan
        note = f"{type(err).__name__}: {err}"
    steps = len(run.sigmas) - 1
    if peer.error:
        note = f"the peer failed: {peer.error}"
    if peer.sampler == "DDIM" and 1000 % steps != 0:
        note = note or "diffusers DDIM steps to t - 1000//steps, off its own trailing/leading grid"
    if peer.sampler == "DPMSolverMultistep order 3" and steps < 15:
        note = note or "below 15 steps diffusers lowers the order of the last two steps"
    return Parity(
        problem.dim,
        peer.label,
        name,
        peer.budget,
        peer.rms,
        rms_ours,
        difference,
        median_difference,
        note,
    )


# --- formatting --------------------------------------------------------------------------------


def fmt(v: float) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:.2e}"


METRIC_NAMES = {"rms": "RMS", "median": "median", "flips": "flips", "sw2": "SW2"}


def value_table(rows: list[Row], budgets: list[int], metrics=("rms", "median", "sw2")):
    keys = list(dict.fromkeys((r.library, r.sampler, r.grid) for r in rows))
    head = "| sampler | " + " | ".join(f"{METRIC_NAMES[m]} @{b}" for m in metrics for b in budgets)
    lines = [head + " | NFE used |", "|---|" + "---:|" * (len(metrics) * len(budgets)) + "---|"]
    for key in keys:
        mine = {r.budget: r for r in rows if (r.library, r.sampler, r.grid) == key}
        cells = []
        for m in metrics:
            for b in budgets:
                value = getattr(mine[b], m) if b in mine else None
                cells.append("" if value is None else str(value) if m == "flips" else fmt(value))
        used = "/".join(str(mine[b].nfe) for b in budgets if b in mine)
        label = next(iter(mine.values())).label
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {used} |")
    return lines


def best(rows: list[Row], metric: str = "rms") -> Row | None:
    finite = [r for r in rows if not math.isnan(getattr(r, metric))]
    return min(finite, key=lambda r: getattr(r, metric)) if finite else None


def summary_table(det: list[Row], dims, budgets, metric: str) -> tuple[list[str], list[dict]]:
    name = METRIC_NAMES[metric]
    lines = [
        f"| dim | NFE | best destatic | {name} | flips | best destatic on karras | {name} "
        f"| best peer (diffusers, k-diffusion, every configuration run) | {name} | flips "
        "| peer/ours |",
        "|---:|---:|---|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    records = []
    for dim in dims:
        for b in budgets:
            here = [r for r in det if r.dim == dim and r.budget == b]
            mine = [r for r in here if r.library == "destatic"]
            o = best(mine, metric)
            k = best([r for r in mine if r.grid == "karras"], metric)
            p = best([r for r in here if r.library != "destatic"], metric)
            ratio = getattr(p, metric) / getattr(o, metric) if o and p else math.nan
            records.append(
                {
                    "metric": metric,
                    "dim": dim,
                    "budget": b,
                    "ours": o.label if o else None,
                    "ours_value": getattr(o, metric) if o else None,
                    "ours_nfe": o.nfe if o else None,
                    "ours_flips": o.flips if o else None,
                    "ours_karras": k.label if k else None,
                    "ours_karras_value": getattr(k, metric) if k else None,
                    "peer": p.label if p else None,
                    "peer_value": getattr(p, metric) if p else None,
                    "peer_nfe": p.nfe if p else None,
                    "peer_flips": p.flips if p else None,
                    "ratio": ratio,
                }
            )
            cells = [str(dim), str(b)]
            for r, extra in ((o, True), (k, False), (p, True)):
                cells.append(f"{r.label} ({r.nfe})" if r else "—")
                cells.append(fmt(getattr(r, metric)) if r else "—")
                if extra:
                    cells.append(str(r.flips) if r else "—")
            cells.append(f"{ratio:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return lines, records


def report(rows, parities, budgets, dims, floors, meta) -> tuple[str, list[dict]]:
    det = [r for r in rows if not r.stochastic]
    out = [
        "# Sampler error against NFE: destatic, diffusers, k-diffusion",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Environment: {meta['environment']}",
        "",
        "Problem: 8-component Gaussian mixture (std 0.1, unit variance), exact denoiser; SD 1.x "
        f"VP process (σ 0.0292 → 14.6146); {meta['samples']} shared noises, seed {meta['seed']}; "
        "every sampler starts from σ_max·z.",
        "",
        "- RMS: to the float64 reference ODE solution from the same noise.",
        "- median: the median sample's RMS error (robust to the few samples that land on "
        "another mixture component).",
        f"- flips: samples more than {FLIP:g} (per-coordinate RMS) from their reference, i.e. on "
        "another component once the median error is small (at 4 NFE, where the median itself "
        "nears it, flips just counts large errors).",
        "- SW2: sliced W2 to exact mixture samples. RMS, median and flips are meaningless for "
        "stochastic samplers, which do not follow the ODE path: judge them by SW2.",
        "- peer/ours > 1 means destatic is more accurate. NFE actually used in parentheses "
        "(heun, dpm_2 and Heun use 2·steps − 1 ≤ the budget).",
        "",
        "## Summary: best deterministic destatic sampler vs best deterministic peer, by RMS",
        "",
    ]
    lines, summary = summary_table(det, dims, budgets, "rms")
    out += lines
    out += [
        "",
        "## Summary by median per-sample error",
        "",
        "In 16-D the RMS at high NFE is mostly a handful of samples (of "
        f"{meta['samples']}) that end on another mixture component; the median shows how well "
        "the rest of the path is solved.",
        "",
    ]
    lines, records = summary_table(det, dims, budgets, "median")
    out += lines
    summary += records
    for dim in dims:
        mine = [r for r in det if r.dim == dim and r.library == "destatic"]
        out += ["", f"## {dim}-D", "", "### destatic, deterministic, every grid", ""]
        out += value_table(mine, budgets)
        out += ["", "### destatic: best grid per sampler (RMS, grid)", ""]
        out += [
            "| sampler | " + " | ".join(f"@{b}" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for name in dict.fromkeys(r.sampler for r in mine):
            cells = []
            for b in budgets:
                r = best([x for x in mine if x.sampler == name and x.budget == b])
                cells.append(f"{fmt(r.rms)} {r.grid}" if r else "—")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out += ["", "### peers, deterministic", ""]
        out += value_table([r for r in det if r.dim == dim and r.library != "destatic"], budgets)
        out += ["", "### flips (samples on another component than their reference)", ""]
        out += value_table([r for r in det if r.dim == dim], budgets, metrics=("flips",))
        out += [
            "",
            "### stochastic samplers (karras): SW2 to true samples",
            "",
            f"Floor: the exact ODE solution itself has SW2 {fmt(floors[dim])} "
            "(finite-sample noise of the metric).",
            "",
        ]
        sto = [r for r in rows if r.dim == dim and r.stochastic]
        out += value_table(sto, budgets, metrics=("sw2",))
        errors = [r for r in rows if r.dim == dim and r.error]
        if errors:
            out += ["", "Failed runs:", ""]
            out += [f"- {r.label} @{r.budget}: {r.error}" for r in errors]
    out += [
        "",
        "## Parity: the same algorithm on the peer's exact grid and start",
        "",
        "`difference` is the RMS distance between the peer's output and destatic's, `median` the "
        f"median sample's; both should be float32 rounding (< {PARITY_TOL:g}). 'same but for "
        "outliers': the median sample agrees to rounding and a few samples near a component "
        "boundary amplify it.",
        "",
        "| dim | peer | NFE budget | destatic | RMS peer | RMS destatic | difference | median "
        "| verdict |",
        "|---:|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for p in parities:
        if math.isnan(p.difference):
            verdict = "not compared"
        elif p.same:
            verdict = "same"
        else:
            verdict = "same but for outliers" if p.same_but_outliers else "**differs**"
        if p.note:
            verdict += f" ({p.note})"
        out.append(
            f"| {p.dim} | {p.peer} | {p.budget} | {p.ours} | {fmt(p.rms_peer)} | "
            f"{fmt(p.rms_ours)} | {fmt(p.difference)} | {fmt(p.median_difference)} | {verdict} |"
        )
    out += [
        "",
        "Time per phase (s): " + ", ".join(f"{k} {v:.1f}" for k, v in meta["phases"].items()),
    ]
    out += ["", f"Total time: {meta['elapsed']:.1f} s"]
    return "\n".join(out) + "\n", summary


# --- main --------------------------------------------------------------------------------------


def finite_json(value):
    """NaN (a failed run) becomes null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def environment() -> str:
    from destatic.pipelines.devices import cpu_description

    cpu = cpu_description()

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, diffusers "
        f"{version('diffusers')}, k-diffusion {version('k-diffusion')}, destatic "
        f"{version('destatic')}; {cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="2,16", help="problem dimensions (default 2,16)")
    parser.add_argument("--nfe", default="4,8,16,32", help="NFE budgets (default 4,8,16,32)")
    parser.add_argument("--samples", type=int, default=4096, help="shared noises (default 4096)")
    parser.add_argument("--seed", type=int, default=0, help="seed of mixture, noise and draws")
    parser.add_argument(
        "--grids",
        default=",".join(OUR_GRIDS),
        help="grids for destatic's deterministic samplers (default: %(default)s; lab2d/lab16d "
        "were optimised on this problem's mixture with other noise: benchmarks/optimize_grids.py)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = parser.parse_args(argv)
    dims, budgets = ints(args.dims), ints(args.nfe)
    grids = [g.strip() for g in args.grids.split(",") if g.strip()]

    start = time.perf_counter()
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    command = (
        f"python {shlex.quote(str(script))} --dims {','.join(map(str, dims))} "
        f"--nfe {','.join(map(str, budgets))} --samples {args.samples} --seed {args.seed}"
    )
    if grids != list(OUR_GRIDS):
        command += f" --grids {','.join(grids)}"
    if args.json is not None:
        command += f" --json {shlex.quote(str(args.json))}"
    print(f"command: {command}", file=sys.stderr)

    ks = load_k_sampling()
    deterministic = sorted(n for n, i in SAMPLER_INFO.items() if not i.stochastic)
    stochastic = sorted(n for n, i in SAMPLER_INFO.items() if i.stochastic)
    rows: list[Row] = []
    parities: list[Parity] = []
    floors: dict[int, float] = {}
    phases: dict[str, float] = {}

    def phase(name: str, t0: float) -> None:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

    for dim in dims:
        t0 = time.perf_counter()
        problem = LabProblem(dim, args.samples, args.seed)
        floors[dim] = sliced_wasserstein(problem.reference, problem.true_samples)
        phase("reference", t0)
        print(f"{dim}-D reference ready ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

        t0 = time.perf_counter()
        for name in deterministic:
            for grid in grids:
                rows += [ours(problem, name, grid, b) for b in budgets]
        for name in stochastic:
            rows += [ours(problem, name, "karras", b) for b in budgets]
        phase("destatic", t0)

        t0 = time.perf_counter()
        for name, grid, cls_name, overrides, space in DIFFUSERS + DIFFUSERS_EXTRA:
            for b in budgets:
                steps = SAMPLER_INFO["heun"].steps_for(b) if name == "Heun" else b
                peer = (problem, cls_name, overrides, space, steps)
                row, run = measure(problem, "diffusers", name, grid, b, False, run_diffusers, *peer)
                rows.append(row)
                if run is not None:
                    parities.append(parity(problem, row, run))
        phase("diffusers", t0)

        t0 = time.perf_counter()
        for name, grid in K_RUNS:
            sto = name == "dpmpp_2m_sde"
            for b in budgets:
                steps = SAMPLER_INFO[SAME_ALGORITHM[name]].steps_for(b)
                peer = (ks, problem, name, grid, steps)
                row, run = measure(problem, "k-diffusion", name, grid, b, sto, run_k, *peer)
                rows.append(row)
                if run is not None:
                    parities.append(parity(problem, row, run))
        phase("k-diffusion", t0)
        print(f"{dim}-D done ({time.perf_counter() - start:.1f} s so far)", file=sys.stderr)

    elapsed = time.perf_counter() - start
    meta = {
        "command": command,
        "environment": environment(),
        "samples": args.samples,
        "seed": args.seed,
        "phases": phases,
        "elapsed": elapsed,
    }
    text, summary = report(rows, parities, budgets, dims, floors, meta)
    print(text, end="")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            **meta,
            "dims": dims,
            "budgets": budgets,
            "sw2_floor": {str(d): v for d, v in floors.items()},
            "summary": summary,
            "rows": [asdict(r) for r in rows],
            "parity": [asdict(p) for p in parities],
        }
        args.json.write_text(json.dumps(finite_json(payload), indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
