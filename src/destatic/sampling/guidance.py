"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022).

    D_w = D_u + w·(D_c - D_u)

on the denoised estimates, which is the same as guiding ε, v or flow velocity since each is
affine in D with the same coefficients for both branches. Both branches run in one batched call;
scale 1 skips the unconditional branch.

* **Guidance rescale** (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", Algorithm 2) matches the per-sample std of the guided x̂0 to the conditional one,
  mixed by φ: ``D ← φ·D_w·std(D_c)/std(D_w) + (1-φ)·D_w``. The paper applies it to x̂0, as here;
  diffusers applies it to ε instead (BENCHMARKS.md, "deliberate differences").
* **Guidance interval** (Kynkäänniemi et al. 2024): guide only for σ in (σ_lo, σ_hi]; outside
  it the conditional branch alone is used (and the unconditional call is skipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

__all__ = ["ClassifierFreeGuidance"]


def _batch_cat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, Mapping):
        return {k: _batch_cat(a[k], b[k]) for k in a}
    if a is None:
        return None
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


class ClassifierFreeGuidance:
    """``ClassifierFreeGuidance(denoiser, cond, uncond, scale)(x, σ) -> guided x̂0``.

    ``denoiser(x, sigma, **cond)`` is the raw conditional denoiser; ``cond`` and ``uncond`` are
    the keyword arguments of the two branches (tensors with the batch first, or dicts of them).
    """

    def __init__(
        self,
        denoiser: Callable[..., torch.Tensor],
        cond: Mapping[str, object],
        uncond: Mapping[str, object] | None,
        scale: float,
        *,
        rescale: float = 0.0,
        interval: tuple[float, float] = (0.0, math.inf),
    ):
        if scale != 1 and uncond is None:
            raise ValueError("guidance scale != 1 needs the unconditional inputs (uncond=)")
        if not 0 <= rescale <= 1:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        if not interval[0] < interval[1]:
            raise ValueError(
                f"guidance interval must be (low, high) with low < high, got {interval}"
            )
        self.denoiser, self.cond, self.uncond = denoiser, dict(cond), uncond and dict(uncond)
        self.scale, self.rescale, self.interval = float(scale), float(rescale), interval

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        lo, hi = self.interval
        active = (sigma > lo) & (sigma <= hi)
        if self.scale == 1 or not bool(active.any()):
            return self.denoiser(x, sigma, **self.cond)
        both = self.denoiser(
            torch.cat([x, x]),
            torch.cat([sigma, sigma]),
            **{k: _batch_cat(self.uncond[k], self.cond[k]) for k in self.cond},
        )
        uncond, cond = both.chunk(2)
        w = torch.where(active, self.scale, 1.0).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        guided = uncond + w * (cond - uncond)
        if self.rescale > 0:
            dims = tuple(range(1, x.ndim))
            ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
            guided = self.rescale * guided * ratio + (1 - self.rescale) * guided
        return guided
