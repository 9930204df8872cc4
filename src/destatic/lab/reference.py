"""A reference solution of the probability-flow ODE, accurate far beyond any sampler.

In σ the ODE is ``dx/dσ = (x - D(x, σ))/σ``. Its start may be σ = ∞, so it is solved in the
VP-normalised variables ``u = x/√(1+σ²) = x·cos θ`` with ``θ = arctan σ ∈ [0, π/2]``:

    du/dθ = (dx/dσ·cos θ)·sec²θ - x·sin θ = (u·cos θ - D(x, σ)) / sin θ,

which is finite at θ = π/2 (where u = x/σ is the unit noise and the right side is -D(u, ∞)).
It is integrated in float64 by an adaptive 8th-order Runge–Kutta (scipy's DOP853). For
``sigma_end = 0`` it stops at σ = 1e-7 and finishes with one x̂0 there, within O(σ²) of x(0).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

from destatic.sampling.sample import check_sigmas

__all__ = ["reference_solution", "reference_trajectory"]


def reference_solution(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma_start: float,
    *,
    sigma_end: float = 0.0,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """x(σ_end) from the state ``x`` at ``sigma_start`` (``x/σ`` when it is ∞), float64."""
    shape = x.shape
    batch = shape[0]

    def denoise(x64: np.ndarray, sigma: float) -> np.ndarray:
        xt = torch.from_numpy(x64.reshape(shape))
        sig = torch.full((batch,), sigma, dtype=torch.float64)
        return denoiser(xt, sig).to(torch.float64).reshape(-1).numpy()

    def rhs(theta: float, u: np.ndarray) -> np.ndarray:
        if theta >= math.pi / 2:
            return -denoise(u, math.inf)
        c, s = math.cos(theta), math.sin(theta)
        return (u * c - denoise(u / c, math.tan(theta))) / s

    theta0 = math.pi / 2 if math.isinf(sigma_start) else math.atan(sigma_start)
    u0 = x.to(torch.float64).reshape(-1).numpy()
    if not math.isinf(sigma_start):
        u0 = u0 * math.cos(theta0)
    stop = sigma_end if sigma_end > 0 else 1e-7
    theta1 = math.atan(stop)
    sol = solve_ivp(rhs, (theta0, theta1), u0, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    x_end = sol.y[:, -1] / math.cos(theta1)
    if sigma_end == 0:
        x_end = denoise(x_end, stop)
    return torch.from_numpy(x_end.reshape(shape))


def reference_trajectory(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
) -> list[torch.Tensor]:
    """The exact probability-flow ODE states at ``sigmas[1:]`` from ``x`` at ``sigmas[0]``
    (:func:`reference_solution`, one segment after the other): the targets of
    :func:`destatic.sampling.learned.fit_bespoke` for the states x_1 … x_N of a solver on
    ``sigmas``."""
    sig = check_sigmas(sigmas).tolist()
    states = [x]
    for sigma, sigma_next in itertools.pairwise(sig):
        states.append(reference_solution(denoiser, states[-1], sigma, sigma_end=sigma_next))
    return states[1:]
