"""The exact-score lab: the mixture's denoiser, the reference ODE solution and the metrics."""

import math

import pytest
import torch

from destatic.lab import (
    GaussianMixture,
    LabProblem,
    format_table,
    reference_solution,
    rms,
    sliced_wasserstein,
)


def test_denoiser_is_the_posterior_mean_by_monte_carlo():
    """E[x0 | x in a small box] from joint draws equals the mean of D over the box."""
    mix = GaussianMixture.standard(2, components=3, std=0.3)
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(400_000, g)
    sigma = 0.5
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    box = (x - torch.tensor([0.8, 0.4], dtype=torch.float64)).abs().max(1).values < 0.1
    expected = mix(x[box], torch.full((int(box.sum()),), sigma)).mean(0)
    standard_error = x0[box].std(0) / box.sum() ** 0.5
    assert box.sum() > 1000
    assert ((x0[box].mean(0) - expected).abs() < 4 * standard_error).all()


def test_single_gaussian_reference_is_the_closed_form():
    """For one Gaussian N(μ, s²I) the ODE is linear: x(σ) - μ = (x(σ₀) - μ)·√((s²+σ²)/(s²+σ₀²))."""
    mu = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    mix = GaussianMixture(mu, std=0.4, weights=torch.ones(1))
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    for end in (0.0, 0.3):
        ref = reference_solution(mix, x, 20.0, sigma_end=end)
        exact = mu + (x - mu) * math.sqrt((0.16 + end**2) / (0.16 + 400))
        torch.testing.assert_close(ref, exact, rtol=1e-7, atol=1e-7)


def test_reference_from_infinity_is_the_limit_of_large_sigma():
    mix = GaussianMixture.standard(2)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    from_inf = reference_solution(mix, z, math.inf)
    from_big = reference_solution(mix, z * 1e4, 1e4)
    assert rms(from_inf, from_big) < 1e-3


def test_metrics():
    mix = GaussianMixture.standard(2)
    a = mix.sample(2048, torch.Generator().manual_seed(0))
    b = mix.sample(2048, torch.Generator().manual_seed(1))
    assert rms(a, a) == 0
    assert sliced_wasserstein(a, a) == 0
    noise = torch.randn(2048, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert sliced_wasserstein(a, b) < 0.1 < 0.5 < sliced_wasserstein(a, 3 * noise)
    with pytest.raises(ValueError, match="equal-size"):
        sliced_wasserstein(a, b[:10])
    with pytest.raises(ValueError, match="shapes"):
        rms(a, b[:10])


def test_lab_row_and_table():
    problem = LabProblem(2, n=256)
    row = problem.row("heun", 8)
    assert (row.budget, row.nfe, row.steps) == (8, 7, 4)  # Heun: 2 calls/step, 1 for the last
    euler = problem.row("euler", 8)
    table = format_table([row, euler])
    assert "| 2 | heun |" in table and "RMS @8" in table
    with pytest.raises(ValueError, match="unknown sampler"):
        problem.row("huen", 8)
