"""Step grids optimised for a sampler and a model, in the spirit of "Align Your Steps"
(Sabour, Fidler & Kreis 2024).

AYS minimises a bound on the KL divergence between the sampler's and the true trajectories. When
an accurate solution of the probability-flow ODE is available (the exact-score lab, or a
many-step solve of a trained model) the error itself can be minimised directly:

    min over σ₁ > … > σ_{n-1} of log RMS(sample(D, x_T, [σ_max, σ₁, …, σ_{n-1}, 0]) - x_ref)

The interior points are parameterised by n logits whose softmax gives the fractions of
log(σ_max/σ_min) covered by each step (the last fraction is what is left above σ_min), so every
candidate is a valid decreasing grid inside [σ_min, σ_max]. The objective is not smooth in the
grid (a sample can flip between modes), so a derivative-free search is used: Powell's method
from several starting grids, polished by Nelder–Mead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from destatic.sampling.grids import make_sigmas
from destatic.sampling.sample import sample

__all__ = ["grid_from_logits", "optimize_sigmas"]


def grid_from_logits(logits: np.ndarray, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The grid ``[σ_max, σ₁, …, σ_{n-1}, 0]`` for n step logits (float64)."""
    w = np.exp(logits - logits.max())
    w = w / w.sum()
    span = math.log(sigma_max) - math.log(sigma_min)
    interior = np.exp(math.log(sigma_max) - span * np.cumsum(w)[:-1])
    return torch.tensor([sigma_max, *interior, 0.0], dtype=torch.float64)


def _logits_of(sigmas: torch.Tensor, sigma_min: float) -> np.ndarray:
    """Inverse of :func:`grid_from_logits` for a grid ending ``…, σ_{n-1}, 0``."""
    log_s = np.log(np.append(sigmas[:-1].numpy(), sigma_min))
    return np.log(np.maximum(-np.diff(log_s), 1e-6))


def optimize_sigmas(
    sampler: str | Callable[[Callable, torch.Tensor, torch.Tensor], torch.Tensor],
    problems: Sequence[tuple[Callable, torch.Tensor, torch.Tensor]],
    steps: int,
    sigma_min: float,
    sigma_max: float,
    *,
    starts: Sequence[str] = ("karras", "exponential", "ays"),
    max_evals: int = 3000,
    **options,
) -> tuple[torch.Tensor, float]:
    """A grid of ``steps`` steps for ``sampler`` minimising the summed log RMS error over
    ``problems`` = [(denoiser, x at σ_max, reference x(0)), …]. Returns (grid, mean RMS).
    ``sampler`` is a name for :func:`~destatic.sampling.sample` (``options`` go to it) or a
    solver of your own, ``sampler(denoiser, x, grid) -> x(0)``."""
    from scipy.optimize import minimize

    def objective(logits: np.ndarray) -> float:
        grid = grid_from_logits(logits, sigma_min, sigma_max)
        if not bool((grid[1:] < grid[:-1]).all()):
            return math.inf  # two points merged: not a grid of ``steps`` steps
        total = 0.0
        for denoiser, x, reference in problems:
            out = (
                sampler(denoiser, x.clone(), grid)
                if callable(sampler)
                else sample(sampler, denoiser, x.clone(), grid, **options)
            )
            total += math.log(float(((out - reference) ** 2).mean().sqrt()))
        return total / len(problems)

    best = None
    for name in starts:
        start = make_sigmas(name, steps, sigma_min, sigma_max)
        if len(start) != steps + 1:
            continue
        found = minimize(
            objective,
            _logits_of(start, sigma_min),
            method="Powell",
            options={"maxfev": max_evals, "xtol": 1e-3, "ftol": 1e-5},
        )
        found = minimize(
            objective,
            found.x,
            method="Nelder-Mead",
            options={"maxfev": max_evals // 2, "adaptive": True},
        )
        if best is None or found.fun < best.fun:
            best = found
    return grid_from_logits(best.x, sigma_min, sigma_max), math.exp(best.fun)
