"""Rectified flow (Liu et al. 2022; Esser et al. 2024, SD3; Flux).

The forward process interpolates ``x_t = (1-t)·x0 + t·n`` for t ∈ [0, 1]. Dividing by (1-t):

    x = x_t/(1-t) = x0 + σ·n,   σ = t/(1-t),   t = σ/(1+σ),

so the network sees ``x_t = x/(1+σ)`` and its flow velocity ``v = dx_t/dt = n - x0`` gives
``x0 = x_t - t·v``, i.e. ``D = x/(1+σ) - σ/(1+σ)·v̂``.

**Timestep shift** (SD3, eq. 23): ``t' = s·t / (1 + (s-1)·t)``. In σ this is simply
``σ' = s·σ``: a shift multiplies every σ of the grid by s. Flux's resolution-dependent shift
is the same with ``s = exp(μ)``, μ linear in the number of image tokens
(:func:`resolution_shift`). The shift changes where a grid spends its steps, not the model: the
network always receives the true t of its input.

**Flux's dynamic shift is SD3's shift with s = e^μ.** diffusers' ``FlowMatchEulerDiscrete
Scheduler.time_shift`` (``time_shift_type="exponential"``, exponent 1) maps a flow time t to

    t' = e^μ / (e^μ + (1/t - 1)) = e^μ·t / (e^μ·t + 1 - t) = s·t / (1 + (s-1)·t),   s = e^μ,

so σ' = t'/(1-t') = e^μ·t/(1-t) = e^μ·σ. A scheduler config with ``use_dynamic_shifting`` keeps
its μ-line as :class:`ResolutionShift`; :meth:`RectifiedFlow.at_resolution` is then the process
for a given number of image tokens (``tests/test_pipeline_flux.py`` checks it against
diffusers' ``time_shift``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from destatic.process.base import Process

__all__ = ["RectifiedFlow", "ResolutionShift", "resolution_shift"]


def resolution_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's shift ``s = exp(μ)``, with μ linear from ``base_shift`` at ``base_seq_len`` image
    tokens to ``max_shift`` at ``max_seq_len`` (defaults: FLUX.1)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (image_seq_len - base_seq_len)
    return math.exp(mu)


@dataclass(frozen=True)
class ResolutionShift:
    """The line μ(image tokens) of a ``use_dynamic_shifting`` scheduler (diffusers' names;
    defaults: FLUX.1): μ = base_shift at base_seq_len tokens, max_shift at max_seq_len."""

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    def __post_init__(self) -> None:
        if not self.max_seq_len > self.base_seq_len > 0:
            raise ValueError(
                f"need 0 < base_seq_len < max_seq_len, got {self.base_seq_len}, {self.max_seq_len}"
            )

    def shift(self, image_seq_len: int) -> float:
        """s = exp(μ) for ``image_seq_len`` image tokens."""
        return resolution_shift(
            image_seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift
        )


@dataclass(frozen=True)
class RectifiedFlow(Process):
    """Rectified flow with a timestep shift (1 = none; SD3 uses 3), or with a shift that
    follows the image size (``resolution``, Flux: see :meth:`at_resolution`)."""

    shift: float = 1.0  # s in t' = s·t/(1+(s-1)·t), i.e. σ' = s·σ
    num_timesteps: int = 1000  # the network's timestep is t·num_timesteps (diffusers convention)
    resolution: ResolutionShift | None = None  # dynamic shifting: s = exp(μ(image tokens))

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    def at_resolution(self, image_seq_len: int) -> RectifiedFlow:
        """The process a grid for ``image_seq_len`` image tokens follows: the shift set to
        exp(μ) under dynamic shifting (``resolution``), else this process unchanged. Only the
        grid moves; the network's input scale and timestep do not depend on the shift."""
        if self.resolution is None:
            return self
        return replace(self, shift=self.resolution.shift(image_seq_len))

    @classmethod
    def for_resolution(cls, image_seq_len: int, **kwargs: float) -> RectifiedFlow:
        """The process with Flux's resolution-dependent shift for this many image tokens."""
        return cls(shift=resolution_shift(image_seq_len, **kwargs))

    @property
    def sigma_min(self) -> float:
        return self.shift / (self.num_timesteps - 1)  # σ' at the first training time t = 1/T

    @property
    def sigma_max(self) -> float:
        return math.inf

    # Schedule time is the *unshifted* flow time u, with σ = s·u/(1-u).
    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64) / self.shift
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.shift * t / (1 - t)

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + sigma)

    def noise_label(self, sigma: torch.Tensor) -> torch.Tensor:
        # the true flow time of the input, t = σ/(1+σ) = 1/(1+1/σ), finite at σ = ∞
        return self.num_timesteps / (1 + 1 / sigma)

    def label_to_sigma(self, label: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(label, dtype=torch.float64) / self.num_timesteps
        return t / (1 - t)
