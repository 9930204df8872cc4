"""DPM++ SDE (A1111's "DPM++ SDE"): second order without noise, the 2S rule with it off, and
registered so that the generic stochastic-sampler tests of test_sampling cover it."""

import torch

from destatic.lab import reference_solution, rms
from destatic.sampling import SAMPLER_INFO, generators, initial_noise, make_sigmas, sample

SIGMA_MAX, SIGMA_MIN = 10.0, 0.2


def test_without_noise_it_is_second_order(smooth_mixture):
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = z * SIGMA_MAX
    ref = reference_solution(smooth_mixture, x, SIGMA_MAX, sigma_end=SIGMA_MIN)

    def error(steps: int) -> float:
        sigmas = make_sigmas("exponential", steps, SIGMA_MIN, SIGMA_MAX)[:-1]
        return rms(sample("dpmpp_sde", smooth_mixture, x.clone(), sigmas, eta=0.0), ref)

    assert error(32) / error(64) > 3.6


def test_eta_zero_is_dpmpp_2s(mixture, noise):
    sigmas = make_sigmas("karras", 8, 0.03, 14.6)
    x = noise * 14.6
    ours = sample("dpmpp_sde", mixture, x, sigmas, eta=0.0)
    torch.testing.assert_close(ours, sample("dpmpp_2s_ancestral", mixture, x, sigmas, eta=0.0))


def test_noise_changes_the_sample_and_is_seeded(mixture):
    sigmas = make_sigmas("karras", 6, 0.03, 14.6)
    x = initial_noise((4, 2), sigmas, generators([1, 2, 3, 4]), dtype=torch.float64)
    a = sample("dpmpp_sde", mixture, x, sigmas, generator=generators([5, 6, 7, 8]))
    b = sample("dpmpp_sde", mixture, x, sigmas, generator=generators([5, 6, 7, 8]))
    c = sample("dpmpp_sde", mixture, x, sigmas, eta=0.0)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
    assert SAMPLER_INFO["dpmpp_sde"].nfe(6) == 11
