"""The parts of a pipeline — network, autoencoder, text encoder, process and target, family and
stored defaults — and what follows from them: image sizes, the latent shape, the conditioning
the network takes, encoding to and decoding from its space, and the inpainting and ControlNet
wrappers of the network. The generation stages (:mod:`destatic.pipelines.stages`) ask these;
:class:`~destatic.pipelines.Pipeline` adds the loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.autoencoder import AutoencoderKL
from destatic.models.text import TextEncoder
from destatic.pipelines.families import ConditioningContext, Family, default_family
from destatic.pipelines.inputs import Inputs
from destatic.process import Process, Target

__all__ = ["SAMPLING", "PipelineBase"]

#: The sampling fields a model folder or family gives defaults for.
SAMPLING = ("steps", "sampler", "grid", "guidance")
#: Frames an image autoencoder decodes at once for a clip (diffusers' ``decode_chunk_size``).
DECODE_CHUNK = 16


def _to(cond: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Every tensor of a (nested) conditioning dict on ``device``, the floating ones in
    ``dtype`` (integer ones, e.g. a DiT's class ids, keep theirs)."""
    return {
        k: _to(v, device, dtype)
        if isinstance(v, dict)
        else v.to(device, dtype if v.is_floating_point() else v.dtype)
        for k, v in cond.items()
    }


