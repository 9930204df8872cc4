"""What every sampler shares: the step report, σ helpers and the registry.

A sampler is a stateless function ``fn(denoiser, x, sigmas, *, noise, callback, **options)``:
``denoiser(x, sigma) -> x̂0`` with σ of shape [batch], ``x`` the state at ``sigmas[0]`` and
``sigmas`` a finite decreasing grid ending in 0. :func:`destatic.sampling.sample` validates the
inputs, counts evaluations, seeds the noise and handles a grid that starts at σ = ∞.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from destatic.sampling.noise import NoiseFn

__all__ = [
    "SAMPLERS",
    "Callback",
    "DenoiserFn",
    "SamplerInfo",
    "StepInfo",
    "ancestral_step",
    "register",
]

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after each step (for progress bars and previews)."""

    i: int  # step index in the grid
    sigma: float  # σ at the start of the step
    sigma_next: float  # σ at its end
    x: torch.Tensor  # state at σ (before the step)
    denoised: torch.Tensor  # the model's x̂0 at σ: the natural preview
    nfe: int = 0  # model evaluations so far (filled in by ``sample``)


Callback = Callable[[StepInfo], None]


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler: the function and what it costs."""

    name: str
    fn: Callable[..., torch.Tensor]
    order: int  # convergence order of the deterministic solver (1 or 2 or 3)
    evals_per_step: int = 1  # model calls per step, except a last step to σ = 0 which takes one
    stochastic: bool = False  # draws fresh noise (needs ``noise``)
    defaults: dict = field(default_factory=dict)  # fixed options of this named variant
    needs_process: bool = False  # a pipeline passes the model's ``process=`` (``tcd``)

    def nfe(self, steps: int) -> int:
        """Model evaluations for a grid of ``steps`` steps ending at σ = 0."""
        return self.evals_per_step * (steps - 1) + 1

    def steps_for(self, nfe: int) -> int:
        """Most steps whose cost is at most ``nfe`` evaluations."""
        return max(1, (nfe - 1) // self.evals_per_step + 1)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {}
SAMPLER_INFO: dict[str, SamplerInfo] = {}


def register(
    name: str,
    fn: Callable[..., torch.Tensor],
    *,
    order: int,
    evals_per_step: int = 1,
    stochastic: bool = False,
    defaults: dict | None = None,
    needs_process: bool = False,
) -> None:
    """Add ``fn`` to the registry as ``name``; ``defaults`` fix options of a named variant
    (``ddim`` is ``euler_ancestral`` with ``eta=0``)."""

    def call(denoiser, x, sigmas, **options):
        return fn(denoiser, x, sigmas, **{**defaults, **options})

    defaults = defaults or {}
    call.__name__ = name
    call.__doc__ = fn.__doc__
    SAMPLERS[name] = call if defaults else fn
    SAMPLER_INFO[name] = SamplerInfo(
        name, fn, order, evals_per_step, stochastic, defaults, needs_process
    )


# --- helpers ---------------------------------------------------------------------------------


def sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """σ as a [batch] tensor (float64 for float64 states, else float32)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device)


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative dx/dσ = (x - D(x, σ))/σ (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) splitting a step σ → σ_next into a deterministic part and fresh noise.

    The DDPM posterior of ``x_next = x0 + σ_next·n`` given x has variance
    ``σ_up² = σ_next²(σ² - σ_next²)/σ²`` (η = 1); η scales σ_up as DDIM's η does (Song et al.
    2021, eq. 16), and ``σ_down = √(σ_next² - σ_up²)`` keeps the marginal at σ_next.
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def churn(
    x: torch.Tensor,
    sigma: float,
    steps: int,
    noise: NoiseFn | None,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    sigma_next: float,
) -> tuple[torch.Tensor, float]:
    """EDM's stochastic "churn" (Karras et al. 2022, Algorithm 2, lines 4-6): raise σ to
    σ̂ = σ(1+γ) by adding fresh noise. Returns (x̂, σ̂); a no-op when ``s_churn`` is 0."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    if noise is None:
        raise ValueError("s_churn > 0 draws fresh noise: pass a generator or noise=")
    sigma_hat = sigma * (1 + gamma)
    return x + noise(sigma, sigma_next) * s_noise * math.sqrt(sigma_hat**2 - sigma**2), sigma_hat


def report(callback: Callback | None, i: int, sigma: float, sigma_next: float, x, denoised) -> None:
    if callback is not None:
        callback(StepInfo(i, sigma, sigma_next, x, denoised))


def need_noise(noise: NoiseFn | None, name: str) -> NoiseFn:
    if noise is None:
        raise ValueError(f"{name} draws fresh noise each step: pass a generator or noise=")
    return noise
