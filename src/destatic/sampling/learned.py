"""Bespoke non-stationary solvers (Shaul et al. 2024, "Bespoke
Non-Stationary Solvers for Fast Sampling of Diffusion and Flow Models", BNS): a sampler whose
every step has its own learned coefficients, fitted to one model.

With N model evaluations at ``σ_0 > σ_1 > … > σ_{N-1}`` (then 0), the state of each evaluation
and the output are free linear combinations of the start and of every earlier model output:

    D_j = D(x_j, σ_j),
    x_i = a_i·x_0 + Σ_{j<i} b_{ij}·D_j            for i = 1 … N,  returning x_N,

N(N+3)/2 coefficients ``C[i-1] = (a_i, b_{i0}, …, b_{i,i-1})`` on a σ grid. Every
deterministic one-evaluation-per-step sampler here (DDIM/Euler, DPM++ 2M/3M, LMS, UniPC with its
corrector) is linear in x_0 and the D_j, so it is one point of this family:
:meth:`BespokeSolver.from_sampler` reads its coefficients off by running it on a basis, and
:func:`fit_bespoke` starts there and minimises the error against the exact ODE states at the
grid's σ by gradient descent (L-BFGS) through the differentiable denoiser, in float64. Unlike
BNS, which also learns the times, the σ stay fixed: tune the grid first
(:func:`~destatic.sampling.optimize.optimize_sigmas`), then the coefficients.

A fitted solver is data, not a registered name: it is stored as JSON (:meth:`BespokeSolver.save`)
and run by :meth:`BespokeSolver.sample` or by :func:`bespoke`, which has a sampler's signature.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from destatic.sampling.base import Callback, DenoiserFn, report
from destatic.sampling.noise import NoiseFn
from destatic.sampling.sample import check_sigmas, sample, sampler_info

__all__ = ["BespokeSolver", "bespoke", "fit_bespoke"]

FORMAT = "destatic-bespoke-solver"


def _mask(n: int) -> torch.Tensor:
    """[N, N+1] with True where row i-1 may weight x_0 (column 0) or D_j (column 1+j), j < i."""
    return torch.ones(n, n + 1, dtype=torch.bool).tril(diagonal=1)


def _unit(size: int, k: int) -> torch.Tensor:
    """The unit vector e_k as a one-sample float64 state [1, size]."""
    return torch.eye(size, dtype=torch.float64)[k : k + 1]


def _solve(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    coefficients: torch.Tensor,
    callback: Callback | None = None,
) -> list[torch.Tensor]:
    """The states x_1 … x_N of the update rule in the module docstring; differentiable in
    ``coefficients`` ([N, N+1], zero above the diagonal)."""
    basis = [x]  # x_0, D_0, D_1, …
    states = [x]
    for i in range(coefficients.shape[0]):
        sigma = sigmas[i].to(x.dtype).expand(x.shape[0])
        denoised = denoiser(states[-1], sigma)
        if callback is not None:
            report(callback, i, float(sigmas[i]), float(sigmas[i + 1]), states[-1], denoised)
        basis.append(denoised)
        states.append(sum(c * v for c, v in zip(coefficients[i, : i + 2], basis, strict=True)))
    return states[1:]


@dataclass
class BespokeSolver:
    """A fitted solver: ``sigmas`` ([N+1], the N evaluation σ then 0) and ``coefficients``
    ([N, N+1]; row i-1 weights (x_0, D_0, …, D_{i-1}) to give x_i, zero beyond)."""

    sigmas: torch.Tensor
    coefficients: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sigmas = check_sigmas(self.sigmas)
        self.coefficients = torch.as_tensor(self.coefficients, dtype=torch.float64).detach()
        n = len(self.sigmas) - 1
        if self.coefficients.shape != (n, n + 1):
            raise ValueError(
                f"{n} steps need [{n}, {n + 1}] coefficients, got {tuple(self.coefficients.shape)}"
            )
        if float(self.sigmas[-1]) != 0 or math.isinf(float(self.sigmas[0])):
            raise ValueError("a bespoke grid starts at a finite σ and ends at 0")
        if bool(self.coefficients[~_mask(n)].ne(0).any()):
            raise ValueError("row i-1 may only weight x_0 and D_0 … D_{i-1} (zero beyond)")

    @property
    def steps(self) -> int:
        """N, the number of model evaluations."""
        return len(self.sigmas) - 1

    @classmethod
    def from_sampler(cls, name: str, sigmas: torch.Tensor, **options) -> BespokeSolver:
        """The coefficients of the registered deterministic sampler ``name`` on ``sigmas``.

        It runs the sampler on a one-sample state whose coordinates are the coefficients
        themselves: x_0 is the unit vector e_0 and the j-th model call returns e_{1+j}, so the
        state handed to each call, and the result, are the rows of C. This holds because the
        sampler is linear in its state and the model outputs, which is checked on the way.
        """
        info = sampler_info(name)
        sigmas = check_sigmas(sigmas)
        n = len(sigmas) - 1
        if info.stochastic or info.evals_per_step != 1:
            raise ValueError(f"{name} is not a deterministic one-evaluation-per-step sampler")
        calls: list[tuple[float, torch.Tensor]] = []

        def unit(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            calls.append((float(sigma[0]), x[0].clone()))
            return _unit(n + 1, len(calls))

        out = sample(name, unit, _unit(n + 1, 0), sigmas, **options)
        called = [s for s, _ in calls]
        if called != sigmas[:-1].tolist():
            raise ValueError(f"{name} evaluated the model at σ = {called}, not once per grid point")
        rows = torch.stack([c for _, c in calls[1:]] + [out[0]])
        solver = cls(sigmas, rows * _mask(n), {"init": name, **options})
        probe = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

        def nonlinear(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x) * (1 + sigma[:, None].log())

        if not torch.allclose(
            solver.sample(nonlinear, probe),
            sample(name, nonlinear, probe, sigmas, **options),
            rtol=1e-9,
            atol=1e-9,
        ):
            raise ValueError(f"{name} is not linear in its state and the model outputs")
        return solver

    def sample(
        self, denoiser: DenoiserFn, x: torch.Tensor, callback: Callback | None = None
    ) -> torch.Tensor:
        """Run the solver from ``x`` at ``sigmas[0]``; N model evaluations."""
        coefficients = self.coefficients.to(device=x.device, dtype=x.dtype)
        return _solve(denoiser, x, self.sigmas.to(x.device), coefficients, callback)[-1]

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": 1,
            "sigmas": self.sigmas.tolist(),
            "coefficients": [row[: i + 2].tolist() for i, row in enumerate(self.coefficients)],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> BespokeSolver:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format {data.get('format')!r})")
        n = len(data["sigmas"]) - 1
        coefficients = torch.zeros(n, n + 1, dtype=torch.float64)
        for i, row in enumerate(data["coefficients"]):
            coefficients[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        return cls(
            torch.tensor(data["sigmas"], dtype=torch.float64), coefficients, data.get("meta", {})
        )

    def save(self, path: str | Path) -> None:
        """Write the solver as JSON (floats written exactly, Python's shortest round-trip)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BespokeSolver:
        return cls.from_dict(json.loads(Path(path).read_text()))


def bespoke(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    solver: BespokeSolver,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """A fitted solver with a sampler's signature; ``sigmas`` must be the solver's own grid."""
    del noise  # deterministic
    sigmas = check_sigmas(sigmas)
    if sigmas.shape != solver.sigmas.shape or not torch.allclose(sigmas, solver.sigmas, rtol=1e-9):
        raise ValueError(
            f"this solver was fitted on σ = {solver.sigmas.tolist()}, not {sigmas.tolist()}"
        )
    return solver.sample(denoiser, x, callback)


def fit_bespoke(
    solver: BespokeSolver,
    problems: Sequence[tuple[DenoiserFn, torch.Tensor, Sequence[torch.Tensor]]],
    *,
    rounds: int = 10,
    iterations: int = 60,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[BespokeSolver, list[float]]:
    """Fit ``solver``'s coefficients to ``problems`` = [(denoiser, x at σ_0, targets), …], the
    targets being the exact ODE states at σ_1 … σ_{N-1} and 0
    (:func:`destatic.lab.reference_trajectory`).

    The loss is the mean over problems and over the N states of log RMS(x_i - target_i): not
    the final error alone, whose square is, in a multi-modal problem, mostly a few samples that
    end on another mode; the intermediate states at high σ are where those samples are decided.
    The σ stay fixed (the targets are tied to them; start from a tuned grid). The coefficients
    are ``C_init + S·θ`` with S scaling the x_0 column by σ_i/σ_0, θ fitted by full-batch
    L-BFGS (strong Wolfe line search) in float64, ``rounds`` restarts of at most
    ``iterations`` iterations each; the denoiser must be differentiable in torch. Returns the
    fitted solver and the training RMS of the final state after each round, the first entry
    being the starting solver's.
    """
    n = solver.steps
    mask = _mask(n).to(torch.float64)
    scale = torch.ones(n, n + 1, dtype=torch.float64)
    scale[:, 0] = solver.sigmas[1:].clamp(min=float(solver.sigmas[-2])) / solver.sigmas[0]
    theta = torch.zeros(n, n + 1, dtype=torch.float64, requires_grad=True)
    for _, x, targets in problems:
        if len(targets) != n or any(t.shape != x.shape for t in targets):
            raise ValueError(f"give {n} targets of the state's shape per problem")

    def coefficients() -> torch.Tensor:
        return (solver.coefficients + scale * theta) * mask

    def final_rms() -> float:
        with torch.no_grad():
            c = coefficients()
            errors = [
                ((_solve(d, x, solver.sigmas, c)[-1] - targets[-1]) ** 2).mean()
                for d, x, targets in problems
            ]
            return float(torch.stack(errors).mean().sqrt())

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        c = coefficients()
        total = torch.zeros((), dtype=torch.float64)
        for denoiser, x, targets in problems:
            states = _solve(denoiser, x, solver.sigmas, c)
            for state, target in zip(states, targets, strict=True):
                total = total + 0.5 * ((state - target) ** 2).mean().log()
        loss = total / (n * len(problems))
        loss.backward()
        return loss

    history = [final_rms()]
    for r in range(rounds):
        optimizer = torch.optim.LBFGS(
            [theta],
            max_iter=iterations,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-12,
            tolerance_change=1e-14,
        )
        optimizer.step(closure)
        history.append(final_rms())
        if progress is not None:
            progress(r, history[-1])
    meta = {**solver.meta, "fit": {"rounds": rounds, "iterations": iterations}}
    return BespokeSolver(solver.sigmas, coefficients().detach(), meta), history
