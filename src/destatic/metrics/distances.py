"""Distances between two sets of image features [N, D] (real vs generated).

Every function accepts numpy arrays or torch tensors (on any device), computes in float64 torch
and returns Python floats. Inputs are checked up front: an empty set, a set that is not 2-D,
sets of different feature dimensions, too few samples or NaN / infinite features raise a
one-line ``ValueError`` instead of a silently meaningless number.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "KernelDistance",
    "PrecisionRecall",
    "frechet_distance",
    "gaussian_stats",
    "kernel_distance",
    "precision_recall",
]

Features = np.ndarray | torch.Tensor
Stats = tuple[Features, Features]

# Rows × columns of one block of pairwise distances (2²⁴ float64 = 128 MiB).
_BLOCK_ELEMENTS = 2**24


class KernelDistance(NamedTuple):
    """KID: the mean of the unbiased MMD² estimates over random subsets, and their spread."""

    mean: float
    std: float


class PrecisionRecall(NamedTuple):
    precision: float  # share of generated samples on the real manifold (fidelity)
    recall: float  # share of real samples on the generated manifold (coverage)


def _as_features(x: Features, name: str, min_samples: int = 1) -> torch.Tensor:
    """A checked float64 tensor [N, D]."""
    t = torch.as_tensor(x).detach()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] feature array, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if t.shape[0] < min_samples:
        raise ValueError(f"{name} needs at least {min_samples} samples, got {t.shape[0]}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite features")
    return t


def _as_pair(a: Features, b: Features, names: tuple[str, str], min_samples: int = 1):
    """Both sets checked, of one feature dimension, on ``a``'s device."""
    x = _as_features(a, names[0], min_samples)
    y = _as_features(b, names[1], min_samples)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"feature dimensions differ: {names[0]} has {x.shape[1]}, {names[1]} has {y.shape[1]}"
        )
    return x, y.to(x.device)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def gaussian_stats(features: Features) -> tuple[np.ndarray, np.ndarray]:
    """Mean μ [D] and unbiased covariance Σ [D, D] (as ``np.cov(rowvar=False)``), float64."""
    mu, sigma = _stats(_as_features(features, "features", min_samples=2))
    return mu.cpu().numpy(), sigma.cpu().numpy()


def _as_stats(s: Features | Stats, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, Σ) from a feature array or a checked (μ, Σ) pair."""
    if not isinstance(s, tuple):
        mu, sigma = _stats(_as_features(s, name, min_samples=2))
        return mu.cpu(), sigma.cpu()
    if len(s) != 2:
        raise ValueError(f"{name} must be features [N, D] or a (mu, sigma) pair")
    mu = torch.as_tensor(s[0]).detach().to("cpu", torch.float64)
    sigma = torch.as_tensor(s[1]).detach().to("cpu", torch.float64)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise ValueError(
            f"{name} (mu, sigma) must have shapes [D] and [D, D], got "
            f"{tuple(mu.shape)} and {tuple(sigma.shape)}"
        )
    if not bool(torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        raise ValueError(f"{name} (mu, sigma) contains NaN or infinite values")
    return mu, sigma


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix: eigh, with round-off negatives clamped to 0."""
    eigval, eigvec = torch.linalg.eigh((m + m.T) / 2)
    return (eigvec * eigval.clamp(min=0).sqrt()) @ eigvec.T


