"""Generation as stages; :meth:`Pipeline.run` is this list, in order:

0. :func:`prepare_inputs` — input image, mask and control image as tensors of the right size;
1. :func:`encode_conditioning` — prompts → the denoiser's keyword inputs (cond and uncond);
2. :func:`sigma_grid` — the σ grid of the request's sampler steps (its tail for image → image);
3. :func:`initial_state` — seeded noise (with variations) at σ_0, plus the encoded input image;
4. :func:`wrap_denoiser` — the network as a σ-space denoiser, then inpainting inputs, control,
   classifier-free guidance and the known region wrapped around it;
5. :func:`destatic.sampling.sample` with the request's sampler;
6. ``Pipeline.decode`` — latents → media in [0, 1].

Each stage is a plain function of the pipeline, the resolved request and what the stages
before it returned, so a new family or medium changes a stage's inputs, not the loop.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.pipelines.inputs import Inputs, as_image_batch, canny_map, open_image, per_image
from destatic.process import Denoiser
from destatic.sampling import (
    ClassifierFreeGuidance,
    KnownRegion,
    generators,
    make_sigmas,
    randn,
    slerp,
)

if TYPE_CHECKING:
    from destatic.pipelines.base import PipelineBase as Pipeline
    from destatic.pipelines.request import GenerationRequest

__all__ = [
    "Conditioning",
    "State",
    "audio_span",
    "encode_conditioning",
    "initial_state",
    "prepare_inputs",
    "sigma_grid",
    "strength_sigmas",
    "wrap_denoiser",
]


def _read(value: Any, mode: str) -> Any:
    return open_image(value, mode) if isinstance(value, (str, os.PathLike)) else value


def _controlnet(value: Any) -> nn.Module:
    if isinstance(value, (str, os.PathLike)):
        from destatic.models.registry import load_component

        return load_component(value)
    return value


def prepare_inputs(r: GenerationRequest, default_size: int, batch: int) -> Inputs:
    """Stage 0: read and check the inputs of ``r`` (a resolved request) for ``batch`` images;
    the input image's size, else the request's, else ``default_size`` sets the size."""
    if r.image is None and (r.mask is not None or r.strength != 1.0):
        raise ValueError("strength and mask need an input image (image=)")
    out = Inputs(
        default_size if r.width is None else r.width,
        default_size if r.height is None else r.height,
    )
    if r.image is not None:
        image = as_image_batch(_read(r.image, "RGB"), "image", channels=3)
        out.image = per_image(image, batch, "image")
        out.height, out.width = out.image.shape[-2:]
    if r.mask is not None:
        mask = per_image(as_image_batch(_read(r.mask, "L"), "mask", channels=1), batch, "mask")
        if mask.shape[-2:] != (out.height, out.width):
            raise ValueError(
                f"the mask is {mask.shape[-1]}×{mask.shape[-2]} but the image is "
                f"{out.width}×{out.height}"
            )
        out.mask = mask
    if (r.controlnet is None) != (r.control_image is None):
        raise ValueError("structural control needs both controlnet= and control_image=")
    if r.controlnet is not None:
        out.controlnet = _controlnet(r.controlnet)
        control = _read(r.control_image, "RGB")
        if r.control_canny:
            control = canny_map(control)
        # a Flux ControlNet reads the control image's VAE latents: an RGB image
        channels = getattr(out.controlnet.config, "conditioning_channels", 3)
        control = as_image_batch(control, "control_image", channels=channels)
        if tuple(control.shape[-2:]) != (out.height, out.width):
            raise ValueError(
                f"the control image is {control.shape[-1]}×{control.shape[-2]} but the image "
                f"is {out.width}×{out.height}"
            )
        out.control = per_image(control, batch, "control image")
    return out


@dataclass
class Conditioning:
    """The two branches of classifier-free guidance and its scale (1: no unconditional call)."""

    cond: dict[str, Any]
    uncond: dict[str, Any] | None
    guidance: float


def encode_conditioning(
    pipe: Pipeline, r: GenerationRequest, inputs: Inputs | None = None
) -> Conditioning:
    """Prompts and negative prompts → the denoiser's keyword inputs, as the family builds them
    (at the size of ``inputs``, else the request's: SDXL conditions on it).

    A guidance-distilled network (:attr:`Pipeline.guidance_embedded`) takes the scale w as an
    input: one call per step, no unconditional branch, no negative prompt. A network that reads
    the input image itself (:attr:`Family.image_conditioning`, Wan image→video) gets those
    inputs in both branches."""
    prompts = r.prompts
    negatives = r.negatives  # checks their count
    size = {"width": r.width, "height": r.height}
    if inputs is not None:
        size = {"width": inputs.width, "height": inputs.height}
    if pipe.media == "audio":
        size = {"seconds": audio_span(pipe, r)}
    reads_image = pipe.family.image_conditioning
    image = reads_image(pipe, r, inputs) if reads_image is not None else {}
    cond = {**pipe.conditioning(prompts, **size), **image}
    guidance = float(r.guidance)
    if pipe.guidance_embedded:
        if r.has_negative:
            raise ValueError(
                "this model has classifier-free guidance folded in (a distilled student): "
                "it takes no negative prompt"
            )
        low, high = pipe.defaults.get("guidance_range", (guidance, guidance))
        if not low - 1e-6 <= guidance <= high + 1e-6:
            warnings.warn(
                f"guidance={guidance:g}: this distilled model learned guidance scales "
                f"{low:g} … {high:g} only; outside them it extrapolates",
                stacklevel=3,
            )
        cond["guidance"] = torch.full((len(prompts),), guidance, device=pipe.device)
        return Conditioning(cond, None, 1.0)  # folded in: one call is the guided model
    uncond = None
    if guidance != 1:
        uncond = {**pipe.conditioning(negatives, negative=True, **size), **image}
    return Conditioning(cond, uncond, guidance)


def audio_span(pipe: Pipeline, r: GenerationRequest) -> tuple[float, float] | None:
    """The span (start, end) in seconds an audio request asks for (None for other media)."""
    return pipe.audio_span(r.seconds_start, r.seconds) if pipe.media == "audio" else None


def strength_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a grid that image → image runs: its last ``int(steps·strength)`` steps
    (diffusers' img2img rule), so strength 1 is the whole grid."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    steps = len(sigmas) - 1
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps runs no step; raise steps or strength"
        )
    return sigmas[steps - run :]


def sigma_grid(
    pipe: Pipeline,
    r: GenerationRequest,
    sigmas: torch.Tensor | None = None,
    inputs: Inputs | None = None,
) -> torch.Tensor:
    """The request's grid (or the given ``sigmas``), cut to its tail when an input image is
    noised only part of the way (SDEdit strength). The grid follows the process the family
    picks for the image size of ``inputs`` (else the request's; Flux shifts with it).

    The ``lcm`` sampler on the ``lcm`` grid cuts by strength as diffusers'
    ``LatentConsistencyModelImg2ImgPipeline`` does (``LCMScheduler.set_timesteps(strength=)``):
    all ``steps`` steps, picked from the first ⌊50·strength⌋ timesteps of the distillation
    schedule (:func:`destatic.sampling.grids`' ``lcm``), rather than the tail of the full grid."""
    if sigmas is None:
        size = pipe.default_size
        width, height = (inputs.width, inputs.height) if inputs else (r.width, r.height)
        shape = pipe.latent_shape(
            1, width or size, height or size, r.num_frames, audio_span(pipe, r)
        )
        process = pipe.family.process_for(pipe.process, shape)
        if r.image is not None and (r.sampler, r.grid) == ("lcm", "lcm"):
            return make_sigmas("lcm", r.steps, process=process, strength=r.strength)
        sigmas = make_sigmas(r.grid, r.steps, process=process)
    return strength_sigmas(sigmas, r.strength) if r.image is not None else sigmas


@dataclass
class State:
    """The sampler's start: x at σ_0, the per-image generators (the sampler's noise comes from
    them too), and the encoded input image (None for text → image)."""

    x: torch.Tensor
    generators: list[torch.Generator]
    known: torch.Tensor | None


def initial_state(
    pipe: Pipeline,
    r: GenerationRequest,
    inputs: Inputs,
    sigmas: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> State:
    """Seeded unit noise (or ``noise``), slerped toward the variation seeds' noise (A1111's
    variations), scaled to σ_0; image → image adds the encoded image, except inpainting at full
    strength, which starts from pure noise (as diffusers' img2img and inpaint pipelines do)."""
    batch = len(r.prompts)
    shape = pipe.latent_shape(batch, inputs.width, inputs.height, r.num_frames, audio_span(pipe, r))
    gens = generators(r.seeds)
    if noise is None:
        noise = randn(shape, gens, device=pipe.device, dtype=pipe.state_dtype)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
    if r.variation_strength:
        if r.variation_seed is None:
            raise ValueError("variation_strength needs a variation_seed")
        seeds = generators(r.variation_seeds)
        other = randn(shape, seeds, device=pipe.device, dtype=pipe.state_dtype)
        noise = slerp(noise.to(pipe.device, pipe.state_dtype), other, r.variation_strength)
    noise = noise.to(pipe.device, pipe.state_dtype)
    held = inputs.image is not None and pipe.family.image_conditioning is None
    known = pipe.encode(inputs.image) if held else None  # else the network reads the image
    if known is not None and len(shape) == 5:  # image → video: the image in every frame
        known = known.unsqueeze(2).expand(shape)
    start = float(sigmas[0])
    x = noise if math.isinf(start) else noise * start
    fresh = (inputs.mask is not None or len(shape) == 5) and r.strength == 1
    if known is not None and not math.isinf(start) and not fresh:
        x = x + known
    return State(x, gens, known)


def wrap_denoiser(
    pipe: Pipeline,
    r: GenerationRequest,
    inputs: Inputs,
    conditioning: Conditioning,
    sigmas: torch.Tensor,
    known: torch.Tensor | None,
):
    """The network as a guided σ-space denoiser ``D(x, σ)``: an inpainting network gets its
    mask and masked-image inputs, a ControlNet steers it, classifier-free guidance combines the
    two branches, and with a mask the kept region is held to the input image."""
    network: nn.Module = pipe.network
    batch = len(r.prompts)
    if pipe.inpainting_model:
        if inputs.controlnet is not None:
            raise ValueError("ControlNets steer plain models, not inpainting models")
        extra = pipe.inpainting_inputs(inputs.image, inputs.mask, batch, inputs.size)
        network = InpaintingInputs(network, extra)
    if inputs.controlnet is not None:
        network = pipe.controlled(
            inputs, sigmas, r.control_scale, r.control_start, r.control_end, float(r.guidance)
        )
    denoiser = Denoiser(network, pipe.process, pipe.target, dtype=pipe.dtype)
    c = conditioning
    interval = r.guidance_interval or (0.0, math.inf)
    guided = ClassifierFreeGuidance(
        denoiser, c.cond, c.uncond, c.guidance, rescale=r.guidance_rescale, interval=interval
    )
    if known is not None and known.ndim == 5:
        return KnownRegion(guided, known, first_frame_mask(known))
    if inputs.mask is not None and (r.keep_unmasked or not pipe.inpainting_model):
        assert known is not None
        m = inputs.mask.to(pipe.device, pipe.state_dtype)
        factor = pipe.latent_factor
        # a latent pixel is repainted if any of its pixels is (max-pool to latent size)
        m = F.max_pool2d(m, factor) if factor > 1 else m
        guided = KnownRegion(guided, known, m)
    return guided


def first_frame_mask(clip: torch.Tensor) -> torch.Tensor:
    """Image → video by frame replacement: a mask ``(1, 1, F, 1, 1)`` that keeps frame 0 (0)
    and draws the others (1). Held by :class:`~destatic.sampling.KnownRegion`, the first frame
    is the given image at every step and the model's attention over time carries it into the
    frames it draws (the replacement method of Ho et al. 2022, "Video Diffusion Models")."""
    mask = torch.ones(1, 1, clip.shape[2], 1, 1, device=clip.device, dtype=clip.dtype)
    mask[:, :, 0] = 0
    return mask


class InpaintingInputs(nn.Module):
    """An inpainting network with its extra inputs bound: ``(x, t, context)`` → the network on
    ``[x, mask, masked-image latents]`` along channels (repeated over a guidance batch)."""

    def __init__(self, network: nn.Module, extra: torch.Tensor):
        super().__init__()
        self.network = network
        self.config = network.config
        self.extra = extra

    def forward(self, x: torch.Tensor, timestep, *args, **kwargs) -> torch.Tensor:
        reps = x.shape[0] // self.extra.shape[0]
        extra = self.extra.to(x.dtype).repeat(reps, 1, 1, 1)
        return self.network(torch.cat([x, extra], dim=1), timestep, *args, **kwargs)
