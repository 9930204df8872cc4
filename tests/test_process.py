"""The σ-space core: schedules, σ↔t maps, targets and the denoiser wrapper."""

import math

import pytest
import torch

from destatic.process import (
    EDM,
    TARGETS,
    Denoiser,
    RectifiedFlow,
    VPDiscrete,
    beta_schedule,
    get_target,
    resolution_shift,
)

PROCESSES = {
    "vp_scaled_linear": VPDiscrete(),
    "vp_linear": VPDiscrete(schedule="linear", beta_start=1e-4, beta_end=0.02),
    "vp_cosine": VPDiscrete(schedule="squaredcos_cap_v2"),
    "vp_zero_snr": VPDiscrete(zero_terminal_snr=True),
    "edm": EDM(),
    "flow": RectifiedFlow(),
    "flow_shift3": RectifiedFlow(shift=3.0),
}


def test_sd_sigma_range():
    vp = VPDiscrete()
    assert vp.sigma_min == pytest.approx(math.sqrt(0.00085 / (1 - 0.00085)), rel=1e-12)
    assert vp.sigma_max == pytest.approx(14.614642, rel=1e-5)


def test_vp_table_is_the_alphas_cumprod_of_its_betas():
    betas = beta_schedule("linear", 1000, 1e-4, 0.02)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    vp = VPDiscrete(schedule="linear", beta_start=1e-4, beta_end=0.02)
    torch.testing.assert_close(vp.alphas_cumprod, alphas_cumprod)


def test_cosine_schedule_caps_beta():
    assert float(beta_schedule("squaredcos_cap_v2").max()) == pytest.approx(0.999)


def test_zero_terminal_snr_keeps_first_and_ends_in_pure_noise():
    plain, zero = VPDiscrete(), VPDiscrete(zero_terminal_snr=True)
    assert zero.sigma_max == math.inf
    assert zero.sigma_min == pytest.approx(plain.sigma_min, rel=1e-9)
    assert float(zero.alphas_cumprod[-1]) == 0.0


@pytest.mark.parametrize("name", PROCESSES)
def test_sigma_t_round_trip(name):
    process = PROCESSES[name]
    t = torch.linspace(process.t_min, process.t_max, 97, dtype=torch.float64)[:-1]
    torch.testing.assert_close(process.sigma_to_t(process.t_to_sigma(t)), t, rtol=1e-9, atol=1e-9)
    sigma = process.sigma_table()
    sigma = sigma[torch.isfinite(sigma)]
    torch.testing.assert_close(
        process.t_to_sigma(process.sigma_to_t(sigma)), sigma, rtol=1e-9, atol=0
    )


@pytest.mark.parametrize("name", PROCESSES)
def test_noise_label_round_trip(name):
    process = PROCESSES[name]
    sigma = torch.tensor([process.sigma_min, 0.5, 1.0, 7.0], dtype=torch.float64)
    back = process.label_to_sigma(process.noise_label(sigma))
    torch.testing.assert_close(back, sigma, rtol=1e-9, atol=0)


def test_vp_timesteps_are_the_table_indices():
    vp = VPDiscrete()
    table = vp.sigma_table()
    t = vp.sigma_to_t(table[[0, 1, 500, 999]])
    torch.testing.assert_close(t, torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=torch.float64))


def test_flow_shift_multiplies_sigma():
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    plain, shifted = RectifiedFlow(), RectifiedFlow(shift=3.0)
    torch.testing.assert_close(shifted.t_to_sigma(u), 3 * plain.t_to_sigma(u))
    # SD3's form t' = s·t/(1+(s-1)·t), read back from σ' as the network's t = σ/(1+σ)
    t_shifted = shifted.noise_label(shifted.t_to_sigma(u)) / 1000
    torch.testing.assert_close(t_shifted, 3 * u / (1 + 2 * u))


def test_flux_resolution_shift():
    assert resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert resolution_shift(4096) == pytest.approx(math.exp(1.15))


@pytest.mark.parametrize("target", TARGETS)
def test_target_makes_the_denoiser_exact(target):
    """A network that outputs the ideal target makes D return x0 exactly, for every target."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    n = torch.randn(5, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.03, 0.4, 1.0, 3.0, 40.0], dtype=torch.float64)
    t = get_target(target)
    c_skip, c_out = t.coefficients(sigma)
    x = x0 + sigma[:, None] * n
    ideal = t.target(x0, n, sigma[:, None])
    torch.testing.assert_close(c_skip[:, None] * x + c_out[:, None] * ideal, x0)


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("target", ["epsilon", "v_prediction", "sample", "flow"])
def test_wrapped_exact_network_is_the_exact_denoiser(mixture, name, target):
    """mixture → raw network (any process, any target) → Denoiser gives back the mixture's D."""
    process = PROCESSES[name]
    denoiser = Denoiser(mixture.network(process, target), process, target)
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([process.sigma_min, 0.3, 2.0, 9.0], dtype=torch.float64)
    x = mixture.sample(4, g) + sigma[:, None] * torch.randn(4, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(denoiser(x, sigma), mixture(x, sigma), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", ["vp_zero_snr", "flow", "flow_shift3"])
@pytest.mark.parametrize("target", ["v_prediction", "flow", "sample"])
def test_denoiser_at_infinite_sigma_is_the_data_mean(mixture, name, target):
    process = PROCESSES[name]
    denoiser = Denoiser(mixture.network(process, target), process, target)
    unit_noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = denoiser(unit_noise, torch.full((3,), math.inf, dtype=torch.float64))
    mean = (mixture.weights[:, None] * mixture.means).sum(0).expand(3, 2)
    torch.testing.assert_close(out, mean, rtol=1e-7, atol=1e-7)


def test_epsilon_at_infinite_sigma_is_a_clear_error(mixture):
    process = PROCESSES["vp_zero_snr"]
    denoiser = Denoiser(mixture.network(process, "v_prediction"), process, "epsilon")
    with pytest.raises(ValueError, match="ε-prediction"):
        denoiser(torch.zeros(1, 2), torch.tensor([math.inf]))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="v_prediction"):
        get_target("velocity")
    with pytest.raises(ValueError, match="scaled_linear"):
        VPDiscrete(schedule="cosine")
    with pytest.raises(ValueError, match="min_sigma"):
        EDM(min_sigma=1.0, max_sigma=0.5)


def test_edm_preconditioning_matches_the_paper():
    edm = EDM(sigma_data=0.5)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(edm.c_in(sigma), 1 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(edm.noise_label(sigma), sigma.log() / 4)
    c_skip, c_out = get_target("edm").coefficients(sigma)
    torch.testing.assert_close(c_skip, 0.25 / (sigma**2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
