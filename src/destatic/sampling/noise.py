"""Seeded noise that does not depend on the batch.

Each sample owns a ``torch.Generator``; every draw (the initial noise and each ancestral or SDE
step) takes one standard normal per sample from its own generator. The same seed then gives the
same image alone or at any position in a batch of any size (EDM2's ``StackedRandomGenerator``
idea), which a single batch-wide generator cannot promise.

The stochastic samplers' noise comes in two kinds (:data:`NOISE`), chosen by name with
``sample(..., noise=...)`` or by the model's process (``Process.sde_noise``):

* ``"gaussian"``: a fresh standard normal per step (:func:`noise_sampler`).
* ``"brownian"``: the normalised increments ``(W(σ_next) - W(σ))/√|σ - σ_next|`` of one
  Brownian motion W over σ per seed (:func:`brownian_noise`), as k-diffusion's
  ``BrownianTreeNoiseSampler`` and diffusers' Stable Audio scheduler draw them: each is still a
  standard normal, but steps that cover the same σ interval see the same path, whatever the
  grid. The path is torchsde's Brownian interval (Li et al. 2020, "Scalable Gradients for
  Stochastic Differential Equations"), seeded by the generator's seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "NOISE",
    "Generators",
    "NoiseFn",
    "brownian_noise",
    "generators",
    "noise_sampler",
    "randn",
    "resolve_noise",
    "slerp",
]

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


def _f32(value: float) -> float:
    """``value`` rounded to float32: the query times of diffusers' float32 σ table."""
    return float(np.float32(value))


def _tree_seeds(x: torch.Tensor, generator: Generators):
    """(seeds, size, device) of the Brownian trees for ``x``: one tree over the batch for one
    generator (or None: a seed from torch's global RNG), one per sample for a list."""
    if generator is None or isinstance(generator, torch.Generator):
        if generator is None:
            return [int(torch.randint(0, 2**63 - 1, []))], tuple(x.shape), "cpu"
        return [generator.initial_seed()], tuple(x.shape), generator.device
    if len(generator) != x.shape[0]:
        raise ValueError(
            f"got {len(generator)} generators for a batch of {x.shape[0]}: pass one per sample"
        )
    return [g.initial_seed() for g in generator], tuple(x.shape[1:]), generator[0].device


def brownian_noise(
    x: torch.Tensor, generator: Generators, sigma_min: float, sigma_max: float
) -> NoiseFn:
    """Brownian-tree noise shaped like ``x`` over σ ∈ [σ_min, σ_max] (see the module).

    One tree per generator, its entropy the generator's seed (``initial_seed``): one
    generator covers the whole batch, a list gives each sample its own path (so a seed draws
    the same noise alone or in a batch), and None draws a seed from torch's global RNG. The
    trees are built at the first draw (a deterministic sampler never needs torchsde). σ's are
    rounded to float32 and clamped to the range, and the tree resolves times to 1e-6: the
    settings of diffusers' ``BrownianTreeNoiseSampler``, so the same seed gives its noise.
    """
    lo, hi = _f32(sigma_min), _f32(sigma_max)
    if not 0 <= lo < hi < math.inf:
        raise ValueError(f"Brownian noise needs 0 <= sigma_min < sigma_max < inf, got {lo}, {hi}")
    trees: list = []

    def grow() -> None:
        try:
            import torchsde
        except ImportError as e:  # pragma: no cover - a dependency; the message says what to do
            raise ImportError("Brownian-tree noise needs torchsde: pip install torchsde") from e
        seeds, size, device = _tree_seeds(x, generator)
        trees.extend(
            torchsde.BrownianInterval(
                t0=lo,
                t1=hi,
                size=size,
                dtype=torch.float32,
                device=device,
                entropy=seed,
                tol=1e-6,
                pool_size=24,
                halfway_tree=True,
            )
            for seed in seeds
        )

    def draw(sigma: float, sigma_next: float) -> torch.Tensor:
        if not trees:
            grow()
        a, b = _f32(sigma), _f32(sigma_next)
        ta, tb = sorted((min(max(a, lo), hi), min(max(b, lo), hi)))
        if ta == tb:
            return torch.zeros(x.shape, device=x.device, dtype=x.dtype)
        w = torch.stack([tree(ta, tb) for tree in trees])  # W(tb) - W(ta), per tree
        w = w.reshape(x.shape)  # one tree over the batch, or one per sample
        scale = (torch.tensor(b, dtype=torch.float32) - torch.tensor(a)).abs().sqrt()
        return (w * (1.0 if a < b else -1.0) / scale).to(device=x.device, dtype=x.dtype)

    return draw


#: the kinds of noise a stochastic sampler can draw (see the module)
NOISE = ("gaussian", "brownian")


def resolve_noise(
    noise: NoiseFn | str | None,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generator: Generators = None,
    process=None,
) -> NoiseFn:
    """The sampler's noise function: ``noise`` itself when it is one, else the kind it names
    (None: the ``process``'s ``sde_noise``, else ``"gaussian"``). The Brownian tree spans the
    process's σ range when it is finite (as diffusers' scheduler, whose range is its config's),
    else the grid's nonzero finite σ's (k-diffusion's)."""
    if callable(noise):
        return noise
    kind = noise or getattr(process, "sde_noise", "gaussian")
    if kind not in NOISE:
        raise ValueError(f"unknown noise {kind!r}; choose one of {', '.join(NOISE)}")
    if kind == "gaussian":
        return noise_sampler(x, generator)
    if process is not None and math.isfinite(process.sigma_max):
        return brownian_noise(x, generator, process.sigma_min, process.sigma_max)
    finite = sigmas[(sigmas > 0) & torch.isfinite(sigmas)]
    return brownian_noise(x, generator, float(finite.min()), float(finite.max()))


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
