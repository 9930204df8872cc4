"""The consistency parameterisation: a denoiser that meets the boundary condition f(x, 0) = x.

A consistency model (Song et al. 2023, "Consistency Models", §3) is a function f(x, σ) that maps
every point of one probability-flow ODE trajectory to the trajectory's end x0. It must satisfy
the boundary condition f(x, σ_min) = x, which Song et al. build in with

    f(x, σ) = c_skip(σ)·x + c_out(σ)·F(x, σ),   c_skip(σ_min) = 1,  c_out(σ_min) = 0.

Latent consistency models (Luo et al. 2023, LCM, eq. 9 and their released scheduler) put the
model's own x0 prediction in place of F and use ``c_skip = σ_d²/(s² + σ_d²)``,
``c_out = s/√(s² + σ_d²)`` of a *scaled time* s (their discrete timestep × 10, "timestep
scaling"), with σ_d = 0.5.

**In σ-space** the boundary is σ = 0 (every destatic grid ends there, and x = x0 at σ = 0), so
here s = k·σ with k = timestep_scaling × num_timesteps. For rectified flow the timestep is
``T·t = T·σ/(1+σ) ≈ T·σ`` near the boundary, so this is LCM's scaled time where it matters; with
k = 10⁴ the skip weight is below 10⁻⁵ on every grid point σ ≥ 1/32 and f is the student's x̂0
there, while f(x, 0) = x exactly. Unlike a scaled *timestep* (bounded at pure noise), a scaled σ
also makes ``c_skip·x = c_skip(σ)·σ·(x/σ) → σ_d²/(k²σ)·(x/σ) → 0`` at σ = ∞, so f stays finite
on the σ = ∞ state x/σ that destatic carries there (see :mod:`destatic.process.base`).

Composed with the network's own target (``D = c_skip_b·x + c_out_b·F``), f is again one affine
line in the network output,

    f = (c_skip + c_out·c_skip_b)·x + (c_out·c_out_b)·F,

so :class:`ConsistencyTarget` is an ordinary :class:`~destatic.process.Target` and
``Denoiser(net, process, ConsistencyTarget(base))`` *is* the consistency function: any sampler
(in particular ``lcm``, multistep consistency sampling) runs it unchanged.

**Checkpoints saved with diffusers' ``LCMScheduler``** (LCM-distilled SD, LCM-LoRA) define the
boundary condition on the *discrete timestep* instead: ``LCMScheduler.step`` at timestep t
(the current one, not the next) computes, in VP variables x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·n,

    s = timestep_scaling·t,   c_skip = σ_d²/(s² + σ_d²),   c_out = s/√(s² + σ_d²),
    denoised = c_out·x̂0_base + c_skip·x_t.

In σ-space t = t(σ) is the process's timestep (``sigma_to_t``, exact on the trained timesteps)
and x_t = c_in(σ)·x with c_in = 1/√(1+σ²), so with x̂0_base = b_skip·x + b_out·F,

    D = (c_skip(t(σ))·c_in(σ) + c_out(t(σ))·b_skip(σ))·x + c_out(t(σ))·b_out(σ)·F,

again affine in F: :class:`LCMTarget`. At σ = 0, t = 0 and D = x (the boundary condition); at
t = 259 (the last of 4 LCM steps) c_skip ≈ 4·10⁻⁸, so the skip term is nearly invisible, but it
is kept exactly. It differs from :class:`ConsistencyTarget` (s = k·σ, continuous, finite at
σ = ∞) only by that tiny skip weight; it exists so diffusers' LCM folders reproduce bit-for-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from destatic.process.base import Process
from destatic.process.targets import Target, get_target

__all__ = ["ConsistencyTarget", "LCMTarget", "consistency_coefficients"]


def consistency_coefficients(
    sigma: torch.Tensor, sigma_data: float = 0.5, scale: float = 1e4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip(σ), c_out(σ)) of LCM's boundary condition with s = scale·σ (float64)."""
    s = torch.as_tensor(sigma, dtype=torch.float64) * scale
    sd2 = sigma_data**2
    return sd2 / (s**2 + sd2), s * (s**2 + sd2).rsqrt()


@dataclass(frozen=True)
class ConsistencyTarget(Target):
    """The consistency function f over a network that predicts ``base`` (see module doc)."""

    base: Target
    sigma_data: float = 0.5
    scale: float = 1e4  # k in s = k·σ: LCM's timestep scaling × the process's timesteps
    name = "consistency"

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", get_target(self.base))
        if not (self.sigma_data > 0 and self.scale > 0):
            raise ValueError(
                f"sigma_data and scale must be positive, got {self.sigma_data}, {self.scale}"
            )

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c_skip, c_out = consistency_coefficients(sigma, self.sigma_data, self.scale)
        b_skip, b_out = self.base.coefficients(sigma)
        return c_skip + c_out * b_skip, c_out * b_out

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return _affine_target(self, x0, noise, sigma)


def _affine_target(target: Target, x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The network output F with ``c_skip·x + c_out·F = x0`` at ``x = x0 + σ·noise``."""
    c_skip, c_out = target.coefficients(torch.as_tensor(sigma, dtype=torch.float64))
    c_skip, c_out = c_skip.to(x0.dtype), c_out.to(x0.dtype)
    return (x0 - c_skip * (x0 + sigma * noise)) / c_out


@dataclass(frozen=True)
class LCMTarget(Target):
    """diffusers' ``LCMScheduler`` boundary condition over a network that predicts ``base``, on
    the discrete timesteps of ``process`` (see the module doc for the σ-space derivation)."""

    base: Target
    process: Process
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    name = "lcm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", get_target(self.base))
        if not (self.sigma_data > 0 and self.timestep_scaling > 0):
            raise ValueError(
                f"sigma_data and timestep_scaling must be positive, got {self.sigma_data}, "
                f"{self.timestep_scaling}"
            )

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        t = self.process.sigma_to_t(sigma)  # the current timestep, as LCMScheduler.step
        c_skip, c_out = consistency_coefficients(t, self.sigma_data, self.timestep_scaling)
        b_skip, b_out = self.base.coefficients(sigma)
        return c_skip * self.process.c_in(sigma) + c_out * b_skip, c_out * b_out

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return _affine_target(self, x0, noise, sigma)
