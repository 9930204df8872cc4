"""Seeded noise that does not depend on the batch.

Each sample owns a ``torch.Generator``; every draw (the initial noise and each ancestral or SDE
step) takes one standard normal per sample from its own generator. The same seed then gives the
same image alone or at any position in a batch of any size (EDM2's ``StackedRandomGenerator``
idea), which a single batch-wide generator cannot promise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["Generators", "NoiseFn", "generators", "noise_sampler", "randn"]

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
