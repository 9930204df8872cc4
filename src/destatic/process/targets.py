"""Prediction targets, and the wrapper that turns any raw network into a σ-space denoiser.

Every target is one line of the same affine form (Karras et al. 2022, eq. 7):

    D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))

where F is the raw network, ``c_in``/``c_noise`` come from the :class:`Process` and
``c_skip``/``c_out`` from the target. With ``x = x0 + σ·n``:

* **ε** (Ho et al. 2020): F ≈ n, so ``x0 = x - σ·n``: c_skip = 1, c_out = -σ.
* **x0** ("sample"): F ≈ x0: c_skip = 0, c_out = 1.
* **v** (Salimans & Ho 2022): with ``α = 1/√(1+σ²)``, ``s = σ/√(1+σ²)`` the VP input is
  ``x_t = α·x0 + s·n`` and ``v = α·n - s·x0``. Then ``α·x_t - s·v = (α²+s²)·x0 = x0`` and
  ``x_t = α·x``, so c_skip = α² = 1/(1+σ²), c_out = -s = -σ/√(1+σ²).
* **flow velocity** (rectified flow): ``x_t = x/(1+σ)``, ``v = n - x0`` and
  ``x_t = (1-t)·x0 + t·n`` with t = σ/(1+σ), so ``x0 = x_t - t·v``:
  c_skip = 1/(1+σ), c_out = -σ/(1+σ).
* **EDM** F-prediction: c_skip = σ_d²/(σ²+σ_d²), c_out = σ·σ_d/√(σ²+σ_d²).
* **EDM v** (diffusers' EDM schedulers with ``v_prediction``, Stable Audio): the same with
  c_out = -σ·σ_d/√(σ²+σ_d²), so ``F* = (σ_d·n - σ·x0/σ_d)/√(σ²+σ_d²)``, the v of the data
  scaled to unit variance (the v row above when σ_d = 1).

Training needs the inverse: the regression target is ``F* = (x0 - c_skip·x)/c_out``, which each
target gives in closed form (:meth:`Target.target`), and :meth:`Denoiser.raw_output` inverts the
wrapper (the exact-score lab and the parity tests use it).

At σ = ∞ the sampler state is ``x/σ`` (see :mod:`destatic.process.base`), so the wrapper uses
σ·c_in and σ·c_skip there, evaluated at a huge finite σ where they have converged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from destatic.process.base import SIGMA_INF_PROXY, Process

__all__ = [
    "TARGETS",
    "Denoiser",
    "EDMTarget",
    "EDMVTarget",
    "EpsilonTarget",
    "FlowTarget",
    "SampleTarget",
    "Target",
    "VTarget",
    "get_target",
    "preconditioning",
]


class Target(ABC):
    """A prediction target: the pair (c_skip, c_out) and its closed-form regression target."""

    name: str

    @abstractmethod
    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip(σ), c_out(σ)) for finite σ (float64)."""

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the network should output for ``x = x0 + σ·noise`` (σ broadcastable)."""


@dataclass(frozen=True)
class EpsilonTarget(Target):
    name = "epsilon"

    def coefficients(self, sigma):
        return torch.ones_like(sigma), -sigma

    def target(self, x0, noise, sigma):
        return noise


@dataclass(frozen=True)
class SampleTarget(Target):
    name = "sample"

    def coefficients(self, sigma):
        return torch.zeros_like(sigma), torch.ones_like(sigma)

    def target(self, x0, noise, sigma):
        return x0


@dataclass(frozen=True)
class VTarget(Target):
    name = "v_prediction"

    def coefficients(self, sigma):
        return 1 / (1 + sigma**2), -sigma * (1 + sigma**2).rsqrt()

    def target(self, x0, noise, sigma):
        scale = (1 + sigma**2).rsqrt()  # α = 1/√(1+σ²), s = σ·α
        return scale * noise - sigma * scale * x0


@dataclass(frozen=True)
class FlowTarget(Target):
    name = "flow"

    def coefficients(self, sigma):
        return 1 / (1 + sigma), -sigma / (1 + sigma)

    def target(self, x0, noise, sigma):
        return noise - x0


@dataclass(frozen=True)
class EDMTarget(Target):
    name = "edm"
    sigma_data: float = 0.5

    def coefficients(self, sigma):
        sd2 = self.sigma_data**2
        return sd2 / (sigma**2 + sd2), sigma * self.sigma_data * (sigma**2 + sd2).rsqrt()

    def target(self, x0, noise, sigma):
        c_skip, c_out = self.coefficients(sigma)
        return (x0 - c_skip * (x0 + sigma * noise)) / c_out


@dataclass(frozen=True)
class EDMVTarget(EDMTarget):
    name = "edm_v"

    def coefficients(self, sigma):
        c_skip, c_out = super().coefficients(sigma)
        return c_skip, -c_out


TARGETS: dict[str, Callable[[], Target]] = {
    "epsilon": EpsilonTarget,
    "sample": SampleTarget,
    "v_prediction": VTarget,
    "flow": FlowTarget,
    "edm": EDMTarget,
    "edm_v": EDMVTarget,
}


def get_target(name: str | Target) -> Target:
    """A target by its diffusers ``prediction_type`` name (``epsilon``, ``v_prediction``, …)."""
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        raise ValueError(f"unknown prediction target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]()


def per_sample(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficient [B] → [B, 1, …] in x's dtype."""
    return c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def preconditioning(
    process: Process, target: Target, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_in, c_skip, c_out, c_noise) for σ of shape [B], float64, finite everywhere.

    Where σ = ∞ the state is x/σ, so c_in and c_skip come multiplied by σ (their limits).
    """
    sigma = sigma.to(torch.float64)
    inf = torch.isinf(sigma)
    proxy = torch.where(inf, torch.full_like(sigma, SIGMA_INF_PROXY), sigma)
    c_in = process.c_in(proxy)
    c_skip, c_out = target.coefficients(proxy)
    if bool(inf.any()):
        if isinstance(target, EpsilonTarget):
            raise ValueError(
                "an ε-prediction model has no finite denoiser at σ = ∞ (zero terminal SNR): "
                "use a v-prediction or flow model, or start the grid below σ = ∞"
            )
        c_in = torch.where(inf, c_in * proxy, c_in)
        c_skip = torch.where(inf, c_skip * proxy, c_skip)
    return c_in, c_skip, c_out, process.noise_label(sigma)


class Denoiser(nn.Module):
    """A raw network as the σ-space denoiser ``D(x, σ, **cond) -> x̂0`` of docs/architecture.md.

    ``net(x_in, c_noise, **cond)`` receives the scaled input and the process's noise label (the
    timestep a diffusers model expects) and returns the target's prediction. ``dtype``: the
    network's precision when it differs from the state's (a bf16 network in an fp32 sampling
    loop): its inputs are cast to it and its output back, so only the network is rounded.
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        process: Process,
        target: str | Target,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.net = net
        self.process = process
        self.target = get_target(target)
        self.dtype = dtype

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        c_in, c_skip, c_out, c_noise = preconditioning(self.process, self.target, sigma)
        dtype = self.dtype or x.dtype
        out = self.net((per_sample(c_in, x) * x).to(dtype), c_noise.to(dtype), **cond)
        return per_sample(c_skip, x) * x + per_sample(c_out, x) * out.to(x.dtype)

    def raw_output(self, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor):
        """Inverse of the wrapper: the network output that gives ``denoised`` at (x, σ)."""
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        _, c_skip, c_out, _ = preconditioning(self.process, self.target, sigma)
        return (denoised - per_sample(c_skip, x) * x) / per_sample(c_out, x)
