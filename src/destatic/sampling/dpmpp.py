"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models"), with the SDE variants of k-diffusion.

In λ = -log σ the probability-flow ODE is linear in x with the data prediction as forcing:

    x(λ_next) = (σ_next/σ)·x(λ) + σ_next ∫ e^{λ'} D(λ') dλ'     (exact variation of constants),

and the solvers differ only in the polynomial that stands in for D over the step. With
``h = λ_next - λ``, the first-order rule is ``x_next = e^{-h}·x + (1 - e^{-h})·D``: DDIM again.
The SDE versions (η > 0) follow the reverse SDE with η times the noise: the state is damped by
e^{-(1+η)h} and fresh noise of std ``σ_next·√(1 - e^{-2ηh})`` is added.

* 2M uses the last two x̂0 values; with ``r = h_prev/h`` the midpoint form corrects D by
  ``(D - D_prev)/(2r)`` (Algorithm 2 of the paper).
* 3M fits a quadratic through three x̂0 values (k-diffusion's ``sample_dpmpp_3m_sde``).

The step into σ = 0 returns D (the limit h → ∞ of every rule).

``dpmpp_2m_sde`` (η = 1, midpoint) with Brownian-tree noise (``noise="brownian"``) is diffusers'
``CosineDPMSolverMultistepScheduler``, Stable Audio's sampler, step for step (its first order is
``euler_ancestral``: with e^{-2h} = σ_next²/σ² both are the DDPM posterior step).
"""

from __future__ import annotations

import math

import torch

from destatic.sampling.base import need_noise, register, report, sigma_batch
from destatic.sampling.noise import NoiseFn

__all__ = ["dpmpp_2m_sde", "dpmpp_3m_sde"]


def _add_sde_noise(x, noise, sigma, sigma_next, h, eta, s_noise, name):
    if eta == 0:
        return x
    draw = need_noise(noise, f"{name} with eta > 0")(sigma, sigma_next)
    return x + draw * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)


def dpmpp_2m_sde(
    denoiser,
    x,
    sigmas,
    *,
    noise: NoiseFn | None = None,
    callback=None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE; with ``eta=0`` it is the deterministic DPM++ 2M (registered as
    ``dpmpp_2m``). ``solver_type`` is ``midpoint`` (diffusers' default) or ``heun``."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sig = sigmas.tolist()
    old_denoised, h_last = None, None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma))
        report(callback, i, sigma, sigma_next, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        eta_h = eta * h
        phi = -math.expm1(-h - eta_h)  # 1 - e^{-(1+η)h}
        x = (sigma_next / sigma) * math.exp(-eta_h) * x + phi * denoised
        if old_denoised is not None:
            r = h_last / h
            if solver_type == "midpoint":
                x = x + (0.5 * phi / r) * (denoised - old_denoised)
            else:  # heun: the trapezoid-like weight φ₂ = 1 - φ/((1+η)h)
                x = x + ((1 - phi / (h + eta_h)) / r) * (denoised - old_denoised)
        x = _add_sde_noise(x, noise, sigma, sigma_next, h, eta, s_noise, "dpmpp_2m_sde")
        old_denoised, h_last = denoised, h
    return x


def dpmpp_3m_sde(
    denoiser,
    x,
    sigmas,
    *,
    noise: NoiseFn | None = None,
    callback=None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion); with ``eta=0`` the deterministic third-order 3M."""
    sig = sigmas.tolist()
    d_1 = d_2 = None  # x̂0 at the previous two steps
    h_1 = h_2 = None
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma))
        report(callback, i, sigma, sigma_next, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - d_1) / r0
            d1_1 = (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            x = x + phi_2 * (denoised - d_1) / (h_1 / h)
        x = _add_sde_noise(x, noise, sigma, sigma_next, h, eta, s_noise, "dpmpp_3m_sde")
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


register("dpmpp_2m", dpmpp_2m_sde, order=2, defaults={"eta": 0.0})
register("dpmpp_2m_sde", dpmpp_2m_sde, order=2, stochastic=True)
register("dpmpp_3m", dpmpp_3m_sde, order=3, defaults={"eta": 0.0})
register("dpmpp_3m_sde", dpmpp_3m_sde, order=3, stochastic=True)
