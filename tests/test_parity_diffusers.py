"""Parity with diffusers' schedulers: same exact denoiser, same σ grid, same noise, same result.

Each test runs a diffusers scheduler's own loop (``scale_model_input`` → model → ``step``) with
the ε an exact model of a Gaussian mixture would output, then runs the matching destatic sampler
on the σ grid that scheduler actually used, from the same initial noise and with the same fresh
noise draws, and compares the final samples in σ-space.

Conventions (docs/architecture.md, "One core"):

* k-style schedulers (Euler, Euler ancestral, Heun, LMS) already work on ``x = x0 + σ·n``;
* VP-latent schedulers (DDIM, DDPM, DPM-Solver++, UniPC) work on ``x_t = x/√(1+σ²)``, with
  ``σ = √((1-ᾱ)/ᾱ)``; their ancestral noise ``z·std_vp`` is ``z·σ_up`` in σ-space (same z).

diffusers computes its tables in float32 and steps in float32; destatic runs in float64 here. The
ε handed to diffusers is evaluated at the σ the scheduler itself uses for that step (its
``sigmas`` entry, or ``alphas_cumprod`` at the integer timestep for DDIM/DDPM), never at a
rounded timestep, so both sides integrate exactly the same problem. Two "pipeline" tests instead
give the network only diffusers' timestep, as a real model gets it, to pin down what that changes.

Deliberate differences from diffusers are tested as such, not skipped: DPM-Solver's rounded
Karras timesteps, UniPC bh1's NaN on a grid ending at σ = 0, EulerDiscrete's σ interpolation at
fractional timesteps, and the useless last noise draw of diffusers' ancestral schedulers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
# diffusers 0.42.1 calls np.array on tensors in a way numpy 2 deprecates; not our concern here
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from destatic.lab import GaussianMixture  # noqa: E402
from destatic.process import Denoiser, VPDiscrete  # noqa: E402
from destatic.sampling import make_sigmas, sample  # noqa: E402

# Stable Diffusion 1.x/2.x's schedule (what VPDiscrete() models).
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
STEPS = 10
# Final samples agree to ~1e-6 relative (float32 on diffusers' side); 1e-5 leaves headroom.
RTOL = 1e-5
VP = VPDiscrete()


# --- the problem: an exact denoiser and shared noise --------------------------------------------


class Problem:
    """A mixture, its exact ε-network for SD's VP process, and a batch of initial noise."""

    def __init__(self, dim: int, batch: int, seed: int = 0):
        self.mix = GaussianMixture.standard(dim=dim)
        self.net = self.mix.network(VP, "epsilon")
        self.z = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))
        self.noise_seed = 1000 + seed

    def epsilon(self, x_in: torch.Tensor, sigma: float) -> torch.Tensor:
        """diffusers' model_output: the exact model's ε for the scaled input ``x/√(1+σ²)``."""
        sig = torch.full((x_in.shape[0],), float(sigma), dtype=torch.float64)
        return self.net(x_in.to(torch.float64), VP.noise_label(sig)).to(x_in.dtype)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.noise_seed)

    def replay(self) -> Replay:
        """The draws diffusers makes from :meth:`generator`, in order, as a destatic ``noise=``."""
        return Replay(self.generator(), self.z.shape)


