"""Flux ControlNet (diffusers' FluxControlNetModel, plain and union): destatic's
FluxControlNet and Flux with its residuals give diffusers' residuals and velocity on the same
tiny random weights; in generation (``controlnet=folder, control_image=``) a tiny FLUX.1 dev
folder draws diffusers' FluxControlNetPipeline's image from the same noise, with Euler and
DPM++ 2M, a control scale ≠ 1 and a control window."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import destatic
from destatic.models.flux import Flux, FluxConfig, pack_latents
from destatic.models.flux_controlnet import FluxControlNet, FluxControlNetConfig
from destatic.models.registry import load_component
from tests import tiny_sd
from tests.test_pipeline_flux import PROMPT, SIZE, TRANSFORMER, _as_sigma, _noise, _packed
from tests.test_pipeline_flux import flux_pipeline as tiny_flux_pipeline

diffusers = pytest.importorskip("diffusers")

CONTROLNET = dict(TRANSFORMER, num_layers=1, num_single_layers=1)  # each residual: 2 blocks


def _pair(cls, ours_cls, config_cls, seed: int, **config):
    torch.manual_seed(seed)
    theirs = tiny_sd.perturb(cls(**config, guidance_embeds=True), 0.1).eval()
    ours = ours_cls(config_cls.from_diffusers(dict(theirs.config))).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("num_mode", [None, 3])
def test_controlnet_and_controlled_flux_match_diffusers(num_mode):
    flux_d, flux = _pair(diffusers.FluxTransformer2DModel, Flux, FluxConfig, 0, **TRANSFORMER)
    net_d, net = _pair(
        diffusers.FluxControlNetModel,
        FluxControlNet,
        FluxControlNetConfig,
        1,
        **CONTROLNET,
        num_mode=num_mode,
    )
    g = torch.Generator().manual_seed(3)
    z, control = torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 4, 8, 16, generator=g)
    context, pooled = torch.randn(2, 7, 32, generator=g), torch.randn(2, 32, generator=g)
    t, guidance, scale = torch.tensor([0.83, 0.27]), torch.tensor([3.5, 2.0]), 0.7
    mode = None if num_mode is None else torch.tensor([2, 0])
    common = {
        "encoder_hidden_states": context,
        "pooled_projections": pooled,
        "timestep": t,
        "img_ids": diffusers.FluxPipeline._prepare_latent_image_ids(2, 4, 8, "cpu", torch.float32),
        "txt_ids": torch.zeros(7, 3),
        "guidance": guidance,
        "return_dict": False,
    }
    with torch.no_grad():
        double_d, single_d = net_d(
            hidden_states=pack_latents(z),
            controlnet_cond=pack_latents(control),
            controlnet_mode=None if mode is None else mode[:, None],
            conditioning_scale=scale,
            **common,
        )
        expected = flux_d(
            hidden_states=pack_latents(z),
            controlnet_block_samples=double_d,
            controlnet_single_block_samples=single_d,
            **common,
        )[0]
        plain = flux_d(hidden_states=pack_latents(z), **common)[0]
        double, single = net(z, control, t * 1000, context, pooled, guidance, mode, scale)
        got = flux(z, t * 1000, context, pooled, guidance, controls=(double, single))
    for ours, theirs in zip([*double, *single], [*double_d, *single_d], strict=True):
        assert (ours - theirs).abs().max().item() <= 1e-5
    assert (expected - plain).abs().max() > 1e-2  # the residuals steer it
    diff = (pack_latents(got) - expected).abs().max().item()
    print(f"flux controlnet (num_mode={num_mode}): max abs diff {diff:.2e}")
    assert diff <= 1e-5, diff


def test_fresh_controlnet_changes_nothing_and_bad_inputs_are_clear():
    torch.manual_seed(0)
    flux = Flux(FluxConfig(**TRANSFORMER, guidance_embeds=False)).eval()
    for p in flux.parameters():  # a random, non-zero model
        torch.nn.init.normal_(p, std=0.1)
    net = FluxControlNet(FluxControlNetConfig(**CONTROLNET, guidance_embeds=False)).eval()
    z, context, pooled = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32), torch.randn(1, 32)
    t = torch.tensor([500.0])
    with torch.no_grad():
        controls = net(z, torch.randn_like(z), t, context, pooled)
        assert all(h.abs().max() == 0 for h in [*controls[0], *controls[1]])
        torch.testing.assert_close(
            flux(z, t, context, pooled, controls=controls), flux(z, t, context, pooled)
        )
    with pytest.raises(ValueError, match="control latents"):
        net(z, torch.randn(1, 4, 8, 6), t, context, pooled)
    with pytest.raises(ValueError, match="no control modes"):
        net(z, z, t, context, pooled, mode=1)
    with pytest.raises(ValueError, match="not supported"):
        FluxControlNetConfig(**CONTROLNET, conditioning_embedding_channels=16).validate()
    union = FluxControlNet(FluxControlNetConfig(**CONTROLNET, num_mode=2))
    with pytest.raises(ValueError, match=r"needs a control mode \(0 … 1\)"):
        union(z, z, t, context, pooled)
    with pytest.raises(ValueError, match="control mode must be in"):
        union(z, z, t, context, pooled, mode=2)


# -- in generation: the same image as diffusers' FluxControlNetPipeline -------------------------


def _sharp_vae(pipe) -> None:
    """A posterior std of e^-15 (log-variance at diffusers' floor, -30): diffusers' pipeline
    encodes the control image with a posterior *sample* where destatic takes the mean, so this
    makes the two the same to ~1e-7 and the comparison about everything else."""
    conv = pipe.vae.encoder.conv_out
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:] = 0
        conv.bias[half:] = -40.0


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """(our dev pipeline, diffusers' FluxControlNetPipeline, the ControlNet's folder, a
    control image): a tiny FLUX.1 dev and a tiny FluxControlNetModel, both saved by diffusers."""
    tmp = tmp_path_factory.mktemp("flux_controlnet")
    reference = tiny_flux_pipeline(tmp, guidance_embeds=True, seed=4)
    _sharp_vae(reference)
    reference.save_pretrained(tmp / "pipeline", safe_serialization=True)
    torch.manual_seed(5)
    net = diffusers.FluxControlNetModel(**CONTROLNET, guidance_embeds=True)
    net = tiny_sd.perturb(net, 0.1).eval()
    net.save_pretrained(tmp / "controlnet", safe_serialization=True)
    both = diffusers.FluxControlNetPipeline(**reference.components, controlnet=net)
    both.set_progress_bar_config(disable=True)
    pixels = np.random.default_rng(6).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    return destatic.load(tmp / "pipeline"), both, tmp / "controlnet", Image.fromarray(pixels)


def _theirs(pipeline, z: torch.Tensor, control, steps: int, **kwargs) -> np.ndarray:
    """diffusers' image, guidance 3.5 (dev), from the unit noise z (flow state at t = 1)."""
    return pipeline(
        PROMPT,
        control_image=control,
        num_inference_steps=steps,
        guidance_scale=3.5,
        latents=_packed(z),
        max_sequence_length=512,
        output_type="np",
        **kwargs,
        **SIZE,
    ).images


def _ours(pipe, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    return pipe.generate(PROMPT, guidance=3.5, noise=noise, **kwargs, **SIZE)


def _same(image: torch.Tensor, expected: np.ndarray, what: str) -> None:
    diff = np.abs(image.permute(0, 2, 3, 1).numpy() - expected).max()
    print(f"flux controlnet {what}: max abs diff {diff:.2e}")
    assert diff <= 1e-5, diff


def test_controlnet_folder_loads_as_a_component(controlled):
    _, both, folder, _ = controlled
    net = load_component(folder)
    assert isinstance(net, FluxControlNet) and net.config.guidance_embeds
    for name, theirs in both.controlnet.state_dict().items():
        torch.testing.assert_close(net.state_dict()[name], theirs, rtol=0, atol=0)


@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.25, 0.75)])
def test_euler_same_image_as_flux_controlnet_pipeline(controlled, start, end):
    pipe, both, folder, control = controlled
    z = _noise(7)
    window = {"control_guidance_start": start, "control_guidance_end": end}
    expected = _theirs(both, z, control, 4, controlnet_conditioning_scale=0.7, **window)
    image = _ours(
        pipe,
        z,
        steps=4,
        controlnet=str(folder),
        control_image=control,
        control_scale=0.7,
        control_start=start,
        control_end=end,
    )
    _same(image, expected, f"euler (window {start}-{end})")
    plain = _ours(pipe, z, steps=4)
    assert (image - plain).abs().max() > 1e-2  # the ControlNet steers it


