"""TCD (Zheng et al. 2024): the ``tcd`` sampler against diffusers' TCDScheduler on the same
ε-network, grid and noise draws, and a TCDScheduler folder's defaults."""

import numpy as np
import pytest
import torch

import destatic
from destatic.process import Denoiser, VPDiscrete
from destatic.sampling import SAMPLERS, make_sigmas, noise_sampler
from destatic.sampling.tcd import tcd_intermediate_sigma
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")

PROCESS = VPDiscrete()


def _eps_net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear stand-in for an ε-network (the same function on both sides)."""
    t = torch.as_tensor(t, dtype=x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return 0.8 * torch.tanh(x_t) + 0.1 * torch.sin(3 * x_t + t / 300)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_tcd_sampler_is_tcd_scheduler(gamma, steps):
    scheduler = diffusers.TCDScheduler()
    scheduler.set_timesteps(steps)
    grid = make_sigmas("lcm", steps, process=PROCESS)
    torch.testing.assert_close(
        PROCESS.sigma_to_t(grid[:-1]), scheduler.timesteps.double(), rtol=0, atol=1e-9
    )
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma_max = float(grid[0])
    x_t = z * (sigma_max / (1 + sigma_max**2) ** 0.5)  # diffusers' VP state at t = 999
    g = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        x_t = scheduler.step(_eps_net(x_t, t), t, x_t, eta=gamma, generator=g).prev_sample
    # diffusers ends at timestep 0 (x̂0 + σ(0)·ε̂, VP-scaled); here: a grid ending at σ(0)
    grid = torch.cat([grid[:-1], torch.tensor([PROCESS.sigma_min], dtype=torch.float64)])
    denoiser = Denoiser(_eps_net, PROCESS, "epsilon")
    x = (z * sigma_max).double()
    draws = noise_sampler(x, torch.Generator().manual_seed(1))
    out = SAMPLERS["tcd"](denoiser, x, grid, process=PROCESS, gamma=gamma, noise=draws)
    got = out * float(PROCESS.c_in(torch.tensor(PROCESS.sigma_min, dtype=torch.float64)))
    scale = x_t.abs().max().item()
    assert (got.float() - x_t).abs().max().item() <= 1e-5 * scale
    if gamma > 0 and steps > 1:  # the fresh draws matter
        other = SAMPLERS["tcd"](
            denoiser, x, grid, process=PROCESS, gamma=gamma, noise=noise_sampler(x, None)
        )
        assert (other - out).abs().max() > 1e-2


def test_intermediate_time_is_floor_of_one_minus_gamma_t_next():
    sigma_next = float(PROCESS.sigma_table()[759])
    s = tcd_intermediate_sigma(PROCESS, sigma_next, 0.3)  # ⌊0.7·759⌋ = 531
    assert s == pytest.approx(float(PROCESS.sigma_table()[531]), rel=1e-12)
    assert tcd_intermediate_sigma(PROCESS, sigma_next, 0.0) == pytest.approx(sigma_next)
    with pytest.raises(ValueError, match="gamma"):
        SAMPLERS["tcd"](None, torch.zeros(1), torch.tensor([1.0, 0.0]), process=PROCESS, gamma=2)


def test_tcd_folder_defaults_and_generation(tmp_path):
    unet, vae, text, tokenizer = tiny_sd.components(tmp_path)
    reference = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.TCDScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(tmp_path / "pipeline", safe_serialization=True)
    ours = destatic.load(tmp_path / "pipeline")
    assert ours.target == "epsilon"  # TCD applies no boundary condition
    d = ours.sampling_defaults
    assert (d["sampler"], d["steps"], d["grid"], d["guidance"]) == ("tcd", 4, "lcm", 1.0)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma_max = ours.process.sigma_max
    kwargs = {"seed": 3, "width": 16, "height": 16, "noise": z}
    image = ours.generate("a red apple", gamma=0.3, **kwargs)
    assert torch.equal(image, ours.generate("a red apple", gamma=0.3, **kwargs))
    expected = reference(
        "a red apple",
        num_inference_steps=4,
        guidance_scale=1.0,
        eta=0.3,
        latents=z * (sigma_max / (1 + sigma_max**2) ** 0.5),
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images
    # the same draws; only the last step differs (module doc of destatic.sampling.tcd: diffusers
    # stops at timestep 0, σ ≈ 0.03, destatic at σ = 0), so the images agree only roughly
    diff = np.abs(image.permute(0, 2, 3, 1).numpy() - expected).max()
    print(f"tcd pipeline vs diffusers (last-step difference only): {diff:.2e}")
    assert diff < 5e-3
    reseeded = ours.generate("a red apple", gamma=0.3, **{**kwargs, "seed": 4})
    assert (reseeded - image).abs().max() > 1e-3


def test_without_a_process_the_time_is_sigma():
    assert tcd_intermediate_sigma(None, 2.0, 0.25) == 1.5
