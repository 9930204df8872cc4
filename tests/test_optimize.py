"""Optimised step grids: the search improves on its starting grids and returns a valid grid."""

import torch

from destatic.lab import GaussianMixture, reference_solution, rms
from destatic.sampling import make_sigmas, sample
from destatic.sampling.optimize import grid_from_logits, optimize_sigmas


def test_grid_from_logits_is_a_valid_grid():
    grid = grid_from_logits(torch.tensor([0.0, 1.0, -2.0, 0.5]).numpy(), 0.03, 14.6)
    assert len(grid) == 5 and grid[0] == 14.6 and grid[-1] == 0
    assert bool((grid[1:] < grid[:-1]).all()) and float(grid[-2]) > 0.03


def test_optimised_grid_beats_karras_and_exponential():
    mix = GaussianMixture.standard(2)
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = z * 14.6
    ref = reference_solution(mix, x, 14.6)
    grid, err = optimize_sigmas(
        "euler", [(mix, x, ref)], 4, 0.03, 14.6, starts=("karras",), max_evals=120
    )
    assert len(grid) == 5 and bool((grid[1:] < grid[:-1]).all())
    assert abs(rms(sample("euler", mix, x, grid), ref) - err) < 1e-12
    for start in ("karras", "exponential"):
        assert err < 0.8 * rms(sample("euler", mix, x, make_sigmas(start, 4, 0.03, 14.6)), ref)


def test_a_solver_of_your_own_is_optimised_like_a_named_one():
    mix = GaussianMixture.standard(2)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 14.6
    ref = reference_solution(mix, x, 14.6)
    calls = []

    def euler(denoiser, x, grid):
        calls.append(len(grid))
        return sample("euler", denoiser, x, grid)

    named = optimize_sigmas(
        "euler", [(mix, x, ref)], 3, 0.03, 14.6, starts=("karras",), max_evals=40
    )
    own = optimize_sigmas(euler, [(mix, x, ref)], 3, 0.03, 14.6, starts=("karras",), max_evals=40)
    assert torch.equal(own[0], named[0]) and own[1] == named[1]
    assert calls and set(calls) == {4}
