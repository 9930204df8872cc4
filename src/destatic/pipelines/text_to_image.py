"""Text → image: prompt → text encoder → guided σ-space sampling → autoencoder decode.

The one place that knows every layer (DESIGN.md): it wraps the network as a
:class:`~destatic.process.Denoiser` for its process and target, binds the prompt embeddings
through :class:`~destatic.sampling.ClassifierFreeGuidance`, samples latents with any registered
sampler and grid from per-sample seeded noise, and decodes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from destatic.models.autoencoder import AutoencoderKL
from destatic.models.mmdit import MMDiT
from destatic.models.text import TextEmbedding, TextEncoder
from destatic.process import Denoiser, Process, Target
from destatic.sampling import (
    ClassifierFreeGuidance,
    StepInfo,
    generators,
    initial_noise,
    make_sigmas,
    sample,
    sampler_info,
)

__all__ = ["Pipeline"]


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

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        if self.autoencoder is None:
            return int(self.network.config.in_channels)
        return self.autoencoder.config.latent_channels

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
        """``karras`` for processes with a finite σ_max; ``normal`` (uniform in the process's
        own time, as SD3 and Flux sample) for those that start at σ = ∞."""
        return "karras" if math.isfinite(self.process.sigma_max) else "normal"

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space samples → images in [0, 1] (float32)."""
        if self.autoencoder is not None:
            latents = self.autoencoder.images_from_latents(latents)
        return (latents.float() / 2 + 0.5).clamp(0, 1)

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
        steps: int = 20,
        sampler: str = "dpmpp_2m",
        grid: str | None = None,
        guidance: float = 5.0,
        seed: int | Sequence[int] = 0,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        noise: torch.Tensor | None = None,
        sigmas: torch.Tensor | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        **sampler_options,
    ) -> torch.Tensor:
        """Images as a float tensor [B, C, H, W] in [0, 1]. ``seed`` is the first of
        consecutive per-image seeds (or one seed per image); ``noise`` replaces the seeded
        initial noise (unit variance, latent shape); ``sigmas`` replaces ``grid``/``steps``."""
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
        width = width or self.default_size
        height = height or self.default_size
        self._check_size(width, height)
        seeds = list(range(seed, seed + batch)) if isinstance(seed, int) else list(seed)
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} images")

        cond = self._conditioning(self.text_encoder.encode(prompts))
        uncond = self._conditioning(self.text_encoder.encode(negatives)) if guidance != 1 else None
        denoiser = Denoiser(self.network, self.process, self.target)
        guided = ClassifierFreeGuidance(denoiser, cond, uncond, guidance)

        if sigmas is None:
            sigmas = make_sigmas(grid or self.default_grid, steps, process=self.process)
        factor = self.latent_factor
        shape = (batch, self.latent_channels, height // factor, width // factor)
        gens = generators(seeds)
        if noise is None:
            x = initial_noise(shape, sigmas, gens, device=self.device, dtype=self.dtype)
        else:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
            start = float(sigmas[0])
            x = noise.to(self.device, self.dtype) * (1.0 if start == float("inf") else start)
        latents = sample(
            sampler, guided, x, sigmas, generator=gens, callback=callback, **sampler_options
        )
        return self.decode(latents)

    def __call__(self, prompt: str | Sequence[str], **kwargs):
        """``generate`` as a list of ``PIL.Image`` (the DESIGN.md contract)."""
        from PIL import Image

        images = self.generate(prompt, **kwargs)
        arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in arrays]
