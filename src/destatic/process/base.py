"""The noise-process interface: every process is a map between σ and its own time.

All of destatic works on the variance-exploding form ``x = x0 + σ·n`` (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", eq. 1). A process says
three things about σ:

* its **schedule time** ``t(σ)``: the variable in which the process's own step spacing is
  uniform (the discrete index of a VP model, the unshifted flow time of rectified flow, σ
  itself for EDM). Grids such as ``normal`` or ``trailing`` are uniform in this time.
* its **input scale** ``c_in(σ)``: the network sees ``c_in(σ)·x``. For VP this is
  ``1/√(1+σ²)`` (so ``c_in·x = √ᾱ·x0 + √(1-ᾱ)·n``), for rectified flow ``1/(1+σ)``.
* its **noise label** ``c_noise(σ)``: the number the network is conditioned on (a timestep).

Pure noise may sit at σ = ∞ (rectified flow at t = 1, a VP schedule rescaled to zero terminal
SNR). There the state ``x`` is infinite, so destatic carries ``x/σ`` instead (the unit noise),
and ``σ·c_in(σ) → 1`` for every process here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

__all__ = ["SIGMA_INF_PROXY", "Process", "as_sigma"]

# Coefficients at σ = ∞ are evaluated at this σ (in float64), where every limit used here has
# converged to double precision: σ·c_in(σ) = 1 - O(σ⁻²), σ·c_skip(σ) for v- and flow targets.
SIGMA_INF_PROXY = 1e30


def as_sigma(sigma: torch.Tensor | float, like: torch.Tensor | None = None) -> torch.Tensor:
    """σ as a float64 tensor (on ``like``'s device when given)."""
    device = like.device if like is not None else None
    return torch.as_tensor(sigma, dtype=torch.float64, device=device)


class Process(ABC):
    """A forward noise process, seen through σ. Subclasses are small frozen dataclasses."""

    #: number of discrete training timesteps (the length of :meth:`sigma_table`)
    num_timesteps: int = 1000
    #: precision of the σ-space grids (``karras``, ``exponential``) for this process. float32
    #: keeps the σ's of a scheduler that computes them in float32 to the bit, where the noise
    #: depends on them (a Brownian tree resolves query times to 1e-6).
    grid_dtype: torch.dtype = torch.float64
    #: the noise the stochastic samplers draw by default (:data:`destatic.sampling.noise.NOISE`):
    #: ``"gaussian"`` (fresh per-step draws) or ``"brownian"`` (increments of a Brownian tree).
    sde_noise: str = "gaussian"

    @property
    @abstractmethod
    def sigma_min(self) -> float:
        """Smallest σ the model was trained on (> 0)."""

    @property
    @abstractmethod
    def sigma_max(self) -> float:
        """Largest σ the model was trained on; ``math.inf`` when it reaches pure noise."""

    @abstractmethod
    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Schedule time of σ (float64 in, float64 out)."""

    @abstractmethod
    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at schedule time ``t``: the inverse of :meth:`sigma_to_t`."""

    @abstractmethod
    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        """Input scale: the network sees ``c_in(σ)·x``."""

    @abstractmethod
    def noise_label(self, sigma: torch.Tensor) -> torch.Tensor:
        """The conditioning value (timestep) the network is given at σ."""

    @abstractmethod
    def label_to_sigma(self, label: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`noise_label`."""

    @property
    def t_max(self) -> float:
        """Schedule time of pure noise (the start of a sampling grid)."""
        return float(self.sigma_to_t(as_sigma(self.sigma_max)))

    @property
    def t_min(self) -> float:
        """Schedule time of the least noise the model knows."""
        return float(self.sigma_to_t(as_sigma(self.sigma_min)))

    def sigma_table(self) -> torch.Tensor:
        """σ at each of the ``num_timesteps`` training timesteps, increasing (float64)."""
        n = self.num_timesteps
        t = torch.linspace(self.t_min, self.t_max, n, dtype=torch.float64)
        return self.t_to_sigma(t)
