"""The sampler table: every sampler × NFE on an exact-score problem, against the exact ODE.

Each row runs one sampler on one grid from the same seeded noise as every other row and reports
the RMS distance to the reference ODE solution from that noise (how well it solves the ODE) and
the sliced W2 distance to true mixture samples (how good the samples are; the only meaningful
number for stochastic samplers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import torch

from destatic.lab.metrics import rms, sliced_wasserstein
from destatic.lab.mixture import GaussianMixture
from destatic.lab.reference import reference_solution
from destatic.process import Process, VPDiscrete
from destatic.sampling import SAMPLERS, make_sigmas, sample, sampler_info

__all__ = ["LabProblem", "LabRow", "format_table", "run_lab"]


@dataclass(frozen=True)
class LabRow:
    dim: int
    sampler: str
    grid: str
    budget: int  # NFE asked for
    nfe: int  # model evaluations used (at most the budget)
    steps: int
    rms: float  # RMS distance to the reference ODE solution from the same noise
    sw2: float  # sliced W2 distance to true samples

    def as_dict(self) -> dict:
        return asdict(self)


class LabProblem:
    """A mixture, a process and ``n`` shared noises, with the reference solution cached."""

    def __init__(
        self,
        dim: int = 2,
        n: int = 4096,
        seed: int = 0,
        process: Process | None = None,
        mixture: GaussianMixture | None = None,
    ):
        self.dim, self.n, self.seed = dim, n, seed
        self.process = process if process is not None else VPDiscrete()
        self.mixture = mixture if mixture is not None else GaussianMixture.standard(dim, seed=seed)
        self.noise = torch.randn(
            n, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
        )
        self.true_samples = self.mixture.sample(n, torch.Generator().manual_seed(seed + 2))

    def start(self, sigma: float) -> torch.Tensor:
        """The shared noise as the state at σ (carried as ``x/σ`` at σ = ∞)."""
        return self.noise.clone() if math.isinf(sigma) else self.noise * sigma

    @cached_property
    def reference(self) -> torch.Tensor:
        """x(0) of the probability-flow ODE from the shared noise at the process's σ_max."""
        sigma_max = self.process.sigma_max
        return reference_solution(self.mixture, self.start(sigma_max), sigma_max)

    def run(self, sampler: str, sigmas: torch.Tensor, **options) -> torch.Tensor:
        """Final states of ``sampler`` on ``sigmas`` from the shared noise (float64)."""
        gen = torch.Generator().manual_seed(self.seed + 100)  # one stream: the batch is fixed
        x = self.start(float(sigmas[0]))
        return sample(sampler, self.mixture, x, sigmas, generator=gen, **options)

    def evaluate(
        self, sampler: str, sigmas: torch.Tensor, budget: int = 0, grid: str = "custom", **options
    ) -> LabRow:
        """One table row for a given grid (which must start at the process's σ_max)."""
        if not math.isclose(float(sigmas[0]), self.process.sigma_max, rel_tol=1e-9):
            raise ValueError(f"the grid starts at {float(sigmas[0]):g}, not at the process's σ_max")
        out = self.run(sampler, sigmas, **options)
        steps = len(sigmas) - 1
        nfe = sampler_info(sampler).nfe(steps)
        return LabRow(
            self.dim,
            sampler,
            grid,
            budget or nfe,
            nfe,
            steps,
            rms(out, self.reference),
            sliced_wasserstein(out, self.true_samples),
        )

    def row(self, sampler: str, budget: int, grid: str = "karras", **grid_options) -> LabRow:
        """The row for ``sampler`` with at most ``budget`` evaluations on a named grid."""
        steps = sampler_info(sampler).steps_for(budget)
        sigmas = make_sigmas(grid, steps, process=self.process, **grid_options)
        return self.evaluate(sampler, sigmas, budget, grid)


def run_lab(
    dims: Iterable[int] = (2, 16),
    samplers: Sequence[str] | None = None,
    nfes: Iterable[int] = (4, 8, 16, 32),
    grid: str = "karras",
    n: int = 4096,
    seed: int = 0,
    process: Process | None = None,
    progress: bool = False,
) -> list[LabRow]:
    """Rows of the sampler table for every dim × sampler × NFE budget."""
    samplers = sorted(SAMPLERS) if samplers is None else list(samplers)
    for name in samplers:
        sampler_info(name)  # fail early on a typo
    jobs = [(d, s, k) for d in dims for s in samplers for k in nfes]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="lab", unit="run")
    problems: dict[int, LabProblem] = {}
    rows = []
    for dim, name, budget in jobs:
        if dim not in problems:
            problems[dim] = LabProblem(dim, n, seed, process)
        rows.append(problems[dim].row(name, budget, grid))
    return rows


def format_table(rows: Sequence[LabRow]) -> str:
    """A Markdown table: one line per (dim, sampler), RMS and SW2 at each NFE budget."""
    budgets = sorted({r.budget for r in rows})
    keys = sorted({(r.dim, r.sampler) for r in rows})
    lines = [
        "| dim | sampler | "
        + " | ".join(f"RMS @{k}" for k in budgets)
        + " | "
        + " | ".join(f"SW2 @{k}" for k in budgets)
        + " | NFE used |",
        "|---|---|" + "---:|" * (2 * len(budgets)) + "---|",
    ]
    for dim, name in keys:
        mine = {r.budget: r for r in rows if r.dim == dim and r.sampler == name}
        cells = [f"{mine[k].rms:.2e}" if k in mine else "" for k in budgets]
        cells += [f"{mine[k].sw2:.2e}" if k in mine else "" for k in budgets]
        used = "/".join(str(mine[k].nfe) for k in budgets if k in mine)
        lines.append(f"| {dim} | {name} | " + " | ".join(cells) + f" | {used} |")
    return "\n".join(lines)