class Replay:
    """``noise(sigma, sigma_next)`` that returns, in order, what ``randn_tensor`` draws from the
    same seeded generator (float32 on the CPU), so both libraries see the same z at each step."""

    def __init__(self, generator: torch.Generator, shape: torch.Size):
        self.generator, self.shape, self.used = generator, shape, 0

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        self.used += 1
        draw = torch.randn(self.shape, generator=self.generator, dtype=torch.float32)
        return draw.to(torch.float64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: intra-op threads only cost time (a lot on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[(2, 64), (16, 32)], ids=["2d", "16d"], scope="module")
def problem(request) -> Problem:
    return Problem(*request.param)


# --- driving diffusers ------------------------------------------------------------------------


def sigma_of(alpha_bar) -> float:
    """σ of a (float32) ᾱ, computed in float64 from exactly the value diffusers uses."""
    a = float(alpha_bar)
    return math.sqrt((1 - a) / a)


def run_diffusers(
    scheduler, start, problem: Problem, sigma_at, generator=None, pipeline=False, **step_kwargs
):
    """diffusers' sampling loop from ``start``; ``sigma_at(scheduler, i, t)`` is the σ that the
    scheduler associates with its i-th call (read after ``scale_model_input``).

    With ``pipeline=True`` the ε network is driven as a diffusers pipeline drives a real model:
    it is told only the scheduler's timestep ``t`` (rounded, for DPM-Solver's Karras grid).
    """
    x = start
    if generator is not None:
        step_kwargs["generator"] = generator
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        if pipeline:
            label = torch.full((x.shape[0],), float(t), dtype=torch.float64)
            eps = problem.net(x_in.to(torch.float64), label).to(x_in.dtype)
        else:
            eps = problem.epsilon(x_in, sigma_at(scheduler, i, t))
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def k_sigma(scheduler, i, t) -> float:
    """k-style schedulers keep their own step index (Heun's repeats σ for its corrector)."""
    return float(scheduler.sigmas[scheduler.step_index])


def table_sigma(scheduler, i, t) -> float:
    """DPM-Solver / UniPC: ``sigmas[i]`` (with Karras σ the timestep is rounded, σ is not)."""
    return float(scheduler.sigmas[i])


def alpha_sigma(scheduler, i, t) -> float:
    """DDIM / DDPM: ᾱ at the integer timestep."""
    return sigma_of(scheduler.alphas_cumprod[int(t)])


def run_k(scheduler, problem: Problem, generator=None, pipeline=False):
    """A k-style scheduler from ``σ_max·z``: (its σ grid, its final sample in σ-space)."""
    scheduler.set_timesteps(STEPS)
    sigmas = torch.unique_consecutive(scheduler.sigmas.to(torch.float64))  # Heun repeats σ
    start = problem.z * scheduler.sigmas[0]
    out = run_diffusers(scheduler, start, problem, k_sigma, generator=generator, pipeline=pipeline)
    return sigmas, out


def run_ours(name: str, problem: Problem, sigmas: torch.Tensor, start, denoiser=None, **options):
    """destatic's sampler in float64 (by default on the exact denoiser itself)."""
    x = torch.as_tensor(start).to(torch.float64)
    return sample(name, denoiser or problem.mix, x, sigmas, **options)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest deviation relative to the largest value of the reference (σ-space samples)."""
    theirs = theirs.to(torch.float64)
    return float((ours.to(torch.float64) - theirs).abs().max() / theirs.abs().max())


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> None:
    assert ours.shape == theirs.shape
    assert bool(torch.isfinite(theirs).all())
    err = relative_error(ours, theirs)
    assert err < rtol, f"max |ours - diffusers| / max |diffusers| = {err:.2e} (limit {rtol:g})"


# --- k-style schedulers (σ-space) -------------------------------------------------------------

SPACINGS = {
    "linspace": {},
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
}


@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_euler_is_diffusers_euler_discrete(problem, spacing):
    sigmas, theirs = run_k(EulerDiscreteScheduler(**SD, **SPACINGS[spacing]), problem)
    ours = run_ours("euler", problem, sigmas, problem.z * float(sigmas[0]))
    assert_parity(ours, theirs)


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_euler_ancestral_is_diffusers_euler_ancestral(problem, spacing):
    scheduler = EulerAncestralDiscreteScheduler(**SD, **SPACINGS[spacing])
    sigmas, theirs = run_k(scheduler, problem, generator=problem.generator())
    replay = problem.replay()
    ours = run_ours("euler_ancestral", problem, sigmas, problem.z * float(sigmas[0]), noise=replay)
    # diffusers draws at every step, the last (σ_up = 0) included; we skip that useless draw
    assert replay.used == STEPS - 1
    assert_parity(ours, theirs)


@pytest.mark.parametrize("karras", [False, True], ids=["linspace", "karras"])
def test_heun_is_diffusers_heun_discrete(problem, karras):
    sigmas, theirs = run_k(HeunDiscreteScheduler(**SD, use_karras_sigmas=karras), problem)
    assert len(sigmas) == STEPS + 1
    ours = run_ours("heun", problem, sigmas, problem.z * float(sigmas[0]))
    assert_parity(ours, theirs)


@pytest.mark.parametrize("karras", [False, True], ids=["linspace", "karras"])
def test_lms_is_diffusers_lms_discrete(problem, karras):
    sigmas, theirs = run_k(LMSDiscreteScheduler(**SD, use_karras_sigmas=karras), problem)
    ours = run_ours("lms", problem, sigmas, problem.z * float(sigmas[0]))
    assert_parity(ours, theirs)


# --- VP-latent schedulers (x_t = x/√(1+σ²)) ---------------------------------------------------


def run_vp(scheduler, problem: Problem, sigma_at, generator=None, **kwargs):
    """A VP scheduler from the latent ``z`` (σ-space ``√(1+σ₀²)·z``): its final latent."""
    return run_diffusers(scheduler, problem.z.clone(), problem, sigma_at, generator, **kwargs)


def to_sigma_space(latent: torch.Tensor, sigma: float) -> torch.Tensor:
    return latent.to(torch.float64) * math.sqrt(1 + sigma**2)


def vp_start(problem: Problem, sigmas: torch.Tensor) -> torch.Tensor:
    return to_sigma_space(problem.z, float(sigmas[0]))


DDIM_CONFIGS = {
    # Stable Diffusion's own scheduler config: leading spacing + 1, the last step lands on ᾱ_0
    "sd": {"set_alpha_to_one": False, "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing", "set_alpha_to_one": True},
}


def ddim_sigmas(scheduler) -> torch.Tensor:
    """σ at DDIM's timesteps, then where its last step lands: ᾱ_0 (σ_min) unless
    ``set_alpha_to_one``, in which case σ = 0."""
    sig = [sigma_of(scheduler.alphas_cumprod[int(t)]) for t in scheduler.timesteps]
    sig.append(sigma_of(scheduler.final_alpha_cumprod))
    return torch.tensor(sig, dtype=torch.float64)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("config", list(DDIM_CONFIGS))
def test_ddim_is_diffusers_ddim(problem, config, eta):
    scheduler = DDIMScheduler(**SD, clip_sample=False, **DDIM_CONFIGS[config])
    scheduler.set_timesteps(STEPS)
    sigmas = ddim_sigmas(scheduler)
    generator = problem.generator() if eta > 0 else None
    theirs = run_vp(scheduler, problem, alpha_sigma, generator=generator, eta=eta)
    replay = problem.replay()
    ours = run_ours("ddim", problem, sigmas, vp_start(problem, sigmas), eta=eta, noise=replay)
    # DDIM draws fresh noise at every step where η > 0 (also the last one when it ends at σ_min)
    assert replay.used == (0 if eta == 0 else STEPS - int(float(sigmas[-1]) == 0))
    assert_parity(ours, to_sigma_space(theirs, float(sigmas[-1])))


def test_ddpm_is_diffusers_ddpm(problem):
    scheduler = DDPMScheduler(**SD, clip_sample=False, steps_offset=1)
    scheduler.set_timesteps(STEPS)
    # DDPM's last step goes to ᾱ = 1 (σ = 0)
    sig = [sigma_of(scheduler.alphas_cumprod[int(t)]) for t in scheduler.timesteps]
    sigmas = torch.tensor([*sig, 0.0], dtype=torch.float64)
    theirs = run_vp(scheduler, problem, alpha_sigma, generator=problem.generator())
    replay = problem.replay()
    ours = run_ours("ddpm", problem, sigmas, vp_start(problem, sigmas), noise=replay)
    assert replay.used == STEPS - 1
    assert_parity(ours, to_sigma_space(theirs, 0.0))


def run_multistep(scheduler, problem: Problem, generator=None, pipeline=False):
    """DPM-Solver++ or UniPC: (its σ grid, its final sample in σ-space). The grid ends at 0, or at
    σ_min with ``final_sigmas_type="sigma_min"``."""
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler.sigmas.to(torch.float64)
    theirs = run_vp(scheduler, problem, table_sigma, generator=generator, pipeline=pipeline)
    return sigmas, to_sigma_space(theirs, float(sigmas[-1]))


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_is_diffusers_dpmsolver_multistep(problem, solver_type):
    scheduler = DPMSolverMultistepScheduler(**SD, solver_type=solver_type)
    sigmas, theirs = run_multistep(scheduler, problem)
    ours = run_ours("dpmpp_2m", problem, sigmas, vp_start(problem, sigmas), solver_type=solver_type)
    assert_parity(ours, theirs)


def test_dpmpp_2m_karras_is_diffusers_dpmsolver_multistep_karras(problem):
    """Yes: destatic's ``dpmpp_2m`` on ``make_sigmas("karras", …)`` is diffusers'
    ``DPMSolverMultistepScheduler(use_karras_sigmas=True)`` (the "DPM++ 2M Karras" of UIs).

    On diffusers' own grid the two agree to float32 rounding, and on our own float64 Karras grid
    too (the grids differ by ~1e-5 at σ_min: diffusers' ᾱ table is a float32 cumprod). Here ε is
    evaluated at the Karras σ; for what a diffusers *pipeline* tells the network, see the next
    test.
    """
    scheduler = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    sigmas, theirs = run_multistep(scheduler, problem)
    ours = run_ours("dpmpp_2m", problem, sigmas, vp_start(problem, sigmas))
    assert_parity(ours, theirs)

    grid = make_sigmas("karras", STEPS, process=VP)
    torch.testing.assert_close(grid, sigmas, rtol=3e-5, atol=0)
    ours_grid = run_ours("dpmpp_2m", problem, grid, vp_start(problem, sigmas))
    assert_parity(ours_grid, theirs)


def test_dpmpp_2m_karras_pipeline_rounds_the_networks_timestep(problem):
    """The one deliberate difference behind "DPM++ 2M Karras": a diffusers pipeline tells the
    network ``round(t(σ))`` while the solver steps with the unrounded Karras σ (σ off by ~2% at
    10 steps); destatic's ``Denoiser`` tells it the fractional t(σ). Reproduce diffusers exactly
    with a denoiser that rounds too, and check the rounding is visible in the samples."""
    scheduler = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    sigmas, theirs = run_multistep(scheduler, problem, pipeline=True)
    start = vp_start(problem, sigmas)

    def rounded(x, sigma):
        scale = (1 + sigma**2).sqrt()[:, None]
        eps = problem.net(x / scale, VP.sigma_to_t(sigma).round())
        return x - sigma[:, None] * eps

    assert_parity(run_ours("dpmpp_2m", problem, sigmas, start, denoiser=rounded), theirs)
    wrapped = Denoiser(problem.net, VP, "epsilon")  # fractional t(σ), as destatic runs a model
    exact = run_ours("dpmpp_2m", problem, sigmas, start, denoiser=wrapped)
    assert relative_error(exact, theirs) > 10 * RTOL  # ~2e-4 here: small, but not rounding noise


def test_euler_karras_pipeline_matches_denoiser_wrapper(problem):
    """End to end as with a real model: diffusers' Euler hands the ε network its fractional
    timestep; destatic wraps the same network in a ``Denoiser`` (c_in, t(σ), c_out). The two
    timestep maps interpolate log σ alike; only diffusers' float32 σ table (~1e-5) separates them.
    """
    scheduler = EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    sigmas, theirs = run_k(scheduler, problem, pipeline=True)
    denoiser = Denoiser(problem.net, VP, "epsilon")
    ours = run_ours("euler", problem, sigmas, problem.z * float(sigmas[0]), denoiser=denoiser)
    assert_parity(ours, theirs)


def test_dpmpp_2m_sde_is_diffusers_sde_dpmsolver_pp(problem):
    scheduler = DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++")
    sigmas, theirs = run_multistep(scheduler, problem, generator=problem.generator())
    replay = problem.replay()
    ours = run_ours("dpmpp_2m_sde", problem, sigmas, vp_start(problem, sigmas), noise=replay)
    assert replay.used == STEPS - 1  # diffusers also draws (and multiplies by 0) at σ_next = 0
    assert_parity(ours, theirs)


def test_dpmpp_3m_is_diffusers_third_order_heun(problem):
    """``dpmpp_3m`` (k-diffusion's 3M with η = 0) is diffusers' third-order DPM-Solver++ with
    ``solver_type="heun"`` (k-diffusion's second-order warm-up step) and no lowering of the order
    before the last step (diffusers lowers it below 15 steps by default)."""
    scheduler = DPMSolverMultistepScheduler(
        **SD, solver_order=3, solver_type="heun", lower_order_final=False
    )
    sigmas, theirs = run_multistep(scheduler, problem)
    ours = run_ours("dpmpp_3m", problem, sigmas, vp_start(problem, sigmas))
    assert_parity(ours, theirs)


UNIPC_CASES = [
    pytest.param("bh2", False, "zero", id="bh2-linspace"),
    pytest.param("bh2", True, "zero", id="bh2-karras"),
    pytest.param("bh2", False, "sigma_min", id="bh2-linspace-to-sigma_min"),
    pytest.param("bh1", False, "sigma_min", id="bh1-linspace-to-sigma_min"),
    # diffusers 0.42.1's bh1 returns NaN on a grid ending at σ = 0: its last (first-order)
    # predictor computes B(h)·Σ = (-h)·0 with h = ∞. Ours takes the plain DDIM step to x̂0 there.
    pytest.param(
        "bh1",
        False,
        "zero",
        id="bh1-linspace-diffusers-nan",
        marks=pytest.mark.xfail(strict=True, reason="diffusers bh1 gives NaN at σ=0"),
    ),
]


@pytest.mark.parametrize(("variant", "karras", "final"), UNIPC_CASES)
def test_uni_pc_is_diffusers_unipc_multistep(problem, variant, karras, final):
    scheduler = UniPCMultistepScheduler(
        **SD, solver_type=variant, use_karras_sigmas=karras, final_sigmas_type=final
    )
    sigmas, theirs = run_multistep(scheduler, problem)
    name = "uni_pc" if variant == "bh2" else "uni_pc_bh1"
    ours = run_ours(name, problem, sigmas, vp_start(problem, sigmas))
    assert bool(torch.isfinite(ours).all())
    assert_parity(ours, theirs)


def test_parity_is_not_vacuous(problem):
    """The comparisons above are sharp: on the same grid, from the same start, a neighbouring
    solver or a noise stream one draw out of step misses diffusers by far more than RTOL."""
    scheduler = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    sigmas, theirs = run_multistep(scheduler, problem)
    start = vp_start(problem, sigmas)
    for other in ("euler", "dpmpp_3m", "uni_pc", "heun"):
        assert relative_error(run_ours(other, problem, sigmas, start), theirs) > 100 * RTOL, other

    sigmas, theirs = run_k(EulerAncestralDiscreteScheduler(**SD), problem, problem.generator())
    replay = problem.replay()
    replay(0.0, 0.0)  # skip one draw
    ours = run_ours("euler_ancestral", problem, sigmas, problem.z * float(sigmas[0]), noise=replay)
    assert relative_error(ours, theirs) > 100 * RTOL


# --- grids ------------------------------------------------------------------------------------

# diffusers builds ᾱ as a float32 cumprod, so its σ table is up to 1.3e-5 off the float64 one
# (worst at σ_min); grids are compared at 3e-5 relative for that reason alone.
GRID_RTOL = 3e-5
GRID_CASES = {
    "karras": ({"use_karras_sigmas": True}, {}),
    "leading": ({"timestep_spacing": "leading", "steps_offset": 1}, {"offset": 1}),
    "trailing": ({"timestep_spacing": "trailing"}, {}),
    "linspace": ({"timestep_spacing": "linspace"}, {}),
    "normal": ({"timestep_spacing": "linspace"}, {}),
}


@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("grid", list(GRID_CASES))
def test_grid_matches_diffusers_euler_discrete(grid, steps):
    config, options = GRID_CASES[grid]
    scheduler = EulerDiscreteScheduler(**SD, **config)
    scheduler.set_timesteps(steps)
    theirs = scheduler.sigmas.to(torch.float64)
    ours = make_sigmas(grid, steps, process=VP, **options)
    assert ours.shape == theirs.shape
    if grid in ("linspace", "normal") and (VP.num_timesteps - 1) % (steps - 1):
        # Fractional timesteps: diffusers' EulerDiscrete interpolates σ linearly between table
        # entries, destatic (and k-diffusion) interpolate log σ. Same timesteps, and σ equal to
        # the log-linear interpolation of diffusers' own table at them.
        t = scheduler.timesteps.to(torch.float64)
        torch.testing.assert_close(VP.sigma_to_t(ours[:-1]), t, rtol=0, atol=1e-3)
        table = np.log(scheduler.alphas_cumprod.double().pow(-1).sub(1).sqrt().numpy())
        expected = np.exp(np.interp(t.numpy(), np.arange(len(table)), table))
        theirs = torch.tensor([*expected, 0.0], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=GRID_RTOL, atol=0)


# The integer-timestep schedulers (DDIM, DPM-Solver, UniPC, DDPM): each spacing is one of our
# time grids rounded to trained timesteps (``snap=True``; exact already for leading/trailing).
# DPM-Solver's "leading" (1000 // (steps + 1) strides) has no counterpart and is not claimed.
INTEGER_GRID_CASES = {
    "ddim-linspace": (DDIMScheduler, {"timestep_spacing": "linspace"}, "normal", {}),
    "ddim-leading": (DDIMScheduler, {"steps_offset": 1}, "leading", {"offset": 1}),
    "ddim-trailing": (DDIMScheduler, {"timestep_spacing": "trailing"}, "trailing", {}),
    "dpmsolver-linspace": (DPMSolverMultistepScheduler, {}, "sgm_uniform", {}),
    "dpmsolver-trailing": (
        DPMSolverMultistepScheduler,
        {"timestep_spacing": "trailing"},
        "trailing",
        {},
    ),
}


@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("case", list(INTEGER_GRID_CASES))
def test_grid_matches_diffusers_integer_timesteps(case, steps):
    cls, config, grid, options = INTEGER_GRID_CASES[case]
    scheduler = cls(**SD, **config)
    scheduler.set_timesteps(steps)
    theirs = [sigma_of(scheduler.alphas_cumprod[int(t)]) for t in scheduler.timesteps]
    ours = make_sigmas(grid, steps, process=VP, snap=True, **options)
    torch.testing.assert_close(
        VP.sigma_to_t(ours[:-1]).round().long(), scheduler.timesteps, rtol=0, atol=0
    )
    theirs = torch.tensor([*theirs, 0.0], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=GRID_RTOL, atol=0)
