"""Samplers against the exact ODE solution, and the contracts of ``sample``."""

import math

import pytest
import torch

from destatic.lab import reference_solution, rms
from destatic.process import Denoiser, RectifiedFlow, VPDiscrete
from destatic.sampling import (
    SAMPLER_INFO,
    SAMPLERS,
    NonFiniteError,
    generators,
    initial_noise,
    make_sigmas,
    sample,
)

DETERMINISTIC = sorted(n for n, i in SAMPLER_INFO.items() if not i.stochastic)
STOCHASTIC = sorted(n for n, i in SAMPLER_INFO.items() if i.stochastic)
SIGMA_MAX, SIGMA_MIN = 10.0, 0.2


@pytest.fixture(scope="module")
def order_problem(smooth_mixture):
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = z * SIGMA_MAX
    return x, reference_solution(smooth_mixture, x, SIGMA_MAX, sigma_end=SIGMA_MIN)


def _error(name, mixture, x, ref, steps):
    sigmas = make_sigmas("exponential", steps, SIGMA_MIN, SIGMA_MAX)[:-1]  # stop at σ_min
    return rms(sample(name, mixture, x.clone(), sigmas), ref)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_convergence_order(name, smooth_mixture, order_problem):
    """Doubling the steps divides the error by 2^order: about 2 for first-order solvers and
    about 4 for second-order ones (multistep methods of higher nominal order are held to 2 by
    their lower-order start-up steps)."""
    x, ref = order_problem
    ratio = _error(name, smooth_mixture, x, ref, 32) / _error(name, smooth_mixture, x, ref, 64)
    if SAMPLER_INFO[name].order == 1:
        assert 1.8 < ratio < 2.3
    else:
        assert ratio > 3.6


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_converges_to_the_reference_at_zero(name, mixture):
    """On the lab problem, every ODE sampler ends near the exact x(0) with enough steps."""
    z = torch.randn(128, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    vp = VPDiscrete()
    x = z * vp.sigma_max
    ref = reference_solution(mixture, x, vp.sigma_max)
    steps = SAMPLER_INFO[name].steps_for(128)
    out = sample(name, mixture, x, make_sigmas("karras", steps, process=vp))
    assert rms(out, ref) < 1e-2  # the floor of stopping at σ_min = 0.029 is 4e-3


def test_ddim_is_euler_in_sigma_space(mixture, noise):
    sigmas = make_sigmas("karras", 10, 0.03, 14.6)
    x = noise * 14.6
    torch.testing.assert_close(
        sample("ddim", mixture, x, sigmas), sample("euler", mixture, x, sigmas)
    )


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nfe_matches_the_registry_and_callbacks_report_every_step(name, mixture, noise):
    sigmas = make_sigmas("karras", 6, 0.03, 14.6)
    seen = []
    sample(
        name,
        mixture,
        noise * 14.6,
        sigmas,
        generator=generators(range(len(noise))),
        callback=seen.append,
    )
    assert [s.i for s in seen] == list(range(6))
    assert seen[-1].nfe == SAMPLER_INFO[name].nfe(6)
    assert seen[0].sigma == pytest.approx(14.6) and seen[-1].sigma_next == 0
    assert seen[0].denoised.shape == noise.shape


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_seed_same_sample_alone_or_in_any_batch(name, mixture):
    """Per-sample generators: sample 3 of a batch of 5 equals sample 0 of a batch of 1 with its
    seed, for the initial noise and every fresh draw."""
    sigmas = make_sigmas("karras", 5, 0.03, 14.6)
    seeds = [11, 12, 13, 14, 15]
    batch_x = initial_noise((5, 2), sigmas, generators(seeds), dtype=torch.float64)
    batch = sample(name, mixture, batch_x, sigmas, generator=generators(seeds))
    alone_x = initial_noise((1, 2), sigmas, generators([14]), dtype=torch.float64)
    alone = sample(name, mixture, alone_x, sigmas, generator=generators([14]))
    torch.testing.assert_close(batch[3:4], alone)
    again = sample(name, mixture, batch_x, sigmas, generator=generators(seeds))
    torch.testing.assert_close(batch, again)


# lcm samples correctly only with a consistency model: with a posterior-mean denoiser each jump
# to x̂0 shrinks the modes, so it is left out here (the distillation issue tests it with one).
@pytest.mark.parametrize("name", [n for n in STOCHASTIC if n != "lcm"])
def test_stochastic_samplers_sample_the_distribution(name, mixture):
    """Fresh noise makes RMS-to-ODE meaningless; the samples must still have the mixture's mode
    weights and mode width (a wrong noise scale blurs or sharpens the modes)."""
    vp = VPDiscrete()
    sigmas = make_sigmas("karras", SAMPLER_INFO[name].steps_for(64), process=vp)
    x = initial_noise((2048, 2), sigmas, generators(range(2048)), dtype=torch.float64)
    out = sample(name, mixture, x, sigmas, generator=generators(range(5000, 7048)))
    nearest = torch.cdist(out, mixture.means).argmin(1)
    share = nearest.bincount(minlength=8) / len(out)
    assert (share - 1 / 8).abs().max() < 0.025
    width = (out - mixture.means[nearest]).std()
    assert 0.085 < width < 0.115  # mode std 0.1 (0.092 after the final x̂0 at σ_min)


_REFERENCES: dict = {}


def _reference_from_infinity(mixture, z):
    if "inf" not in _REFERENCES:
        _REFERENCES["inf"] = reference_solution(mixture, z, math.inf, rtol=1e-8, atol=1e-8)
    return _REFERENCES["inf"]


@pytest.mark.parametrize(
    "process",
    [RectifiedFlow(shift=3.0), VPDiscrete(zero_terminal_snr=True)],
    ids=["flow", "vp_zero_snr"],
)
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "uni_pc", "heun"])
def test_grid_from_infinite_sigma_converges_to_the_ode(process, name, mixture):
    """Pure noise at σ = ∞: the state is carried as x/σ and the shared first step is the exact
    limit; the result converges to the ODE solved from σ = ∞ in finite variables."""
    target = "flow" if isinstance(process, RectifiedFlow) else "v_prediction"
    denoiser = Denoiser(mixture.network(process, target), process, target)
    z = torch.randn(128, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = _reference_from_infinity(mixture, z)
    errors = []
    for steps in (16, 128):
        sigmas = make_sigmas("normal", steps, process=process)
        assert math.isinf(float(sigmas[0]))
        errors.append(rms(sample(name, denoiser, z.clone(), sigmas), ref))
    assert errors[1] < errors[0] / 3 and errors[1] < 0.02


# --- bad input -----------------------------------------------------------------------------


def test_unknown_sampler_lists_the_valid_ones(mixture, noise):
    with pytest.raises(ValueError, match="dpmpp_2m") as err:
        sample("dpm++2m", mixture, noise, make_sigmas("karras", 4, 0.03, 14.6))
    assert "unknown sampler 'dpm++2m'" in str(err.value)


def test_unknown_grid_lists_the_valid_ones():
    with pytest.raises(ValueError, match="karras"):
        make_sigmas("karas", 4, 0.03, 14.6)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_steps_must_be_a_positive_integer(steps):
    with pytest.raises(ValueError, match="positive integer"):
        make_sigmas("karras", steps, 0.03, 14.6)


@pytest.mark.parametrize(
    "sigmas, message",
    [
        ([14.6, 3.0, 5.0, 0.0], "strictly decreasing"),
        ([14.6, 3.0, 3.0, 0.0], "strictly decreasing"),
        ([14.6], "at least 2"),
        ([14.6, float("nan"), 0.0], "NaN"),
        ([14.6, 1.0, -1.0], "decreasing|>= 0"),
    ],
)
def test_bad_grids_are_clear_errors(sigmas, message, mixture, noise):
    with pytest.raises(ValueError, match=message):
        sample("euler", mixture, noise, torch.tensor(sigmas))


def test_nan_state_is_a_clear_error(mixture, noise):
    bad = noise.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        sample("euler", mixture, bad, make_sigmas("karras", 4, 0.03, 14.6))


def test_nan_from_the_model_is_a_clear_error(noise):
    def broken(x, sigma):
        return torch.where(sigma[:, None] < 1, x * float("nan"), x * 0)

    with pytest.raises(NonFiniteError, match="model output"):
        sample("dpmpp_2m", broken, noise, make_sigmas("karras", 8, 0.03, 14.6))


def test_stochastic_sampler_without_noise_source_still_runs(mixture, noise):
    out = sample("euler_ancestral", mixture, noise * 14.6, make_sigmas("karras", 4, 0.03, 14.6))
    assert torch.isfinite(out).all()


def test_grid_needing_a_process_says_so():
    with pytest.raises(ValueError, match="process="):
        make_sigmas("trailing", 4, 0.03, 14.6)


def test_sigma_space_grid_refuses_infinite_sigma_max():
    with pytest.raises(ValueError, match="finite sigma_max"):
        make_sigmas("karras", 4, process=RectifiedFlow())


# --- grids ---------------------------------------------------------------------------------


def test_simple_and_beta_grids_pick_trained_sigmas():
    vp = VPDiscrete()
    table = vp.sigma_table()
    simple = make_sigmas("simple", 4, process=vp)  # ComfyUI: every 250th σ from the top
    torch.testing.assert_close(simple[:-1], table[[999, 749, 499, 249]])
    uniform_beta = make_sigmas("beta", 4, process=vp, alpha=1.0, beta=1.0)  # Beta(1,1) = uniform
    torch.testing.assert_close(uniform_beta[:-1], table[[999, 749, 500, 250]])
    default_beta = make_sigmas("beta", 10, process=vp)
    assert len(default_beta) == 11 and bool(torch.isin(default_beta[:-1], table).all())


@pytest.mark.parametrize(
    "grid", ["karras", "exponential", "polyexponential", "ays", "lab2d", "lab16d"]
)
@pytest.mark.parametrize("steps", [1, 3, 8, 25])
def test_sigma_space_grids_span_the_range(grid, steps):
    sigmas = make_sigmas(grid, steps, 0.03, 14.6)
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(14.6)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert float(sigmas[-2]) >= 0.03 * (1 - 1e-9)


def test_ays_ten_steps_is_the_published_grid():
    from destatic.sampling.grids import AYS_SD15

    sigmas = make_sigmas("ays", 10, 0.0291, 14.6146)
    torch.testing.assert_close(sigmas[:-1], torch.tensor(AYS_SD15[:-1], dtype=torch.float64))


def test_snap_rounds_to_trained_timesteps():
    vp = VPDiscrete()
    snapped = make_sigmas("karras", 10, process=vp, snap=True)
    t = vp.sigma_to_t(snapped[:-1])
    torch.testing.assert_close(t, t.round())
