"""Solvers of the probability-flow ODE ``dx/dσ = (x - D(x, σ))/σ`` in σ.

Euler and Heun follow EDM's Algorithm 2 (Karras et al. 2022), with its optional churn; DPM-2 is
the midpoint rule in log σ (k-diffusion's ``sample_dpm_2``); LMS is the linear multistep method
of order 4 on the non-uniform σ grid (Adams–Bashforth, as in k-diffusion and diffusers).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from destatic.sampling.base import churn, register, report, sigma_batch, to_d
from destatic.sampling.noise import NoiseFn

__all__ = ["dpm_2", "euler", "heun", "lms", "lms_coefficients"]

_INF = float("inf")


def _ode_loop(denoiser, x, sigmas, noise, callback, s_churn, s_tmin, s_tmax, s_noise, corrector):
    """The shared loop of EDM-style samplers: churn, an Euler predictor, an optional corrector.

    ``corrector(x, d, sigma_hat, sigma_next)`` returns the second-order update, or None for Euler.
    The last step, to σ = 0, is always an Euler step (no model call at σ = 0).
    """
    sig = sigmas.tolist()
    steps = len(sig) - 1
    for i in range(steps):
        sigma, sigma_next = sig[i], sig[i + 1]
        x, sigma_hat = churn(x, sigma, steps, noise, s_churn, s_tmin, s_tmax, s_noise, sigma_next)
        denoised = denoiser(x, sigma_batch(x, sigma_hat))
        report(callback, i, sigma, sigma_next, x, denoised)
        d = to_d(x, sigma_hat, denoised)
        update = corrector(x, d, sigma_hat, sigma_next) if sigma_next > 0 and corrector else None
        x = x + d * (sigma_next - sigma_hat) if update is None else update
    return x


def euler(
    denoiser,
    x,
    sigmas,
    *,
    noise: NoiseFn | None = None,
    callback=None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = _INF,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler's method (first order): ``x ← x + (σ_next - σ)·(x - D)/σ``. In σ-space this is
    exactly DDIM with η = 0 (Song et al. 2021): ``x_next = D + σ_next·(x - D)/σ``."""
    return _ode_loop(denoiser, x, sigmas, noise, callback, s_churn, s_tmin, s_tmax, s_noise, None)


def heun(
    denoiser,
    x,
    sigmas,
    *,
    noise: NoiseFn | None = None,
    callback=None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = _INF,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's second-order method (EDM Algorithm 2): the trapezoid of the slopes at σ and at the
    Euler prediction at σ_next."""

    def trapezoid(x, d, sigma_hat, sigma_next):
        x_euler = x + d * (sigma_next - sigma_hat)
        d_next = to_d(x_euler, sigma_next, denoiser(x_euler, sigma_batch(x, sigma_next)))
        return x + (d + d_next) / 2 * (sigma_next - sigma_hat)

    return _ode_loop(
        denoiser, x, sigmas, noise, callback, s_churn, s_tmin, s_tmax, s_noise, trapezoid
    )


def dpm_2(
    denoiser,
    x,
    sigmas,
    *,
    noise: NoiseFn | None = None,
    callback=None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = _INF,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-2 in σ (Lu et al. 2022; k-diffusion): the midpoint rule with the midpoint at
    the geometric mean ``σ_mid = √(σ·σ_next)``."""

    def midpoint(x, d, sigma_hat, sigma_next):
        sigma_mid = math.exp(0.5 * (math.log(sigma_hat) + math.log(sigma_next)))
        x_mid = x + d * (sigma_mid - sigma_hat)
        d_mid = to_d(x_mid, sigma_mid, denoiser(x_mid, sigma_batch(x, sigma_mid)))
        return x + d_mid * (sigma_next - sigma_hat)

    return _ode_loop(
        denoiser, x, sigmas, noise, callback, s_churn, s_tmin, s_tmax, s_noise, midpoint
    )


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Weights of the last ``order`` slopes for the step σ_i → σ_{i+1}: the exact integral over
    that step of each Lagrange basis polynomial through σ_i, σ_{i-1}, … (newest first)."""
    nodes = [sigmas[i - j] for j in range(order)]
    weights = []
    for j in range(order):
        others = [nodes[k] for k in range(order) if k != j]
        basis = (
            np.polynomial.Polynomial.fromroots(others)
            if others
            else np.polynomial.Polynomial([1.0])
        )
        basis = basis / basis(nodes[j])
        integral = basis.integ()
        weights.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return weights


def lms(
    denoiser, x, sigmas, *, noise: NoiseFn | None = None, callback=None, order: int = 4
) -> torch.Tensor:
    """Linear multistep (Adams–Bashforth) of order ``order`` on the σ grid (k-diffusion's
    ``sample_lms``, diffusers' ``LMSDiscreteScheduler``); low orders while history builds up."""
    sig = sigmas.tolist()
    slopes: list[torch.Tensor] = []  # newest first
    for i in range(len(sig) - 1):
        denoised = denoiser(x, sigma_batch(x, sig[i]))
        report(callback, i, sig[i], sig[i + 1], x, denoised)
        slopes = [to_d(x, sig[i], denoised), *slopes][:order]
        coeffs = lms_coefficients(sig, i, len(slopes))
        x = x + sum(c * d for c, d in zip(coeffs, slopes, strict=True))
    return x


register("euler", euler, order=1)
register("heun", heun, order=2, evals_per_step=2)
register("dpm_2", dpm_2, order=2, evals_per_step=2)
register("lms", lms, order=4)
