"""The continuous process of EDM (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): ``x = x0 + σ·n`` with σ itself as time.

Preconditioning (Table 1 of the paper): the network sees ``c_in(σ)·x`` with
``c_in = 1/√(σ² + σ_data²)`` and the noise label ``c_noise = ¼·ln σ``; its output F becomes the
denoiser ``D = c_skip·x + c_out·F`` through :class:`destatic.process.targets.EDMTarget`.

:class:`CosineEDM` is Stable Audio's variant (Evans et al. 2024, "Stable Audio Open"; diffusers'
``CosineDPMSolverMultistepScheduler``): the same preconditioning, with the time of the cosine
schedule as the label. In v-diffusion's terms (Salimans & Ho 2022) the VP state is
``α·x0 + s·n`` with ``α = cos(πt/2)``, ``s = sin(πt/2)``, so ``σ = s/α = tan(πt/2)`` and the
label is ``t = 2/π·atan σ`` ∈ [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from destatic.process.base import Process

__all__ = ["EDM", "CosineEDM"]


@dataclass(frozen=True)
class EDM(Process):
    """EDM's σ range and preconditioning (defaults from the paper's image models)."""

    min_sigma: float = 0.002  # σ_min of training and sampling
    max_sigma: float = 80.0  # σ_max of training and sampling
    sigma_data: float = 0.5  # expected standard deviation of the data
    num_timesteps: int = 1000  # size of the log-uniform σ table used by table-based grids

    def __post_init__(self) -> None:
        if not 0 < self.min_sigma < self.max_sigma:
            raise ValueError(
                f"EDM needs 0 < min_sigma < max_sigma, got {self.min_sigma}, {self.max_sigma}"
            )

    @property
    def sigma_min(self) -> float:
        return self.min_sigma

    @property
    def sigma_max(self) -> float:
        return self.max_sigma

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Schedule time is log σ, so a uniform grid in it is the exponential grid."""
        return torch.as_tensor(sigma, dtype=torch.float64).log()

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64).exp()

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2).rsqrt()

    def noise_label(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log() / 4

    def label_to_sigma(self, label: torch.Tensor) -> torch.Tensor:
        return (4 * torch.as_tensor(label, dtype=torch.float64)).exp()


@dataclass(frozen=True)
class CosineEDM(EDM):
    """EDM preconditioning with the cosine-schedule label ``t = 2/π·atan σ`` (Stable Audio;
    defaults from Stable Audio Open). Its reference scheduler computes the σ grid in float32
    and draws SDE noise from a Brownian tree, so this process asks for both."""

    min_sigma: float = 0.3
    max_sigma: float = 500.0
    sigma_data: float = 1.0

    grid_dtype = torch.float32
    sde_noise = "brownian"

    def noise_label(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.atan() * (2 / math.pi)

    def label_to_sigma(self, label: torch.Tensor) -> torch.Tensor:
        return (torch.as_tensor(label, dtype=torch.float64) * (math.pi / 2)).tan()