def _images_from_latents(autoencoder: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The autoencoder's decode; the clips ``(B, C, F, h, w)`` of an image autoencoder
    (AnimateDiff's SD VAE) as B·F images, :data:`DECODE_CHUNK` at a time, back to
    ``(B, 3, F, H, W)``. A video autoencoder (Wan's) decodes clips itself."""
    if latents.ndim != 5 or not isinstance(autoencoder, AutoencoderKL):
        return autoencoder.images_from_latents(latents)
    b, c, f, h, w = latents.shape
    frames = latents.transpose(1, 2).reshape(b * f, c, h, w)
    images = torch.cat([autoencoder.images_from_latents(x) for x in frames.split(DECODE_CHUNK)])
    return images.reshape(b, f, *images.shape[1:]).transpose(1, 2)


@dataclass
class PipelineBase:
    """The parts of a pipeline and what they imply (sizes, latent shape, conditioning, the
    autoencoder's encode/decode); :class:`~destatic.pipelines.Pipeline` adds generation."""

    network: nn.Module  # UNet2DCondition or MMDiT
    autoencoder: AutoencoderKL | None  # None: the network works on pixels in [-1, 1]
    text_encoder: TextEncoder
    process: Process
    target: str | Target  # "epsilon", "v_prediction", "flow", or a Target (EDM's σ_data)
    # generation defaults stored with the model (a distilled model's "sampler", "steps",
    # "guidance", "grid"; "guidance_range": the folded-in scales it was trained on)
    defaults: dict = field(default_factory=dict)
    family: Family | None = None  # None: guessed from the text encoder
    # components a family needs beyond these (Stable Audio's "projection_model", a vocoder)
    extras: dict[str, nn.Module] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = default_family(self.text_encoder, self.network)

    # -- what the model is -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The network's precision (its inputs and conditioning are cast to it)."""
        return next(self.network.parameters()).dtype

    @property
    def state_dtype(self) -> torch.dtype:
        """The precision of the sampler's state and arithmetic: fp32 when the network runs in
        half precision (bf16/fp16 round only the network's own computation, as ComfyUI does;
        a bf16 state would lose 8 bits at every step's update), else the network's dtype."""
        return torch.float32 if self.dtype.itemsize < 4 else self.dtype

    @property
    def latent_channels(self) -> int:
        channels = getattr(getattr(self.autoencoder, "config", None), "latent_channels", None)
        return int(self.network.config.out_channels if channels is None else channels)

    @property
    def media(self) -> str:
        """What the model draws: ``"image"``, ``"video"`` or ``"audio"`` (its family's)."""
        return self.family.media

    @property
    def sample_rate(self) -> int:
        """An audio model's samples per second (one line for other models)."""
        if self.media != "audio":
            raise ValueError(f"this model draws {self.media}s; only audio has a sample rate")
        return self.family.sample_rate(self)

    @property
    def max_seconds(self) -> float:
        """The longest audio a fixed-length model makes: the network's ``sample_size`` latent
        frames of its autoencoder's ``hop_length`` samples each; for a model that makes any
        length (AudioLDM), its default length."""
        hop = getattr(self.autoencoder, "hop_length", None)
        if hop is None:
            return self.audio_span(0.0, None)[1]
        return int(self.network.config.sample_size) * int(hop) / self.sample_rate

    def audio_span(self, start: float, seconds: float | None) -> tuple[float, float]:
        """The span ``(start, end)`` in seconds a request asks of an audio model, checked
        (:attr:`Family.audio_span`)."""
        return self.family.audio_span(
            self, float(start), None if seconds is None else float(seconds)
        )

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel along a side (1 for a pixel-space model)."""
        blocks = getattr(getattr(self.autoencoder, "config", None), "block_out_channels", None)
        return 1 if blocks is None else 2 ** (len(blocks) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor (× the patch size of a DiT, or
        the token packing of Flux: ``network.latent_patch``)."""
        patch = getattr(self.network, "latent_patch", None)
        return self.latent_factor * int(patch or getattr(self.network.config, "patch_size", 1))

    @property
    def default_size(self) -> int:
        return int(self.network.config.sample_size) * self.latent_factor

    @property
    def default_grid(self) -> str:
        """``karras`` for processes with a finite σ_max; ``sgm_uniform`` (uniform in the
        process's own time from t = 1 down to 0) for those that start at σ = ∞.

        Not ``normal``, diffusers' FlowMatch spacing, whose last nonzero point is the smallest
        trained σ: its final step (σ_min → 0) barely moves, and the step before it spans most of
        log σ, where multistep solvers over-extrapolate (DPM++ 2M at 4 steps collapses on the
        bundled model; BENCHMARKS.md, "Sampling grids for flow models")."""
        return "karras" if math.isfinite(self.process.sigma_max) else "sgm_uniform"

    @property
    def inpainting_model(self) -> bool:
        """Whether the network also reads a mask and the masked image's latents (in_channels =
        2·latent + 1, as SD's inpainting models)."""
        return int(self.network.config.in_channels) == 2 * self.latent_channels + 1

    @property
    def guidance_embedded(self) -> bool:
        """Whether classifier-free guidance is folded into the network (a distilled student
        that takes the scale w as an input): ``guidance`` is then passed to the network, one
        call per step, and never applied again on top."""
        config = self.network.config  # LCM students: time_cond_proj_dim; Flux dev: guidance_embeds
        return getattr(config, "time_cond_proj_dim", None) is not None or bool(
            getattr(config, "guidance_embeds", False)
        )

    # -- what the stages ask of it ---------------------------------------------------------------
    def conditioning(
        self,
        prompts: list[str],
        *,
        width: int | None = None,
        height: int | None = None,
        negative: bool = False,
        seconds: tuple[float, float] | None = None,
    ) -> dict:
        """The denoiser's keyword inputs for ``prompts`` (the ``negative`` branch of guidance or
        not) at an image size (default :attr:`default_size`) or, for audio, a span of
        ``seconds`` (start, end), as the family builds them."""
        embedding = self.text_encoder.encode(prompts)
        size = self.default_size if self.media != "audio" else 0
        context = ConditioningContext(
            tuple(prompts),
            width or size,
            height or size,
            negative,
            self.text_encoder,
            seconds,
            self.extras,
        )
        cond = self.family.conditioning(self.network, embedding, context)
        return _to(cond, self.device, self.dtype)

    def latent_shape(
        self,
        batch: int,
        width: int,
        height: int,
        frames: int | None = None,
        seconds: tuple[float, float] | None = None,
    ) -> tuple[int, ...]:
        """The shape of the latents of ``batch`` samples of this size (and frames, for video:
        the network's ``num_frames`` unless ``frames`` is given; for audio, of the span
        ``seconds``: :attr:`Family.audio_shape`)."""
        if self.media == "audio":
            return self.family.audio_shape(self, batch, seconds or self.audio_span(0.0, None))
        if frames is None and self.family.media == "video":
            frames = int(self.network.config.num_frames)
        return self.family.latent_shape(
            batch, self.latent_channels, width, height, self.latent_factor, frames
        )

    @property
    def sampling_defaults(self) -> dict:
        """What fills a request's unset ``steps``, ``sampler``, ``grid`` and ``guidance``: the
        folder's stored defaults (``destatic_defaults``) over its family's; the grid last falls
        back to the process's (:attr:`default_grid`)."""
        chosen = {"grid": self.default_grid, **self.family.defaults}
        chosen.update(
            {k: v for k, v in self.defaults.items() if k in SAMPLING and v not in (None, "")}
        )
        return {k: chosen[k] for k in SAMPLING}

    def check_size(self, width: int, height: int) -> None:
        if self.media == "audio":
            return
        m = self.size_multiple
        for name, side in (("width", width), ("height", height)):
            if side < m or side % m:
                raise ValueError(f"{name}={side} must be a positive multiple of {m} for this model")

    def inpainting_inputs(
        self,
        image: torch.Tensor | None,
        mask: torch.Tensor | None,
        batch: int,
        size: tuple[int, int],
    ) -> torch.Tensor:
        """[mask, masked-image latents] at latent size, as SD's inpainting pipeline builds them:
        the mask (1 = repaint) resized to the latents (nearest), and the encoded image with the
        masked pixels set to grey. Without a mask everything is repainted (text → image)."""
        side = self.latent_factor
        if image is None:
            image = torch.full((batch, 3, *size), 0.5)
        if mask is None:
            mask = torch.ones(batch, 1, *image.shape[-2:])
        mask = (mask >= 0.5).float()
        masked = image * (1 - mask) + 0.5 * mask  # grey where masked ([-1, 1]: 0)
        latent_mask = F.interpolate(mask, size=(image.shape[-2] // side, image.shape[-1] // side))
        return torch.cat([latent_mask, self.encode(masked)], dim=1).to(self.device, self.dtype)

    def controlled(
        self,
        inputs: Inputs,
        sigmas: torch.Tensor,
        scale: float,
        start: float,
        end: float,
        guidance: float | None = None,
    ):
        """The network steered by ``inputs.controlnet`` at ``scale`` on the steps from ``start``
        to ``end`` (fractions of the grid: step i runs when start ≤ i/N and (i+1)/N ≤ end,
        diffusers' rule). ``guidance``: the scale a Flux ControlNet that embeds one takes when
        the Flux does not (:meth:`flux_controlled`)."""
        from destatic.models.controlnet import ControlledUNet
        from destatic.models.flux import FluxConfig
        from destatic.models.flux_controlnet import FluxControlNet

        window = self.control_window(sigmas, start, end)
        if isinstance(inputs.controlnet, FluxControlNet) or isinstance(
            self.network.config, FluxConfig
        ):
            return self.flux_controlled(inputs, scale, window, guidance)
        factor = inputs.controlnet.config.downsample_factor
        if factor != self.latent_factor:
            raise ValueError(
                f"this ControlNet embeds control images {factor}× down but the model's latents "
                f"are {self.latent_factor}× smaller than the image"
            )
        kinds = (inputs.controlnet.config, self.network.config)
        if len({getattr(c, "addition_embed_type", None) for c in kinds}) != 1:
            sdxl = "an SDXL" if kinds[0].addition_embed_type else "an SD 1.x/2.x"
            raise ValueError(f"this ControlNet was made for {sdxl} U-Net; use one for this model")
        net = inputs.controlnet.to(self.device, self.dtype)
        return ControlledUNet(self.network, [(net, inputs.control, scale, window)])

    def control_window(self, sigmas: torch.Tensor, start: float, end: float):
        """``active(timestep) -> bool``: whether a ControlNet acts at the network's time label,
        on the steps i of the grid with start ≤ i/N and (i+1)/N ≤ end (diffusers' rule); None
        when that is every step."""
        if not 0 <= start < end <= 1:
            raise ValueError(f"need 0 ≤ control_start < control_end ≤ 1, got {start}, {end}")
        n = len(sigmas) - 1
        on = [i for i in range(n) if start <= i / n and (i + 1) / n <= end]
        if not on:
            raise ValueError(f"control_start={start}, control_end={end} leave no step of {n}")
        # in the network's time label (increasing with σ) the window is (t(σ_last+1), t(σ_first)]
        grid = torch.as_tensor(sigmas, dtype=torch.float64)
        label = self.process.noise_label
        hi = float(label(grid[on[0]].view(1)))
        lo = float(label(grid[on[-1] + 1].view(1))) if on[-1] + 1 < n else -math.inf
        tol = 1e-3 * max(1.0, abs(hi))  # the label reaches the network in its dtype (fp16)

        def active(timestep) -> bool:
            t = float(torch.as_tensor(timestep).reshape(-1)[0])
            return lo + tol < t <= hi + tol

        return None if (on[0] == 0 and on[-1] == n - 1) else active

    def flux_controlled(self, inputs: Inputs, scale: float, window, guidance: float | None):
        """A Flux steered by a Flux ControlNet, as diffusers' ``FluxControlNetPipeline``: the
        control image encoded like the latents (VAE, then shift and scale; the posterior mean
        where diffusers draws a sample), passed with the noisy latents (both 2×2-packed inside
        the networks), ``scale`` and, for a ControlNet that embeds one, the guidance scale."""
        from destatic.models.flux import FluxConfig
        from destatic.models.flux_controlnet import ControlledFlux, FluxControlNet

        net = inputs.controlnet
        if not isinstance(net, FluxControlNet) or not isinstance(self.network.config, FluxConfig):
            which = "a Flux" if isinstance(net, FluxControlNet) else "an SD/SDXL"
            raise ValueError(f"this is {which} ControlNet; use one made for this model")
        if net.config.num_mode is not None:
            raise ValueError(
                "this is a union Flux ControlNet, which needs a control mode; generation "
                "requests do not carry one yet: use a single-mode Flux ControlNet"
            )
        cfg, own = net.config, self.network.config
        if (cfg.in_channels, cfg.hidden_size) != (own.in_channels, own.hidden_size):
            raise ValueError(
                f"this Flux ControlNet (in_channels={cfg.in_channels}, hidden size "
                f"{cfg.hidden_size}) does not fit the transformer (in_channels={own.in_channels}, "
                f"hidden size {own.hidden_size}); use one made for this model"
            )
        if self.autoencoder is None:
            raise ValueError("a Flux ControlNet needs the model's VAE to encode the control image")
        latents = self.encode(inputs.control)  # (B, C, H/f, W/f), shifted and scaled
        net = net.to(self.device, self.dtype)
        w = float(guidance) if guidance is not None else 1.0
        return ControlledFlux(self.network, [(net, latents, scale, window)], w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space samples → images in [0, 1] (float32); clips ``(B, C, F, H, W)``
        frame by frame through an image autoencoder; for audio, waveforms ``(B, channels,
        samples)`` in [-1, 1] (:attr:`Family.decode_audio`)."""
        weights = next(self.autoencoder.parameters(), None) if self.autoencoder else None
        if weights is not None:  # the state is fp32 when the autoencoder is half
            latents = latents.to(weights.dtype)
        if self.media == "audio":
            return self.family.decode_audio(self, latents).float()
        if self.autoencoder is not None:
            latents = _images_from_latents(self.autoencoder, latents)
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] → the model's clean state x0 (the autoencoder's
        posterior mean, scaled; or the pixels in [-1, 1] for a pixel-space model)."""
        x = images.to(self.device, torch.float32) * 2 - 1
        if self.autoencoder is not None:
            ae_dtype = next(self.autoencoder.parameters()).dtype
            x = self.autoencoder.latents_from_images(x.to(ae_dtype), sample=False)
        return x.to(self.state_dtype)
