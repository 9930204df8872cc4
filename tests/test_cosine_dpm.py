"""Stable Audio's scheduler in the σ-space core: diffusers' ``CosineDPMSolverMultistepScheduler``
is the process :class:`CosineEDM` with the EDM v-target, the ``exponential`` / ``karras`` grid,
``dpmpp_2m_sde`` and Brownian-tree noise; each step equals diffusers' (≤ 1e-5) from the same
seed. Its deterministic counterpart, ``dpmpp_2m``, equals ``EDMDPMSolverMultistepScheduler``'s
DPM-Solver++(2M) on the same process."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchsde")
diffusers = pytest.importorskip("diffusers")

from destatic.io import CheckpointError  # noqa: E402
from destatic.process import (  # noqa: E402
    EDM,
    CosineEDM,
    Denoiser,
    EDMTarget,
    EDMVTarget,
    preconditioning,
)
from destatic.process.schedulers import (  # noqa: E402
    process_from_scheduler_config,
    scheduler_config_from_process,
    scheduler_sampling_defaults,
)
from destatic.sampling import brownian_noise, generators, make_sigmas, resolve_noise, sample  # noqa: E402

COSINE = diffusers.CosineDPMSolverMultistepScheduler
SHAPE = (1, 3, 24)  # (batch, channels, frames): a 1-D audio latent
# diffusers' scheduler asks its Brownian tree for σ's just outside [σ_min, σ_max] (torchsde clamps)
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")


class ToyNet(torch.nn.Module):
    """A small nonlinear raw network ``F(c_in·x, label)`` (channel mixing, label-dependent)."""

    def __init__(self, channels: int = SHAPE[1]):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mix = torch.randn(channels, channels, generator=g) * 0.5
        self.bias = torch.randn(channels, 1, generator=g)

    def forward(self, x, label):
        label = torch.as_tensor(label, dtype=x.dtype).reshape(-1, 1, 1)
        return torch.tanh(torch.einsum("ij,bjt->bit", self.mix, x) + self.bias * label) + 0.3 * x


def _scheduler(**config):
    return COSINE(**config)


def _config(sched) -> dict:
    """The scheduler's ``scheduler_config.json`` as a dict (with its class name)."""
    return {**sched.config, "_class_name": type(sched).__name__}


def _diffusers_states(sched, net, x, steps, generator):
    """diffusers' loop (StableAudioPipeline's) from state ``x``: the state after each step."""
    sched.set_timesteps(steps)
    out = []
    for t in sched.timesteps:
        model_input = sched.scale_model_input(x, t)
        x = sched.step(net(model_input, t), t, x, generator=generator).prev_sample
        out.append(x)
    return out


def _destatic_states(model_process, target, net, x, sigmas, **kw):
    """destatic's sampler from state ``x``: the state after each step."""
    seen = []
    final = sample(
        kw.pop("sampler", "dpmpp_2m_sde"),
        Denoiser(net, model_process, target),
        x,
        sigmas,
        callback=lambda info: seen.append(info.x),
        **kw,
    )
    return [*seen[1:], final]


def _assert_steps_close(ours, theirs, tol=1e-5):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        err = float((a - b).norm() / b.norm().clamp(min=1e-12))
        assert err <= tol, f"step {i}: relative error {err:.2e}"


def test_scheduler_config_loads_as_cosine_edm_and_saves_back():
    sched = _scheduler()
    process, target = process_from_scheduler_config(_config(sched))
    assert isinstance(process, CosineEDM) and (process.sigma_min, process.sigma_max) == (0.3, 500)
    assert isinstance(target, EDMVTarget) and target.sigma_data == 1.0
    assert scheduler_sampling_defaults(_config(sched), False) == {
        "sampler": "dpmpp_2m_sde",
        "grid": "exponential",
    }
    saved = scheduler_config_from_process(process, target)
    again = COSINE.from_config(saved)
    for key in ("sigma_min", "sigma_max", "sigma_data", "prediction_type", "sigma_schedule"):
        assert again.config[key] == sched.config[key], key
    assert process_from_scheduler_config(saved) == (process, target)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_preconditioning_matches_diffusers(prediction):
    sched = _scheduler(sigma_data=0.7, prediction_type=prediction)
    process, target = process_from_scheduler_config(_config(sched))
    sigma = torch.tensor([0.3, 1.0, 12.5, 500.0])
    c_in, c_skip, c_out, c_noise = preconditioning(process, target, sigma)
    x, f = torch.randn(4, 2, 5, dtype=torch.float64), torch.randn(4, 2, 5, dtype=torch.float64)
    s = sigma.double().reshape(-1, 1, 1)
    ref = sched.precondition_outputs(x, f, s)
    ours = c_skip.reshape(-1, 1, 1) * x + c_out.reshape(-1, 1, 1) * f
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_in.float(), sched._get_conditioning_c_in(sigma))
    torch.testing.assert_close(c_noise.float(), sched.precondition_noise(sigma))
    torch.testing.assert_close(process.label_to_sigma(c_noise), sigma.double())


def test_edm_schedulers_take_v_prediction_too():
    cfg = _config(diffusers.EDMEulerScheduler(prediction_type="v_prediction"))
    process, target = process_from_scheduler_config(cfg)
    assert type(process) is EDM and isinstance(target, EDMVTarget)
    assert scheduler_config_from_process(process, target)["prediction_type"] == "v_prediction"
    cfg = _config(diffusers.EDMEulerScheduler())
    assert type(process_from_scheduler_config(cfg)[1]) is EDMTarget


