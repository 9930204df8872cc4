"""Samplers that re-noise after each step: ancestral Euler (= DDIM with η, = DDPM), DPM++ 2S
ancestral, and LCM's multistep consistency sampling.

In σ-space the three classic samplers are one update (see :func:`ancestral_step`):

    x_next = D + σ_down·(x - D)/σ + σ_up·z,   z ~ N(0, I)

* η = 0 gives Euler, i.e. DDIM (Song et al. 2021): ``x_next = D + σ_next·ε̂``;
* DDIM with η > 0 uses σ_up = η·(DDPM posterior std), which is exactly the VE image of DDIM's
  σ_t(η) (eq. 16) once both sides are divided by √ᾱ;
* η = 1 is the DDPM posterior q(x_next | x, x̂0) (Ho et al. 2020, eq. 7) with "fixed_small"
  variance. So ``ddim`` and ``ddpm`` are named variants of :func:`euler_ancestral`; on their
  models' own grids (``leading``) they reproduce diffusers' DDIMScheduler and DDPMScheduler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from destatic.sampling.base import ancestral_step, need_noise, register, report, sigma_batch, to_d
from destatic.sampling.noise import NoiseFn

__all__ = ["dpmpp_2s_ancestral", "euler_ancestral", "lcm"]


Split = Callable[[float, float], tuple[float, float]]
Move = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def _renoising_loop(denoiser, x, sigmas, noise, callback, split: Split, move: Move, s_noise, name):
    """The loop shared by every sampler here: x̂0 at σ, a deterministic ``move`` to σ_down,
    then fresh noise of std σ_up, with ``(σ_down, σ_up) = split(σ, σ_next)``."""
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma))
        report(callback, i, sigma, sigma_next, x, denoised)
        sigma_down, sigma_up = split(sigma, sigma_next)
        x = move(x, denoised, sigma, sigma_down)
        if sigma_up > 0:
            x = x + need_noise(noise, name)(sigma, sigma_next) * (s_noise * sigma_up)
    return x


def _euler_move(x, denoised, sigma, sigma_down):
    return denoised + to_d(x, sigma, denoised) * sigma_down


def euler_ancestral(
    denoiser,
    x,
    sigmas,
    *,
    noise: NoiseFn | None = None,
    callback=None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral Euler: a deterministic Euler step to σ_down, then fresh noise of std σ_up."""

    def split(sigma, sigma_next):
        return ancestral_step(sigma, sigma_next, eta)

    return _renoising_loop(
        denoiser,
        x,
        sigmas,
        noise,
        callback,
        split,
        _euler_move,
        s_noise,
        "an ancestral sampler with eta > 0",
    )


def dpmpp_2s_ancestral(
    denoiser,
    x,
    sigmas,
    *,
    noise: NoiseFn | None = None,
    callback=None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral (Lu et al. 2022b; k-diffusion): a two-stage data-prediction
    step to σ_down with its intermediate point at the midpoint of λ = -log σ, then noise σ_up."""

    def two_stage(x, denoised, sigma, sigma_down):
        if sigma_down == 0:
            return denoised  # the Euler step to σ = 0
        sigma_mid = math.sqrt(sigma * sigma_down)  # λ_mid = (λ + λ_down)/2
        x_mid = (sigma_mid / sigma) * x + (1 - sigma_mid / sigma) * denoised
        denoised_mid = denoiser(x_mid, sigma_batch(x, sigma_mid))
        return (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised_mid

    def split(sigma, sigma_next):
        return ancestral_step(sigma, sigma_next, eta)

    return _renoising_loop(
        denoiser,
        x,
        sigmas,
        noise,
        callback,
        split,
        two_stage,
        s_noise,
        "dpmpp_2s_ancestral with eta > 0",
    )


def lcm(denoiser, x, sigmas, *, noise: NoiseFn | None = None, callback=None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023, LCM):
    jump to the model's x̂0, then re-noise to the next σ with fresh noise."""

    def split(sigma, sigma_next):
        return 0.0, sigma_next

    return _renoising_loop(denoiser, x, sigmas, noise, callback, split, _euler_move, 1.0, "lcm")


register("euler_ancestral", euler_ancestral, order=1, stochastic=True)
register("ddim", euler_ancestral, order=1, defaults={"eta": 0.0})
register("ddpm", euler_ancestral, order=1, stochastic=True, defaults={"eta": 1.0})
register("dpmpp_2s_ancestral", dpmpp_2s_ancestral, order=2, evals_per_step=2, stochastic=True)
register("lcm", lcm, order=1, stochastic=True)
