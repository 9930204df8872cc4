"""Bespoke solvers: they reproduce the sampler they start from, a fit lowers the training error,
and the JSON form round-trips exactly."""

import pytest
import torch

from destatic.lab import GaussianMixture, reference_trajectory, rms
from destatic.sampling import make_sigmas, sample
from destatic.sampling.learned import BespokeSolver, bespoke, fit_bespoke

MIX = GaussianMixture.standard(2)


def _noise(n: int, seed: int, sigma: float = 14.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * sigma


@pytest.mark.parametrize("name", ["uni_pc_3", "dpmpp_2m", "euler", "lms"])
def test_started_at_a_sampler_it_is_that_sampler(name):
    sigmas = make_sigmas("karras", 6, 0.03, 14.6)
    solver = BespokeSolver.from_sampler(name, sigmas)
    x = _noise(64, 0)
    expected = sample(name, MIX, x, sigmas)
    assert torch.allclose(solver.sample(MIX, x), expected, rtol=0, atol=1e-10)
    assert torch.equal(bespoke(MIX, x, sigmas, solver=solver), solver.sample(MIX, x))


def test_refuses_what_it_cannot_represent():
    sigmas = make_sigmas("karras", 4, 0.03, 14.6)
    with pytest.raises(ValueError, match="one-evaluation-per-step"):
        BespokeSolver.from_sampler("heun", sigmas)
    solver = BespokeSolver.from_sampler("euler", sigmas)
    with pytest.raises(ValueError, match="fitted on"):
        bespoke(MIX, _noise(4, 0), make_sigmas("exponential", 4, 0.03, 14.6), solver=solver)
    future = solver.coefficients.clone()
    future[0, 2] = 1.0  # x_1 may not use D_1
    with pytest.raises(ValueError, match="zero beyond"):
        BespokeSolver(sigmas, future)


def test_a_short_fit_lowers_the_training_error():
    sigmas = make_sigmas("karras", 4, 0.03, 14.6)
    start = BespokeSolver.from_sampler("dpmpp_2m", sigmas)
    x = _noise(256, 1)
    targets = reference_trajectory(MIX, x, sigmas)
    fitted, history = fit_bespoke(start, [(MIX, x, targets)], rounds=2, iterations=15)
    assert history[0] == pytest.approx(rms(start.sample(MIX, x), targets[-1]), rel=1e-12)
    assert history[-1] == pytest.approx(rms(fitted.sample(MIX, x), targets[-1]), rel=1e-12)
    assert history[-1] < 0.7 * history[0]
    assert torch.equal(fitted.sigmas, start.sigmas)


def test_json_round_trip_is_exact(tmp_path):
    sigmas = make_sigmas("karras", 5, 0.03, 14.6)
    solver = BespokeSolver.from_sampler("uni_pc_3", sigmas)
    solver.coefficients[1:, 1] += 1 / 3  # digits a short decimal would lose
    solver.save(tmp_path / "solver.json")
    loaded = BespokeSolver.load(tmp_path / "solver.json")
    assert torch.equal(loaded.sigmas, solver.sigmas)
    assert torch.equal(loaded.coefficients, solver.coefficients)
    assert loaded.meta == solver.meta
    x = _noise(8, 2)
    assert torch.equal(loaded.sample(MIX, x), solver.sample(MIX, x))
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a"):
        BespokeSolver.load(tmp_path / "other.json")