def _integer_timesteps(module: torch.nn.Module, scheduler, position: int):
    """A forward pre-hook: the timestep argument (at ``position``) replaced by the integer
    timestep diffusers' DPMSolverMultistepScheduler evaluates the networks at (see
    tests/test_pipeline_flux.py, IntegerTimesteps)."""
    labels, timesteps = scheduler.sigmas[:-1].double() * 1000, scheduler.timesteps.double()

    def hook(_module, args):
        t = args[position]
        i = (labels - float(t.reshape(-1)[0])).abs().argmin()
        return (*args[:position], torch.full_like(t, float(timesteps[i])), *args[position + 1 :])

    return module.register_forward_pre_hook(hook)


class FlowSigmasDPM(diffusers.DPMSolverMultistepScheduler):
    """DPMSolverMultistepScheduler as FluxPipeline drives it: with ``use_flow_sigmas`` the
    pipeline's linspace σ's are dropped for the scheduler's own. FluxControlNetPipeline does not
    drop them (and that scheduler takes none), so this does."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        steps = num_inference_steps if sigmas is None else len(sigmas)
        super().set_timesteps(steps, device, mu=mu)


def test_dpmpp_2m_same_image_as_flux_controlnet_pipeline(controlled):
    """DPM++ 2M on DPMSolverMultistepScheduler's σ's (flow sigmas, dynamic shift), the control
    on the first 4 of 5 steps at scale 1.4: our unit noise is z/t₀
    (tests/test_pipeline_flux.py)."""
    pipe, both, folder, control = controlled
    scheduler = FlowSigmasDPM(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )
    dpm = diffusers.FluxControlNetPipeline(**{**both.components, "scheduler": scheduler})
    dpm.set_progress_bar_config(disable=True)
    z = _noise(8)
    expected = _theirs(
        dpm, z, control, 5, controlnet_conditioning_scale=1.4, control_guidance_end=0.8
    )
    sigmas, t0 = _as_sigma(scheduler.sigmas), float(scheduler.sigmas[0])
    assert len(sigmas) == 6 and math.isfinite(sigmas[0])
    net = load_component(folder)
    hooks = [
        _integer_timesteps(pipe.network, scheduler, 1),  # flux(x, t, …)
        _integer_timesteps(net, scheduler, 2),  # controlnet(x, control, t, …)
    ]
    try:
        image = _ours(
            pipe,
            z / t0,
            sampler="dpmpp_2m",
            sigmas=sigmas,
            controlnet=net,
            control_image=control,
            control_scale=1.4,
            control_end=0.8,
        )
    finally:
        for hook in hooks:
            hook.remove()
    _same(image, expected, "dpmpp_2m")


def test_generation_refuses_controlnets_that_do_not_fit(controlled):
    pipe, _, _, control = controlled
    kwargs = {"steps": 1, "control_image": control, **SIZE}
    union = FluxControlNet(FluxControlNetConfig(**CONTROLNET, num_mode=2, guidance_embeds=True))
    with pytest.raises(ValueError, match="union Flux ControlNet"):
        pipe.generate(PROMPT, controlnet=union, **kwargs)
    wider = dict(CONTROLNET, num_attention_heads=3, guidance_embeds=True)
    with pytest.raises(ValueError, match="does not fit the transformer"):
        pipe.generate(PROMPT, controlnet=FluxControlNet(FluxControlNetConfig(**wider)), **kwargs)
