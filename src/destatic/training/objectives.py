"""Training objectives: where to put the noise, and how much each noise level counts.

Every objective here is the same regression, written once in σ-space. With ``x = x0 + σ·n``
and the preconditioning of :func:`~destatic.process.preconditioning`, the network output
``F = net(c_in·x, c_noise)`` is regressed onto the target's closed form
``F* = (x0 - c_skip·x) / c_out`` (:meth:`Target.target`):

    L = E_{σ ~ p(σ), n ~ N(0, I)} [ w(σ) · ‖F - F*‖² ]

Since ``D - x0 = c_out·(F - F*)``, a weight ``w`` in F-space is ``w / c_out²`` in x0-space. The
objectives differ only in p(σ) and w(σ):

* **Rectified flow** (Esser et al. 2024, SD3 §3.1): the flow time ``t = σ/(1+σ)`` is
  logit-normal, ``t = sigmoid(m + s·z)``, then shifted, ``σ' = shift·σ`` (SD3 eq. 23); velocity
  target, ``w = 1``.
* **VP** (Ho et al. 2020): a uniformly drawn training timestep of the discrete schedule, with
  min-SNR-γ weighting (Hang et al. 2023): x0-space weight ``min(SNR, γ)`` with ``SNR = 1/σ²``,
  i.e. ``w = min(SNR, γ)·c_out²``: ``min(SNR, γ)/SNR`` for ε, ``min(SNR, γ)/(SNR + 1)`` for v.
  γ = None gives the plain (unweighted) loss of the chosen target.
* **EDM** (Karras et al. 2022, §5): ``ln σ ~ N(P_mean, P_std²)`` and the EDM preconditioning,
  whose loss weight ``λ(σ) = 1/c_out²`` makes ``w = 1`` in F-space.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from destatic.process import (
    EDM,
    EDMTarget,
    Process,
    RectifiedFlow,
    Target,
    get_target,
    preconditioning,
)
from destatic.process.targets import per_sample
from destatic.process.vp import VPDiscrete

__all__ = ["OBJECTIVES", "Objective", "edm_objective", "flow_objective", "vp_objective"]


@dataclass
class Objective:
    """A noise-level distribution and weighting for one process × target (see module doc)."""

    process: Process
    target: Target
    sample_sigma: Callable[[int, torch.Generator | None], torch.Tensor]  # n → σ [n] float64
    min_snr_gamma: float | None = None

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """F-space loss weight w(σ) (float64)."""
        if self.min_snr_gamma is None:
            return torch.ones_like(sigma)
        _, c_out = self.target.coefficients(sigma)
        snr = sigma.pow(-2)
        return snr.clamp(max=self.min_snr_gamma) * c_out**2

    def loss(
        self,
        net: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        cond: dict[str, torch.Tensor],
        *,
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-sample loss [B] (float32). ``sigma``/``noise`` override the random draws."""
        b = x0.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(b, generator)
        sigma = sigma.to(torch.float64).reshape(b)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        noise = noise.to(x0.device, x0.dtype)
        sigma_dev = sigma.to(x0.device)
        x = x0 + per_sample(sigma_dev, x0) * noise
        c_in, _, _, c_noise = preconditioning(self.process, self.target, sigma_dev)
        out = net(per_sample(c_in, x0) * x, c_noise.to(x0.dtype), **cond).float()
        want = self.target.target(x0.float(), noise.float(), per_sample(sigma_dev, x0).float())
        mse = (out - want).pow(2).flatten(1).mean(1)
        return mse * self.weight(sigma_dev).float()


def flow_objective(
    shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0
) -> Objective:
    """Rectified flow with logit-normal flow time (SD3's default m = 0, s = 1)."""
    if not logit_std > 0:
        raise ValueError(f"logit_std must be positive, got {logit_std}")
    process = RectifiedFlow(shift=shift)

    def sample_sigma(n: int, generator: torch.Generator | None) -> torch.Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        u = logit_mean + logit_std * z  # logit of the unshifted flow time t
        return shift * torch.exp(u)  # σ = shift · t/(1-t) = shift · e^u

    return Objective(process, get_target("flow"), sample_sigma)


def vp_objective(
    schedule: str = "scaled_linear",
    target: str = "epsilon",
    min_snr_gamma: float | None = 5.0,
    **process_kwargs: float | str | bool,
) -> Objective:
    """A discrete VP schedule, uniform training timesteps, min-SNR-γ weighting."""
    if target not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"a VP objective predicts epsilon, v_prediction or sample, not {target!r}")
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be positive or None, got {min_snr_gamma}")
    process = VPDiscrete(schedule=schedule, **process_kwargs)
    table = process.sigma_table()
    if target == "epsilon" and math.isinf(float(table[-1])):
        raise ValueError("zero terminal SNR needs target v_prediction (ε is undefined at σ = ∞)")

    def sample_sigma(n: int, generator: torch.Generator | None) -> torch.Tensor:
        index = torch.randint(0, len(table), (n,), generator=generator)
        sigma = table[index]
        # σ = ∞ (zero terminal SNR): train on the largest finite-precision stand-in.
        return sigma.clamp(max=1e4)

    return Objective(process, get_target(target), sample_sigma, min_snr_gamma)


def edm_objective(
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = 0.5,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
) -> Objective:
    """EDM's log-normal σ and F-preconditioning (Karras et al. 2022, Table 1)."""
    if not p_std > 0:
        raise ValueError(f"p_std must be positive, got {p_std}")
    process = EDM(min_sigma=sigma_min, max_sigma=sigma_max, sigma_data=sigma_data)

    def sample_sigma(n: int, generator: torch.Generator | None) -> torch.Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.exp(p_mean + p_std * z)

    return Objective(process, EDMTarget(sigma_data), sample_sigma)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "flow": flow_objective,
    "vp": vp_objective,
    "edm": edm_objective,
}
