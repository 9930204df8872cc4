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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from destatic.process.targets import Target, get_target

__all__ = ["ConsistencyTarget", "consistency_coefficients"]


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
        c_skip, c_out = self.coefficients(torch.as_tensor(sigma, dtype=torch.float64))
        c_skip, c_out = c_skip.to(x0.dtype), c_out.to(x0.dtype)
        return (x0 - c_skip * (x0 + sigma * noise)) / c_out