def frechet_distance(a: Features | Stats, b: Features | Stats) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are
    Inception pool3; Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge
    to a Local Nash Equilibrium"):

        FD = |μa − μb|² + tr(Σa + Σb − 2 (Σa Σb)^½).

    ``a`` and ``b`` are feature arrays [N, D] or ``(mu, sigma)`` pairs from
    :func:`gaussian_stats`. ΣaΣb is not symmetric, so instead of a general matrix square root
    (``scipy.linalg.sqrtm``, which can turn complex on round-off) the trace uses the symmetric
    PSD matrix M = Σa^½ Σb Σa^½, which has the same eigenvalues as ΣaΣb (Σa^½ by ``eigh``):
    tr((ΣaΣb)^½) = Σᵢ √max(λᵢ(M), 0).

    The estimate is biased upwards at finite N (it is > 0 for two samples of one distribution
    and shrinks like 1/N), so only compare values computed with the same sample sizes.
    """
    mu_a, sigma_a = _as_stats(a, "a")
    mu_b, sigma_b = _as_stats(b, "b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: a has {mu_a.shape[0]}, b has {mu_b.shape[0]}")
    root_a = _psd_sqrt(sigma_a)
    m = root_a @ sigma_b @ root_a
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu_a - mu_b
    fd = diff @ diff + sigma_a.trace() + sigma_b.trace() - 2 * tr_covmean
    return max(float(fd), 0.0)  # ≥ 0 exactly; clamp round-off of identical sets


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² of two sets of size m: the off-diagonal means of Kxx and Kyy − 2 mean Kxy."""
    m = x.shape[0]
    kxx, kyy = _polynomial_kernel(x, x), _polynomial_kernel(y, y)
    off_xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    off_yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return off_xx + off_yy - 2 * _polynomial_kernel(x, y).mean()


def kernel_distance(
    a: Features, b: Features, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> KernelDistance:
    """Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased
    estimate of the squared maximum mean discrepancy with the polynomial kernel
    k(x, y) = (x·y / d + 1)³,

        MMD²ᵤ = 1/(m(m−1)) Σ_{i≠j} [k(xᵢ, xⱼ) + k(yᵢ, yⱼ)] − 2/m² Σ_{i,j} k(xᵢ, yⱼ),

    averaged over ``subsets`` random subsets of m = min(subset_size, len(a), len(b)) samples of
    each set, drawn without replacement (seeded). Unlike FD it is unbiased: its expectation is 0
    for two samples of one distribution at any m (single estimates can be negative).

    Returns ``(mean, std)``: the mean over subsets and the standard deviation of the subset
    estimates (not the standard error of the mean; the subsets overlap when m is close to N).
    """
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    x, y = _as_pair(a, b, ("a", "b"), min_samples=2)
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"subset_size must be at least 2, got {subset_size}")
    g = torch.Generator().manual_seed(seed)
    estimates = torch.empty(subsets, dtype=torch.float64)
    for i in range(subsets):
        ix = torch.randperm(x.shape[0], generator=g)[:m].to(x.device)
        iy = torch.randperm(y.shape[0], generator=g)[:m].to(y.device)
        estimates[i] = _unbiased_mmd2(x[ix], y[iy])
    return KernelDistance(float(estimates.mean()), float(estimates.std(correction=0)))


def _row_blocks(n_rows: int, n_cols: int) -> list[slice]:
    """Row slices whose [rows, n_cols] distance blocks stay under _BLOCK_ELEMENTS entries."""
    step = max(1, _BLOCK_ELEMENTS // n_cols)
    return [slice(s, s + step) for s in range(0, n_rows, step)]


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in ``x``, itself excluded."""
    n = x.shape[0]
    # a point's nearest neighbour is itself (distance 0), so take the (k+1)-th smallest
    return torch.cat(
        [torch.cdist(x[rows], x).kthvalue(k + 1, dim=1).values for rows in _row_blocks(n, n)]
    )


def _share_inside(query: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of ``query`` points within the k-NN ball of at least one centre."""
    inside = sum(
        int((torch.cdist(query[rows], centres) <= radii).any(dim=1).sum())
        for rows in _row_blocks(query.shape[0], centres.shape[0])
    )
    return inside / query.shape[0]


def precision_recall(real: Features, fake: Features, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall
    Metric for Assessing Generative Models"). Each set's manifold is the union of balls around
    its points, of radius the distance to the k-th nearest neighbour within the set:

        precision = share of fake points inside at least one real ball,
        recall = share of real points inside at least one fake ball.

    The pairwise distances are computed in blocks of at most 2²⁴ entries, so memory stays
    bounded for any set size; time is O(N² D).
    """
    x, y = _as_pair(real, fake, ("real", "fake"))
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k >= min(x.shape[0], y.shape[0]):
        raise ValueError(
            f"k={k} needs more than k samples in each set, got {x.shape[0]} real "
            f"and {y.shape[0]} fake"
        )
    precision = _share_inside(y, x, _knn_radii(x, k))
    recall = _share_inside(x, y, _knn_radii(y, k))
    return PrecisionRecall(precision, recall)
