"""Flux folders (dev: guidance-distilled; schnell: no guidance input) saved by diffusers: the
transformer, the prompt encoding, the resolution-dependent shift and the grid, and the same
image as diffusers' FluxPipeline with Euler (FlowMatchEulerDiscreteScheduler) and DPM++ 2M
(DPMSolverMultistepScheduler on flow sigmas)."""

import math

import numpy as np
import pytest
import torch

import destatic
from destatic.models.flux import Flux, pack_latents, position_ids, unpack_latents
from destatic.models.text import FluxTextEncoder
from destatic.pipelines import GenerationRequest
from destatic.pipelines.stages import sigma_grid
from destatic.process import RectifiedFlow
from destatic.process.flow import ResolutionShift
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")

TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels, 2×2-packed
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,  # the tiny T5's width
    pooled_projection_dim=32,  # the tiny CLIP's width
    axes_dims_rope=(4, 6, 6),
)
# Flux's VAE: no quant convs, scaling and shift factor of FLUX.1 (2× down here, 4 channels)
VAE = dict(
    tiny_sd.VAE,
    sample_size=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SCHEDULER = dict(
    shift=3.0,  # ignored under dynamic shifting (FLUX.1's configs store it)
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
SIZE = {"height": 16, "width": 32}  # latents 8×16: 4×8 = 32 packed tokens, not square
VARIANTS = {"dev": (True, 512), "schnell": (False, 256)}  # guidance_embeds, T5 tokens
PROMPT = "a red apple"


def flux_pipeline(tmp, guidance_embeds: bool, seed: int = 0):
    """A tiny random diffusers FluxPipeline (CLIP-L + T5), perturbed."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=guidance_embeds)
    tokenizer = tiny_sd.clip_tokenizer(tmp / "tokenizer_src")
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    t5, t5_tokenizer = tiny_sd.t5_encoder_and_tokenizer(d_model=32)
    pipe = FluxPipeline(
        transformer=tiny_sd.perturb(transformer, 0.1).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=tiny_sd.perturb(AutoencoderKL(**VAE)).eval(),
        text_encoder=clip.eval(),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """variant → (our pipeline loaded from the saved folder, diffusers' FluxPipeline)."""
    out = {}
    for seed, (name, (guidance_embeds, _)) in enumerate(VARIANTS.items()):
        tmp = tmp_path_factory.mktemp(f"flux_{name}")
        reference = flux_pipeline(tmp, guidance_embeds, seed=seed)
        reference.save_pretrained(tmp / "pipeline", safe_serialization=True)
        out[name] = destatic.load(tmp / "pipeline"), reference
    return out


def _packed(z: torch.Tensor) -> torch.Tensor:
    """diffusers' own 2×2 packing of (B, C, H, W) latents (its ``latents=`` format)."""
    b, c, h, w = z.shape
    return diffusers.FluxPipeline._pack_latents(z, b, c, h, w)


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(seed))


def _as_sigma(t: torch.Tensor) -> torch.Tensor:
    """diffusers' flow times t (t = 1 first, 0 last) as σ = t/(1-t)."""
    t = t.double()
    return torch.where(t >= 1, torch.full_like(t, math.inf), t / (1 - t))


# -- loading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_loads_with_flux_parts_and_variant_defaults(flux, variant):
    pipe, _ = flux[variant]
    guidance_embeds, length = VARIANTS[variant]
    assert isinstance(pipe.network, Flux) and pipe.family.name == "flux"
    assert pipe.network.config.guidance_embeds is guidance_embeds
    assert isinstance(pipe.text_encoder, FluxTextEncoder)
    assert pipe.text_encoder.max_sequence_length == length
    assert pipe.process == RectifiedFlow(shift=3.0, resolution=ResolutionShift()), pipe.process
    assert pipe.target == "flow"
    assert pipe.guidance_embedded is guidance_embeds
    assert pipe.autoencoder.config.shift_factor == pytest.approx(0.1159)
    assert pipe.size_multiple == 4  # VAE 2× × the 2×2 packing
    want = {"steps": 20, "guidance": 3.5} if guidance_embeds else {"steps": 4, "guidance": 1.0}
    assert pipe.sampling_defaults == {**want, "sampler": "euler", "grid": "simple"}


def test_sides_must_fill_whole_tokens(flux):
    pipe, _ = flux["schnell"]
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe.generate(PROMPT, steps=1, width=32, height=18)


# -- the network and the text -------------------------------------------------------------------


def test_packing_matches_diffusers():
    z = _noise(0)
    torch.testing.assert_close(pack_latents(z), _packed(z), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(_packed(z), 8, 16), z, rtol=0, atol=0)
    expected = diffusers.FluxPipeline._prepare_latent_image_ids(1, 4, 8, "cpu", torch.float32)
    torch.testing.assert_close(position_ids(0, 4, 8, torch.device("cpu")), expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformer_matches_diffusers(flux, variant):
    pipe, reference = flux[variant]
    g = torch.Generator().manual_seed(3)
    z, context = torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    pooled, t = torch.randn(2, 32, generator=g), torch.tensor([0.83, 0.27])
    guidance = torch.tensor([3.5, 2.0]) if VARIANTS[variant][0] else None
    with torch.no_grad():
        expected = reference.transformer(
            hidden_states=_packed(z),
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=t,
            img_ids=reference._prepare_latent_image_ids(2, 4, 8, "cpu", torch.float32),
            txt_ids=torch.zeros(7, 3),
            guidance=guidance,
            return_dict=False,
        )[0]
        ours = pipe.network(z, t * 1000, context, pooled, guidance)
    assert ours.shape == z.shape
    diff = (pack_latents(ours) - expected).abs().max().item()
    assert diff <= 1e-5, diff
    if guidance is not None:  # the scale is an input: another scale, another velocity
        other = pipe.network(z, t * 1000, context, pooled, guidance + 1)
        assert (other - ours).abs().max() > 1e-3
        with pytest.raises(ValueError, match="needs a guidance scale"):
            pipe.network(z, t * 1000, context, pooled)
    else:
        with pytest.raises(ValueError, match="takes no guidance"):
            pipe.network(z, t * 1000, context, pooled, 3.5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_prompt_matches_diffusers(flux, variant):
    pipe, reference = flux[variant]
    length = VARIANTS[variant][1]
    embeds, pooled, text_ids = reference.encode_prompt(PROMPT, None, max_sequence_length=length)
    ours = pipe.text_encoder.encode(PROMPT)
    assert ours.tokens.shape == (1, length, 32) and ours.pooled.shape == (1, 32)
    assert int(ours.mask.sum()) < length  # padded, and attended to all the same
    # the reloaded T5 differs from the in-memory one by float noise only
    torch.testing.assert_close(ours.tokens, embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-6)
    assert not text_ids.any()  # text tokens all sit at position (0, 0, 0), as ours do


# -- the process and the grid -------------------------------------------------------------------


def test_dynamic_shift_is_diffusers_time_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    base = RectifiedFlow(shift=3.0, resolution=ResolutionShift())
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    for tokens in (32, 256, 1024, 4096, 6000):
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        expected = scheduler.time_shift(mu, 1.0, t)  # flow time t → shifted t'
        process = base.at_resolution(tokens)
        assert process.shift == pytest.approx(math.exp(mu), rel=1e-12)
        # the process's grid maps unshifted u to σ = s·u/(1-u), i.e. t' = σ/(1+σ)
        sigma = process.t_to_sigma(t)
        torch.testing.assert_close(sigma / (1 + sigma), expected, rtol=1e-12, atol=0)
    assert RectifiedFlow(shift=3.0).at_resolution(4096) == RectifiedFlow(shift=3.0)


def test_dynamic_shift_scheduler_configs():
    from destatic.io import CheckpointError
    from destatic.process.schedulers import (
        process_from_scheduler_config,
        scheduler_config_from_process,
    )

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULER}
    process, target = process_from_scheduler_config(config)
    assert process.resolution == ResolutionShift() and target == "flow"
    assert process_from_scheduler_config(scheduler_config_from_process(process, "flow"))[0] == (
        process
    )
    with pytest.raises(CheckpointError, match="base_seq_len < max_seq_len"):
        process_from_scheduler_config({**config, "max_image_seq_len": 100})
    with pytest.raises(CheckpointError, match="time_shift_type"):
        process_from_scheduler_config({**config, "time_shift_type": "linear"})


@pytest.mark.parametrize(("variant", "steps"), [("dev", 20), ("schnell", 4), ("dev", 4)])
def test_default_grid_is_diffusers_flux_grid(flux, variant, steps):
    """The family's ``simple`` grid on the shifted process gives FluxPipeline's σ's:
    linspace(1, 1/N, N) in flow time, time-shifted for the image's token count."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe, reference = flux[variant]
    scheduler = reference.scheduler
    mu = calculate_shift(32, 256, 4096, 0.5, 1.15)  # 32 packed tokens at 32×16 pixels
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    request = GenerationRequest(prompt=PROMPT, steps=steps, **SIZE).resolved(pipe)
    ours = sigma_grid(pipe, request)
    expected = _as_sigma(scheduler.sigmas)
    assert ours[0] == expected[0] == math.inf and ours[-1] == expected[-1] == 0
    torch.testing.assert_close(ours[1:-1], expected[1:-1], rtol=1e-6, atol=0)
    # another size, another shift: the grid follows the image
    wider = GenerationRequest(prompt=PROMPT, steps=steps, width=64, height=64).resolved(pipe)
    wider = sigma_grid(pipe, wider)
    assert (wider[1:-1] > ours[1:-1]).all()


# -- the same image as diffusers' FluxPipeline ----------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_euler_same_image_as_flux_pipeline(flux, variant):
    """Default grid and sampler (euler), 4 steps: FlowMatchEulerDiscreteScheduler's image."""
    pipe, reference = flux[variant]
    guidance_embeds, length = VARIANTS[variant]
    z = _noise(1)
    guidance = 3.5 if guidance_embeds else 1.0  # schnell: one pass, as diffusers does
    expected = reference(
        PROMPT,
        num_inference_steps=4,
        guidance_scale=guidance,
        latents=_packed(z),  # flow state at t = 1 is the unit noise
        max_sequence_length=length,
        output_type="np",
        **SIZE,
    ).images
    calls = []
    hook = pipe.network.register_forward_hook(lambda *args: calls.append(1))
    try:
        image = pipe.generate(PROMPT, steps=4, guidance=guidance, noise=z, **SIZE)
    finally:
        hook.remove()
    assert len(calls) == 4  # one network pass per step, dev included (guidance is an input)
    got = image.permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape == (1, 16, 32, 3)
    diff = np.abs(got - expected).max()
    assert diff <= 1e-5, diff
    assert np.abs(expected - 0.5).max() > 0.05  # not a flat image


class IntegerTimesteps(torch.nn.Module):
    """The network at diffusers' DPMSolverMultistepScheduler timesteps: that scheduler keeps
    its flow timesteps as int64 (⌊1000·t⌋), so FluxPipeline evaluates the transformer at the
    truncated t while the solver steps with the exact σ. Each call's label 1000·t is replaced
    by the scheduler's integer timestep of the nearest grid point."""

    def __init__(self, network: torch.nn.Module, scheduler):
        super().__init__()
        self.network, self.config = network, network.config
        self.takes_pooled, self.latent_patch = network.takes_pooled, network.latent_patch
        self.labels = scheduler.sigmas[:-1].double() * 1000  # the exact 1000·t of each step
        self.timesteps = scheduler.timesteps.double()

    def forward(self, x, timestep, *args, **kwargs):
        i = (self.labels - float(timestep.reshape(-1)[0])).abs().argmin()
        timestep = torch.full_like(timestep, float(self.timesteps[i]))
        return self.network(x, timestep, *args, **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dpmpp_2m_same_image_as_flux_pipeline(flux, variant):
    """Our ``dpmpp_2m`` on the σ's of DPMSolverMultistepScheduler (flow sigmas, dynamic shift):
    its image. That grid starts at t₀ = shift(1 - 1/1000) < 1, where diffusers' latents are
    the flow state x_t; ours is x = x_t/(1 - t₀) there, so our unit noise is z/t₀. diffusers
    runs the network at integer timesteps there (:class:`IntegerTimesteps`)."""
    from diffusers import DPMSolverMultistepScheduler

    pipe, reference = flux[variant]
    guidance_embeds, length = VARIANTS[variant]
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )
    dpm = diffusers.FluxPipeline(**{**reference.components, "scheduler": scheduler})
    dpm.set_progress_bar_config(disable=True)
    z = _noise(2)
    guidance = 3.5 if guidance_embeds else 1.0
    expected = dpm(
        PROMPT,
        num_inference_steps=5,
        guidance_scale=guidance,
        latents=_packed(z),
        max_sequence_length=length,
        output_type="np",
        **SIZE,
    ).images
    sigmas = _as_sigma(scheduler.sigmas)
    assert len(sigmas) == 6 and math.isfinite(sigmas[0]) and sigmas[-1] == 0
    t0 = float(scheduler.sigmas[0])
    network = pipe.network
    pipe.network = IntegerTimesteps(network, scheduler)
    try:
        image = pipe.generate(
            PROMPT, sampler="dpmpp_2m", sigmas=sigmas, guidance=guidance, noise=z / t0, **SIZE
        )
    finally:
        pipe.network = network
    diff = np.abs(image.permute(0, 2, 3, 1).numpy() - expected).max()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(flux, variant, tmp_path):
    from destatic.pipelines import save

    pipe, _ = flux[variant]
    save(pipe, tmp_path / "ours")
    again = destatic.load(tmp_path / "ours")
    assert again.family.name == "flux" and again.process == pipe.process
    assert again.sampling_defaults == pipe.sampling_defaults
    assert again.text_encoder.max_sequence_length == pipe.text_encoder.max_sequence_length
    kwargs = {"steps": 2, "seed": 1, **SIZE}
    torch.testing.assert_close(
        again.generate(PROMPT, **kwargs), pipe.generate(PROMPT, **kwargs), rtol=0, atol=1e-6
    )