@pytest.mark.parametrize(
    ("key", "value"),
    [("final_sigmas_type", "sigma_min"), ("solver_type", "heun"), ("prediction_type", "sample")],
)
def test_unsupported_cosine_settings_are_one_line(key, value):
    cfg = {**_config(_scheduler()), key: value}
    with pytest.raises(CheckpointError, match=key) as e:
        process_from_scheduler_config(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("grid", ["exponential", "karras"])
@pytest.mark.parametrize("steps", [1, 7, 30, 100])
def test_grid_is_the_schedulers_to_the_bit(grid, steps):
    sched = _scheduler(sigma_schedule=grid)
    sched.set_timesteps(steps)
    process, _ = process_from_scheduler_config(_config(sched))
    ours = make_sigmas(grid, steps, process=process)
    assert ours.dtype == torch.float64
    assert torch.equal(ours.float(), sched.sigmas)


@pytest.mark.parametrize("grid", ["exponential", "karras"])
def test_sde_steps_match_diffusers_from_the_same_seed(grid):
    sched = _scheduler(sigma_schedule=grid)
    process, target = process_from_scheduler_config(_config(sched))
    defaults = scheduler_sampling_defaults(_config(sched), False)
    net, steps = ToyNet(), 12
    sigmas = make_sigmas(defaults["grid"], steps, process=process)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    theirs = _diffusers_states(sched, net, x, steps, torch.Generator().manual_seed(42))
    ours = _destatic_states(
        process, target, net, x, sigmas, sampler=defaults["sampler"],
        generator=torch.Generator().manual_seed(42), process=process,
    )  # fmt: skip
    _assert_steps_close(ours, theirs)
    # the noise is the process's Brownian tree: Gaussian per-step draws give another sample
    other = _destatic_states(
        process, target, net, x, sigmas, generator=torch.Generator().manual_seed(42),
        process=process, noise="gaussian",
    )  # fmt: skip
    assert float((other[-2] - theirs[-2]).norm() / theirs[-2].norm()) > 1e-2


def test_sde_batch_with_a_seed_per_sample_matches_diffusers():
    """A list of generators gives each sample its own tree, in diffusers and here; so a seed
    draws the same audio alone or in a batch."""
    sched = _scheduler()
    process, target = process_from_scheduler_config(_config(sched))
    net, steps, seeds = ToyNet(), 8, [5, 9]
    sigmas = make_sigmas("exponential", steps, process=process)
    x = torch.randn(2, *SHAPE[1:], generator=torch.Generator().manual_seed(3)) * float(sigmas[0])
    theirs = _diffusers_states(sched, net, x, steps, generators(seeds))
    run = {"generator": generators(seeds), "process": process}
    ours = _destatic_states(process, target, net, x, sigmas, **run)
    _assert_steps_close(ours, theirs)
    run = {"generator": generators(seeds[1]), "process": process}
    alone = _destatic_states(process, target, net, x[1:], sigmas, **run)
    torch.testing.assert_close(alone[-1], ours[-1][1:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grid", ["exponential", "karras"])
def test_ode_steps_match_diffusers_dpmsolver_pp_2m(grid):
    """The deterministic DPM-Solver++(2M) on the same process: diffusers' EDM DPM-Solver with
    the same σ range, σ_data and v-prediction, fed the network at the cosine label."""
    cfg = _config(_scheduler(sigma_schedule=grid))
    process, target = process_from_scheduler_config(cfg)
    sched = diffusers.EDMDPMSolverMultistepScheduler(
        sigma_min=0.3, sigma_max=500.0, sigma_data=1.0, sigma_schedule=grid,
        prediction_type="v_prediction", algorithm_type="dpmsolver++", final_sigmas_type="zero",
    )  # fmt: skip
    net, steps = ToyNet(), 10
    sched.set_timesteps(steps)
    sigmas = make_sigmas(grid, steps, process=process)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * float(sigmas[0])
    theirs, state = [], x
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]
        label = process.noise_label(sigma.double()).float()
        out = net(sched.precondition_inputs(state, sigma), label)
        state = sched.step(out, t, state).prev_sample
        theirs.append(state)
    ours = _destatic_states(process, target, net, x, sigmas, sampler="dpmpp_2m")
    _assert_steps_close(ours, theirs)


def test_brownian_noise_is_standard_normal_and_path_consistent():
    x = torch.zeros(4, 2000)
    draw = brownian_noise(x, torch.Generator().manual_seed(0), 0.3, 500.0)
    n = draw(80.0, 10.0)
    assert abs(float(n.mean())) < 0.04 and abs(float(n.std()) - 1) < 0.04
    # one path: the increment over [10, 80] is the sum of those over [10, 30] and [30, 80]
    total = n * math.sqrt(70)
    parts = draw(80.0, 30.0) * math.sqrt(50) + draw(30.0, 10.0) * math.sqrt(20)
    torch.testing.assert_close(parts, total, rtol=1e-4, atol=1e-4)
    again = brownian_noise(x, torch.Generator().manual_seed(0), 0.3, 500.0)(80.0, 10.0)
    torch.testing.assert_close(again, n)


def test_noise_is_chosen_by_name_or_by_the_process():
    x, sigmas = torch.zeros(1, 3), torch.tensor([500.0, 1.0, 0.0], dtype=torch.float64)
    g = [torch.Generator().manual_seed(0)]
    brownian = resolve_noise(None, x, sigmas, g, CosineEDM())(500.0, 1.0)
    by_name = resolve_noise("brownian", x, sigmas, g, CosineEDM())(500.0, 1.0)
    torch.testing.assert_close(brownian, by_name)
    gaussian = resolve_noise(None, x, sigmas, [torch.Generator().manual_seed(0)], EDM())
    assert not torch.allclose(gaussian(500.0, 1.0), brownian)
    with pytest.raises(ValueError, match="unknown noise 'pink'; choose one of gaussian, brownian"):
        resolve_noise("pink", x, sigmas, g)
