"""The exact last step from the model's local slope (destatic.sampling.final_step)."""

from __future__ import annotations

import pytest
import torch

from destatic.lab import GaussianMixture, LabProblem, reference_solution, rms
from destatic.sampling import sample
from destatic.sampling.final_step import estimate_local_std, local_gaussian_final_step

#: uni_pc_3's 8-call grid for this last step, optimised on the 16-D lab's training noise
#: (benchmarks/first_and_last_step.py, section 4)
GRID_16D = [14.614641229333644, 7.6445, 3.4456, 2.6524, 1.6915, 1.2332, 0.6135, 0.3797, 0.0]


def test_last_step_is_exact_for_gaussian_data():
    gauss = GaussianMixture(torch.tensor([[0.5, -1.0, 2.0]]), std=0.3)
    x = gauss.sample(64, torch.Generator().manual_seed(0)) + 0.7 * torch.randn(
        64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    denoised = gauss(x, torch.full((64,), 0.7, dtype=torch.float64))
    exact = reference_solution(gauss, x, 0.7)
    out = local_gaussian_final_step(x, denoised, 0.7, 0.3)
    assert torch.allclose(out, exact, atol=1e-8)
    # without spread the end point is the model's x̂0
    assert torch.allclose(local_gaussian_final_step(x, denoised, 0.7, 0.0), denoised, atol=1e-12)


def test_local_std_is_read_off_the_model():
    lab = GaussianMixture.standard(16)
    data = lab.sample(2048, torch.Generator().manual_seed(0))
    std = estimate_local_std(lab, data, generator=torch.Generator().manual_seed(1))
    assert std == pytest.approx(lab.std, rel=0.01)


def test_sampler_with_the_last_step_beats_half_the_best_peer_in_16d():
    """Issue 19, goal 5: at 8 calls in the 16-D lab the best peer (diffusers' UniPC) has RMS
    1.04e-1 on the sampler table's held-out noise; uni_pc_3 with this last step, 2.4e-2."""
    problem = LabProblem(16, n=1024)
    grid = torch.tensor(GRID_16D, dtype=torch.float64)
    std = estimate_local_std(problem.mixture, problem.true_samples)
    x = problem.start(GRID_16D[0])
    steps = []
    with_step = sample("uni_pc_3", problem.mixture, x, grid, final_std=std, callback=steps.append)
    plain = sample("uni_pc_3", problem.mixture, x, grid)
    assert [s.nfe for s in steps] == list(range(1, 9))  # no extra call, the callback still runs
    assert rms(with_step, problem.reference) < 0.5 * 1.04e-1
    assert rms(with_step, problem.reference) < 0.5 * rms(plain, problem.reference)


def test_bad_last_step_settings_say_what_is_wrong():
    lab = GaussianMixture.standard(2)
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="ends at σ = 0"):
        sample("euler", lab, x, torch.tensor([2.0, 1.0, 0.5]), final_std=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        sample("euler", lab, x, torch.tensor([2.0, 1.0, 0.0]), final_std=-1.0)
