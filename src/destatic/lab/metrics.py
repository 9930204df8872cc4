"""Distances for the lab: to the exact ODE solution, and to the true distribution."""

from __future__ import annotations

import torch

__all__ = ["rms", "sliced_wasserstein"]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square distance per coordinate, ``√mean((a - b)²)``."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(((a.to(torch.float64) - b.to(torch.float64)) ** 2).mean().sqrt())


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0
) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point sets (Rabin et al. 2011):
    the root mean over random unit directions θ of W2² between the 1-D projections, which for
    equal sizes is the mean squared difference of the sorted projections."""
    a = a.to(torch.float64).reshape(a.shape[0], -1)
    b = b.to(torch.float64).reshape(b.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError(
            f"need equal-size sets of the same dimension, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, _ = (a @ theta).sort(dim=0)
    pb, _ = (b @ theta).sort(dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())
