"""Discrete variance-preserving processes (DDPM, Stable Diffusion 1.x/2.x).

The forward process is ``x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·n`` at integer timesteps t = 0 … T-1, with
``ᾱ_t = Π_{s≤t} (1-β_s)`` (Ho et al. 2020). Dividing by √ᾱ_t gives the variance-exploding form

    x = x_t/√ᾱ_t = x0 + σ_t·n,   σ_t = √((1-ᾱ_t)/ᾱ_t),

so the network's input is ``x_t = x/√(1+σ²)`` (since ``1+σ² = 1/ᾱ``). Between integer timesteps,
t(σ) interpolates log σ linearly, as k-diffusion does, so a VP model can be asked about any σ
in its range. (diffusers' EulerDiscreteScheduler interpolates σ itself at fractional timesteps;
the two differ by at most 2e-5 relative on SD's schedule, and agree at integer timesteps.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from destatic.process.base import Process

__all__ = ["BETA_SCHEDULES", "VPDiscrete", "beta_schedule", "rescale_zero_terminal_snr"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def beta_schedule(
    name: str, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """β_t for t = 0 … T-1 (float64).

    * ``linear``: β evenly spaced from β_start to β_end (Ho et al. 2020);
    * ``scaled_linear``: √β evenly spaced (Stable Diffusion);
    * ``squaredcos_cap_v2``: ᾱ(t) = cos²((t/T + 0.008)/1.008 · π/2), β = 1 - ᾱ_{t+1}/ᾱ_t capped
      at 0.999 (Nichol & Dhariwal 2021, eq. 17).
    """
    n = num_timesteps
    if name == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2

    if name == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so the last timestep is pure noise (ᾱ_T = 0) and the first is kept.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.
    The last σ becomes ∞: sampling must then start from pure noise (see ``Process``).
    """
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


@dataclass(frozen=True)
class VPDiscrete(Process):
    """A discrete VP process with a named β schedule (defaults: Stable Diffusion 1.x/2.x)."""

    schedule: str = "scaled_linear"  # one of BETA_SCHEDULES
    beta_start: float = 0.00085  # β_0 (ignored by squaredcos_cap_v2)
    beta_end: float = 0.012  # β_{T-1} (ignored by squaredcos_cap_v2)
    num_timesteps: int = 1000  # T, the number of training timesteps
    zero_terminal_snr: bool = False  # rescale so that ᾱ_{T-1} = 0 (σ_max = ∞)
    _sigmas: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        betas = beta_schedule(self.schedule, self.num_timesteps, self.beta_start, self.beta_end)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        if self.zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        object.__setattr__(self, "_sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt())

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t = 1/(1+σ_t²)."""
        return 1 / (1 + self._sigmas**2)

    @property
    def sigma_min(self) -> float:
        return float(self._sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self._sigmas[-1])

    def sigma_table(self) -> torch.Tensor:
        return self._sigmas.clone()

    # --- σ ↔ t ------------------------------------------------------------------------------
    # Interpolation runs in log σ on the finite part of the table. A zero-terminal-SNR table
    # ends at σ = ∞; its last segment interpolates 1/σ instead, which reaches 0 there.

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        table = self._sigmas.to(sigma.device)
        finite = table[torch.isfinite(table)]
        log_table = finite.log()
        log_sigma = sigma.clamp(min=float(finite[0])).log()
        hi = torch.searchsorted(log_table, log_sigma.clamp(max=float(log_table[-1]))).clamp(
            1, len(finite) - 1
        )
        lo = hi - 1
        w = (log_sigma - log_table[lo]) / (log_table[hi] - log_table[lo])
        t = lo + w.clamp(0, 1)
        if len(finite) < len(table):  # segment from the last finite σ to ∞, linear in 1/σ
            last = float(finite[-1])
            tail = (len(finite) - 1) + (1 - last / sigma)
            t = torch.where(sigma > last, tail, t)
        return t.to(torch.float64)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        table = self._sigmas.to(t.device)
        lo = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - lo
        hi = lo + 1
        if math.isinf(float(table[-1])):
            # last segment: 1/σ linear between the last finite σ and 0
            inv = (1 - w) / table[lo] + w / table[hi]
            tail = 1 / inv
        else:
            tail = None
        log_sigma = (1 - w) * table[lo].log() + w * table[hi].log()
        sigma = log_sigma.exp()
        if tail is not None:
            sigma = torch.where(hi == self.num_timesteps - 1, tail, sigma)
        return sigma

    # --- what the network sees ------------------------------------------------------------
    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return (1 + sigma**2).rsqrt()

    def noise_label(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_t(sigma)

    def label_to_sigma(self, label: torch.Tensor) -> torch.Tensor:
        return self.t_to_sigma(label)
