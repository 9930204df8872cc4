"""Seeded noise that does not depend on the batch.

Each sample owns a ``torch.Generator``; every draw (the initial noise and each ancestral or SDE
step) takes one standard normal per sample from its own generator. The same seed then gives the
same image alone or at any position in a batch of any size (EDM2's ``StackedRandomGenerator``
idea), which a single batch-wide generator cannot promise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["Generators", "NoiseFn", "generators", "noise_sampler", "randn", "slerp"]

#: one generator for the whole batch, one per sample, or None for torch's global RNG
Generators = torch.Generator | Sequence[torch.Generator] | None
#: ``noise(sigma, sigma_next) -> standard normal tensor shaped like the state`` (k-diffusion's
#: noise_sampler signature)
NoiseFn = Callable[[float, float], torch.Tensor]


def generators(
    seeds: int | Sequence[int], device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """One generator per seed (an int ``s`` stands for ``[s]``)."""
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal of ``shape``; with a list of generators, row ``b`` comes from generator b.

    Draws happen in float32 on each generator's own device, then move to ``device``/``dtype``, so
    a seed gives the same numbers whatever the model's precision.
    """
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        out = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    else:
        if len(generator) != shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {shape[0]}: pass one per sample"
            )
        out = torch.stack(
            [
                torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32)
                for g in generator
            ]
        )
    return out.to(device=device, dtype=dtype)


def noise_sampler(x: torch.Tensor, generator: Generators = None) -> NoiseFn:
    """A noise function for the SDE and ancestral samplers: fresh draws shaped like ``x``."""

    def draw(sigma: float, sigma_next: float) -> torch.Tensor:
        return randn(x.shape, generator, device=x.device, dtype=x.dtype)

    return draw


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation per sample between noises ``a`` and ``b`` (Shoemake 1985):

        slerp = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b,   cos θ = ⟨a, b⟩ / (|a| |b|),

    which keeps a Gaussian's norm where a straight line would shrink it (A1111's "variation
    seed"). Nearly parallel pairs fall back to the straight line."""
    if not 0 <= t <= 1:
        raise ValueError(f"the interpolation weight must be in [0, 1], got {t}")
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp(min=1e-12)
    theta = cos.clamp(-1, 1).acos()
    sin = theta.sin()
    safe = sin.abs() > 1e-6
    wa = torch.where(safe, ((1 - t) * theta).sin() / sin.where(safe, 1.0), 1 - t + 0 * theta)
    wb = torch.where(safe, (t * theta).sin() / sin.where(safe, 1.0), t + 0 * theta)
    out = wa[:, None] * fa + wb[:, None] * fb
    return out.view_as(a).to(a.dtype)
