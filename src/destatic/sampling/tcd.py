"""TCD: the strategic stochastic sampling of Trajectory Consistency Distillation.

Zheng et al. 2024, "Trajectory Consistency Distillation" (§4.2, SSS). From x at time t the model
predicts x̂0 (and with it ε̂); instead of jumping all the way to x̂0 (LCM) or deterministically to
the next time t_next (DDIM), TCD moves deterministically to an intermediate time
s = ⌊(1-γ)·t_next⌋ and re-noises forward from s to t_next. In VP variables (diffusers'
``TCDScheduler.step``)

    x_s = √ᾱ_s·x̂0 + √(1-ᾱ_s)·ε̂,   x_next = √(ᾱ_next/ᾱ_s)·x_s + √(1 - ᾱ_next/ᾱ_s)·z.

**In σ-space** (x = x_VP/√ᾱ, 1/ᾱ = 1 + σ²) the first line is the Euler/DDIM move
``x_s = x̂0 + σ_s·ε̂`` and the second adds noise of variance (1/ᾱ_next - 1/ᾱ_s) = σ_next² - σ_s²:

    x_next = x̂0 + σ_s·(x - x̂0)/σ + √(σ_next² - σ_s²)·z,

the ancestral split (σ_down, σ_up) = (σ_s, √(σ_next² - σ_s²)). γ = 0 is DDIM (σ_s = σ_next);
γ = 1 is LCM's multistep consistency sampling (σ_s = σ at t = 0, nearly 0). The intermediate
time is counted in the model's own timesteps, so a pipeline hands the sampler its ``process``;
called without one, the schedule time is σ itself (EDM's convention) and σ_s = (1-γ)·σ_next.

The last step differs from diffusers on purpose: diffusers ends at timestep 0 with
``x̂0 + σ(0)·ε̂`` (σ(0) ≈ 0.03 for SD, VP-scaled), destatic's grids end at σ = 0 with x̂0.
"""

from __future__ import annotations

import math

import torch

from destatic.process.base import Process, as_sigma
from destatic.sampling.ancestral import _euler_move, _renoising_loop
from destatic.sampling.base import register
from destatic.sampling.noise import NoiseFn

__all__ = ["tcd", "tcd_intermediate_sigma"]


def tcd_intermediate_sigma(process: Process | None, sigma_next: float, gamma: float) -> float:
    """σ at TCD's intermediate timestep s = ⌊(1-γ)·t(σ_next)⌋ (t rounded when it is a trained
    timestep up to float error, as diffusers' integer timesteps are); (1-γ)·σ_next without a
    process."""
    if process is None:
        return (1 - gamma) * sigma_next
    t = float(process.sigma_to_t(as_sigma(sigma_next)))
    t = round(t) if abs(t - round(t)) < 1e-6 else t
    return float(process.t_to_sigma(as_sigma(math.floor((1 - gamma) * t))))


def tcd(
    denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    process: Process | None = None,
    gamma: float = 0.3,
    noise: NoiseFn | None = None,
    callback=None,
) -> torch.Tensor:
    """TCD sampling with stochasticity γ ∈ [0, 1] (``eta`` of diffusers' TCD pipelines; 0.3 is
    the paper's default) on the model's ``process`` (see the module doc)."""
    if not 0 <= gamma <= 1:
        raise ValueError(f"tcd gamma must be in [0, 1], got {gamma}")

    def split(sigma: float, sigma_next: float) -> tuple[float, float]:
        if sigma_next == 0:
            return 0.0, 0.0
        sigma_s = min(tcd_intermediate_sigma(process, sigma_next, gamma), sigma_next)
        return sigma_s, math.sqrt(max(sigma_next**2 - sigma_s**2, 0.0))

    return _renoising_loop(denoiser, x, sigmas, noise, callback, split, _euler_move, 1.0, "tcd")


register("tcd", tcd, order=1, stochastic=True, needs_process=True)
