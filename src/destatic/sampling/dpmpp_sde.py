"""DPM++ SDE (k-diffusion's ``sample_dpmpp_sde``, A1111's "DPM++ SDE"): DPM-Solver++(2S) with
ancestral noise at both stages (Lu et al. 2022b).

Each step σ → σ_next evaluates x̂0 at σ, takes an ancestral first-order step to the midpoint
of λ = -log σ, ``σ_mid = √(σ·σ_next)`` (k-diffusion's r = 1/2), evaluates x̂0 there, and takes
the ancestral first-order step from σ to σ_next with that midpoint estimate. With η = 0 it is
the deterministic second-order DPM-Solver++(2S); the last step into σ = 0 returns x̂0.

k-diffusion draws the two noises from one Brownian tree (correlated increments); here they are
the usual per-sample seeded draws, so the same seed gives the same image alone or in a batch,
but not k-diffusion's image.
"""

from __future__ import annotations

import math

from destatic.sampling.base import ancestral_step, need_noise, register, report, sigma_batch
from destatic.sampling.noise import NoiseFn

__all__ = ["dpmpp_sde"]


def dpmpp_sde(
    denoiser,
    x,
    sigmas,
    *,
    noise: NoiseFn | None = None,
    callback=None,
    eta: float = 1.0,
    s_noise: float = 1.0,
):
    """DPM++ SDE: two x̂0 evaluations per step, fresh noise after each stage (see the module)."""
    sig = sigmas.tolist()

    def ancestral(x, denoised, sigma, target):
        down, up = ancestral_step(sigma, target, eta)
        x = (down / sigma) * x + (1 - down / sigma) * denoised
        if up > 0:
            x = x + need_noise(noise, "dpmpp_sde with eta > 0")(sigma, target) * (s_noise * up)
        return x

    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma))
        report(callback, i, sigma, sigma_next, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_mid = math.sqrt(sigma * sigma_next)
        x_mid = ancestral(x, denoised, sigma, sigma_mid)
        x = ancestral(x, denoiser(x_mid, sigma_batch(x, sigma_mid)), sigma, sigma_next)
    return x


register("dpmpp_sde", dpmpp_sde, order=2, evals_per_step=2, stochastic=True)
