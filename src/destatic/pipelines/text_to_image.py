"""Text → image: prompt → text encoder → guided σ-space sampling → autoencoder decode.

The one place that knows every layer (DESIGN.md): it wraps the network as a
:class:`~destatic.process.Denoiser` for its process and target, binds the prompt embeddings
through :class:`~destatic.sampling.ClassifierFreeGuidance`, samples latents with any registered
sampler and grid from per-sample seeded noise, and decodes them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.autoencoder import AutoencoderKL
from destatic.models.mmdit import MMDiT
from destatic.models.text import TextEmbedding, TextEncoder
from destatic.process import Denoiser, Process, Target
from destatic.sampling import (
    ClassifierFreeGuidance,
    KnownRegion,
    StepInfo,
    generators,
    make_sigmas,
    randn,
    sample,
    sampler_info,
    slerp,
)

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["Pipeline", "as_image_batch", "strength_sigmas"]


ImageInput = Union[torch.Tensor, np.ndarray, "PIL.Image.Image", Sequence["PIL.Image.Image"]]


def as_image_batch(image: ImageInput, name: str, channels: int) -> torch.Tensor:
    """A PIL image (or list of them), a uint8 / float array [H, W, C] or [B, H, W, C], or a
    float tensor [B, C, H, W] / [C, H, W] in [0, 1] → float32 [B, channels, H, W] in [0, 1].
    A mask (``channels=1``) may come as an RGB or "L" image; its channels are averaged."""
    if isinstance(image, torch.Tensor):
        x = image.float()
        if x.ndim == 3:
            x = x[None]
    else:
        arrays = image if isinstance(image, (list, tuple)) else [image]
        if arrays and not isinstance(arrays[0], np.ndarray):
            mode = "L" if channels == 1 else "RGB"
            arrays = [np.asarray(a.convert(mode)) for a in arrays]
        a = np.stack([np.asarray(a) for a in arrays]) if len(arrays) > 1 else np.asarray(arrays[0])
        if a.ndim == 2 or (a.ndim == 3 and len(arrays) > 1 and arrays[0].ndim == 2):
            a = a[..., None]
        if a.ndim == 3:
            a = a[None]
        scale = 255.0 if a.dtype == np.uint8 else 1.0
        x = torch.from_numpy(np.array(a)).float().permute(0, 3, 1, 2) / scale
    if x.ndim != 4:
        raise ValueError(f"{name} must be [B, C, H, W] or one image, got {tuple(x.shape)}")
    if channels == 1 and x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels, expected {channels}")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"{name} values must lie in [0, 1] (uint8 arrays are scaled by 1/255)")
    return x


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


def _per_prompt(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """One entry per generated image: a single entry is repeated, else counts must match."""
    if len(x) == batch:
        return x
    if len(x) == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"got {len(x)} {name}s for {batch} images; give one or one per image")


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


def _as_list(prompt: str | Sequence[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


@dataclass
class Pipeline:
    """A latent (or pixel-space) text-to-image model: any network × any process/target × any
    sampler."""

    network: nn.Module  # UNet2DCondition or MMDiT
    autoencoder: AutoencoderKL | None  # None: the network works on pixels in [-1, 1]
    text_encoder: TextEncoder
    process: Process
    target: str | Target  # "epsilon", "v_prediction", "flow", or a Target (EDM's σ_data)
    # generation defaults stored with the model (a distilled model's "sampler", "steps",
    # "guidance", "grid"; "guidance_range": the folded-in scales it was trained on)
    defaults: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        if self.autoencoder is None:
            return int(self.network.config.out_channels)
        return self.autoencoder.config.latent_channels

    @property
    def inpainting_model(self) -> bool:
        """Whether the network also reads a mask and the masked image's latents (in_channels =
        2·latent + 1, as SD's inpainting models)."""
        return int(self.network.config.in_channels) == 2 * self.latent_channels + 1

    def _inpainting_inputs(
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
        extra = torch.cat([latent_mask.to(self.device, self.dtype), self.encode(masked)], dim=1)
        return extra

    @property
    def guidance_embedded(self) -> bool:
        """Whether classifier-free guidance is folded into the network (a distilled student
        that takes the scale w as an input): ``guidance`` is then passed to the network, one
        call per step, and never applied again on top."""
        return getattr(self.network.config, "time_cond_proj_dim", None) is not None

    def settings(
        self,
        steps: int | None = None,
        sampler: str | None = None,
        grid: str | None = None,
        guidance: float | None = None,
    ) -> dict:
        """The generation settings a call uses: the given ones, else the model's stored
        :attr:`defaults`, else 20 ``dpmpp_2m`` steps on the model's default grid, guidance 5."""
        d = self.defaults
        return {
            "steps": int(steps if steps is not None else d.get("steps", 20)),
            "sampler": sampler or d.get("sampler", "dpmpp_2m"),
            "grid": grid or d.get("grid") or self.default_grid,
            "guidance": float(guidance if guidance is not None else d.get("guidance", 5.0)),
        }

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel along a side (1 for a pixel-space model)."""
        if self.autoencoder is None:
            return 1
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor (× the patch size of a DiT)."""
        patch = self.network.config.patch_size if isinstance(self.network, MMDiT) else 1
        return self.latent_factor * patch

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

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space samples → images in [0, 1] (float32)."""
        if self.autoencoder is not None:
            latents = self.autoencoder.images_from_latents(latents)
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] → the model's clean state x0 (the autoencoder's
        posterior mean, scaled; or the pixels in [-1, 1] for a pixel-space model)."""
        x = images.to(self.device, torch.float32) * 2 - 1
        if self.autoencoder is not None:
            ae_dtype = next(self.autoencoder.parameters()).dtype
            x = self.autoencoder.latents_from_images(x.to(ae_dtype), sample=False)
        return x.to(self.dtype)

    def _controlled(self, controlnet, image, scale, start, end, sigmas, size, batch):
        """The network steered by ``controlnet`` on the steps from ``start`` to ``end``."""
        from destatic.models.controlnet import ControlledUNet

        if controlnet is None or image is None:
            raise ValueError("structural control needs both controlnet= and control_image=")
        if not 0 <= start < end <= 1:
            raise ValueError(f"need 0 ≤ control_start < control_end ≤ 1, got {start}, {end}")
        cfg = controlnet.config
        if cfg.downsample_factor != self.latent_factor:
            raise ValueError(
                f"this ControlNet embeds control images {cfg.downsample_factor}× down but the "
                f"model's latents are {self.latent_factor}× smaller than the image"
            )
        control = as_image_batch(image, "control_image", channels=cfg.conditioning_channels)
        if tuple(control.shape[-2:]) != tuple(size):
            raise ValueError(
                f"the control image is {control.shape[-1]}×{control.shape[-2]} but the image "
                f"is {size[1]}×{size[0]}"
            )
        control = _per_prompt(control, batch, "control image")
        # step i (σ_i → σ_i+1) is on when start ≤ i/N and (i+1)/N ≤ end (diffusers' rule); in
        # the network's time label (increasing with σ) the window is (t(σ_last+1), t(σ_first)]
        n = len(sigmas) - 1
        on = [i for i in range(n) if start <= i / n and (i + 1) / n <= end]
        if not on:
            raise ValueError(f"control_start={start}, control_end={end} leave no step of {n}")
        grid = torch.as_tensor(sigmas, dtype=torch.float64)
        label = self.process.noise_label
        hi = float(label(grid[on[0]].view(1)))
        lo = float(label(grid[on[-1] + 1].view(1))) if on[-1] + 1 < n else -math.inf

        tol = 1e-3 * max(1.0, abs(hi))  # the label reaches the network in its dtype (fp16)

        def active(timestep) -> bool:
            t = float(torch.as_tensor(timestep).reshape(-1)[0])
            return lo + tol < t <= hi + tol

        window = None if (on[0] == 0 and on[-1] == n - 1) else active
        return ControlledUNet(self.network, [(controlnet.to(self.device), control, scale, window)])

    def _conditioning(self, embedding: TextEmbedding) -> dict[str, torch.Tensor]:
        tokens = embedding.tokens.to(self.device, self.dtype)
        if isinstance(self.network, MMDiT):
            return {"context": tokens, "pooled": embedding.pooled.to(self.device, self.dtype)}
        return {"context": tokens}

    def _check_size(self, width: int, height: int) -> None:
        m = self.size_multiple
        for name, side in (("width", width), ("height", height)):
            if side < m or side % m:
                raise ValueError(f"{name}={side} must be a positive multiple of {m} for this model")

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        grid: str | None = None,
        guidance: float | None = None,
        seed: int | Sequence[int] = 0,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        noise: torch.Tensor | None = None,
        sigmas: torch.Tensor | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        image: ImageInput | None = None,
        strength: float = 1.0,
        mask: ImageInput | None = None,
        progress: bool = False,
        preview: Callable[[int, torch.Tensor], None] | None = None,
        variation_seed: int | Sequence[int] | None = None,
        variation_strength: float = 0.0,
        controlnet: nn.Module | None = None,
        control_image: ImageInput | None = None,
        control_scale: float = 1.0,
        control_start: float = 0.0,
        control_end: float = 1.0,
        keep_unmasked: bool = False,
        **sampler_options,
    ) -> torch.Tensor:
        """Images as a float tensor [B, C, H, W] in [0, 1]. ``seed`` is the first of
        consecutive per-image seeds (or one seed per image); ``noise`` replaces the seeded
        initial noise (unit variance, latent shape); ``sigmas`` replaces ``grid``/``steps``.

        With ``image`` (one, or one per prompt; in [0, 1]; its size sets width/height):
        image → image (SDEdit, Meng et al. 2022): the last ``int(steps·strength)`` steps of the
        grid run from ``x0 + σ·noise``, where x0 encodes the image. With ``mask`` too (1 =
        repaint, 0 = keep; the image's size): inpainting with the kept region held by
        :class:`~destatic.sampling.KnownRegion` (any model, any sampler; strength 1 repaints
        the masked region from pure noise). An inpainting model (:attr:`inpainting_model`) reads
        the mask and the masked image itself and, as diffusers' ``StableDiffusionInpaintPipeline``,
        is free to retouch the kept region; ``keep_unmasked=True`` holds it as for any model
        (plain models always hold it: they cannot read the mask).

        Variations (A1111's "variation seed"): the initial noise is
        ``slerp(noise(seed), noise(variation_seed), variation_strength)``, so small strengths
        give close variations of the image ``seed`` draws.

        With ``controlnet`` and ``control_image`` (one, or one per image; the image's size):
        structural control. Its residuals are scaled by ``control_scale`` and act on the steps
        from ``control_start`` to ``control_end`` (fractions of the grid, as diffusers'
        ``control_guidance_start/end``).

        ``progress`` shows a tqdm bar over the steps; ``preview(i, images)`` receives the
        decoded estimate x̂0 after step i (images in [0, 1]), as ComfyUI's previews do.

        ``steps``, ``sampler``, ``grid`` and ``guidance`` left unset take the model's defaults
        (:meth:`settings`). For a guidance-distilled model (:attr:`guidance_embedded`) the
        network takes ``guidance`` as its input w and no classifier-free guidance is added."""
        chosen = self.settings(steps, sampler, grid, guidance)
        steps, sampler, guidance = chosen["steps"], chosen["sampler"], chosen["guidance"]
        grid = grid or self.defaults.get("grid")
        sampler_info(sampler)  # unknown names fail before any work
        prompts = [p for p in _as_list(prompt) for _ in range(num_images)]
        batch = len(prompts)
        negatives = _as_list(negative_prompt) if negative_prompt is not None else [""]
        if len(negatives) == 1:
            negatives = negatives * batch
        elif len(negatives) * num_images == batch:
            negatives = [n for n in negatives for _ in range(num_images)]
        else:
            raise ValueError(f"got {len(negatives)} negative prompts for {batch // num_images}")
        if image is None and (mask is not None or strength != 1.0):
            raise ValueError("strength and mask need an input image (image=)")
        if image is not None:
            image = _per_prompt(as_image_batch(image, "image", channels=3), batch, "image")
            height, width = image.shape[-2:]
        width = width or self.default_size
        height = height or self.default_size
        self._check_size(width, height)
        if mask is not None:
            mask = _per_prompt(as_image_batch(mask, "mask", channels=1), batch, "mask")
            if mask.shape[-2:] != (height, width):
                raise ValueError(
                    f"the mask is {mask.shape[-1]}×{mask.shape[-2]} but the image is "
                    f"{width}×{height}"
                )
        seeds = list(range(seed, seed + batch)) if isinstance(seed, int) else list(seed)
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} images")

        cond = self._conditioning(self.text_encoder.encode(prompts))
        if self.guidance_embedded:
            if negative_prompt is not None:
                raise ValueError(
                    "this model has classifier-free guidance folded in (a distilled student): "
                    "it takes no negative prompt"
                )
            low, high = self.defaults.get("guidance_range", (guidance, guidance))
            if not low - 1e-6 <= guidance <= high + 1e-6:
                import warnings

                warnings.warn(
                    f"guidance={guidance:g}: this distilled model learned guidance scales "
                    f"{low:g} … {high:g} only; outside them it extrapolates",
                    stacklevel=2,
                )
            cond["guidance"] = torch.full((batch,), guidance, device=self.device)
            guidance = 1.0  # folded in: the student's one call is already the guided model
        uncond = self._conditioning(self.text_encoder.encode(negatives)) if guidance != 1 else None
        if sigmas is None:
            sigmas = make_sigmas(grid or self.default_grid, steps, process=self.process)
        network = self.network
        if self.inpainting_model:
            if controlnet is not None:
                raise ValueError("ControlNets steer plain models, not inpainting models")
            extra = self._inpainting_inputs(image, mask, batch, (height, width))
            network = InpaintingInputs(network, extra)
        if controlnet is not None or control_image is not None:
            network = self._controlled(
                controlnet,
                control_image,
                control_scale,
                control_start,
                control_end,
                sigmas,
                (height, width),
                batch,
            )
        denoiser = Denoiser(network, self.process, self.target)
        guided = ClassifierFreeGuidance(denoiser, cond, uncond, guidance)

        factor = self.latent_factor
        shape = (batch, self.latent_channels, height // factor, width // factor)
        gens = generators(seeds)
        if noise is None:
            noise = randn(shape, gens, device=self.device, dtype=self.dtype)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        if variation_strength:
            if variation_seed is None:
                raise ValueError("variation_strength needs a variation_seed")
            vseeds = (
                list(range(variation_seed, variation_seed + batch))
                if isinstance(variation_seed, int)
                else list(variation_seed)
            )
            if len(vseeds) != batch:
                raise ValueError(f"got {len(vseeds)} variation seeds for {batch} images")
            other = randn(shape, generators(vseeds), device=self.device, dtype=self.dtype)
            noise = slerp(noise.to(self.device, self.dtype), other, variation_strength)
        noise = noise.to(self.device, self.dtype)
        known = None
        if image is not None:
            sigmas = strength_sigmas(sigmas, strength)
            known = self.encode(image)
        start = float(sigmas[0])
        x = noise if math.isinf(start) else noise * start
        # image → image adds the image to the noise; inpainting at full strength starts from
        # pure noise (as diffusers' img2img and inpaint pipelines do)
        if known is not None and not math.isinf(start) and not (mask is not None and strength == 1):
            x = x + known
        if mask is not None and (keep_unmasked or not self.inpainting_model):
            assert known is not None
            m = mask.to(self.device, self.dtype)
            # a latent pixel is repainted if any of its pixels is (max-pool to latent size)
            m = F.max_pool2d(m, factor) if factor > 1 else m
            guided = KnownRegion(guided, known, m)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sigmas) - 1, desc="sampling", unit="step", disable=not progress)

        def report(info: StepInfo) -> None:
            bar.update()
            if preview is not None:
                preview(info.i, self.decode(info.denoised))
            if callback is not None:
                callback(info)

        try:
            latents = sample(
                sampler, guided, x, sigmas, generator=gens, callback=report, **sampler_options
            )
        finally:
            bar.close()
        return self.decode(latents)

    # -- LoRA adapters on the network (destatic.models.lora) ---------------------------------

    def load_lora(
        self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None
    ) -> str:
        """Load a LoRA file or folder (ours, diffusers' or kohya's layout) onto the network at
        ``scale``; several adapters add up, each with its own scale. Returns its name."""
        from destatic.models.lora import load_lora

        return load_lora(self.network, path, name=name, scale=scale)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Scale a loaded adapter (0 = off: exactly the model without it)."""
        from destatic.models.lora import set_lora_scale

        set_lora_scale(self.network, name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one adapter, or all (None): the network is then exactly the base model."""
        from destatic.models.lora import unload_lora

        unload_lora(self.network, name)

    @property
    def loras(self) -> dict[str, float]:
        """Loaded adapters and their scales, in load order."""
        from destatic.models.lora import lora_scales

        return lora_scales(self.network)

    def __call__(self, prompt: str | Sequence[str], **kwargs):
        """``generate`` as a list of ``PIL.Image`` (the DESIGN.md contract)."""
        from PIL import Image

        images = self.generate(prompt, **kwargs)
        arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in arrays]
