"""The pipeline: a network × a process and target × a text encoder × an autoencoder, of one
family; any sampler, any grid.

``pipe.run(request)`` draws a :class:`~destatic.pipelines.request.GenerationRequest` through the
stages of :mod:`destatic.pipelines.stages`; ``pipe.generate(prompt, **fields)`` and
``pipe(prompt, **fields)`` (the public contract: PIL images) build the request from keywords.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from destatic.pipelines.base import PipelineBase
from destatic.pipelines.prompt_chunks import same_token_count
from destatic.pipelines.request import GenerationRequest
from destatic.pipelines.stages import (
    audio_span,
    encode_conditioning,
    initial_state,
    prepare_inputs,
    sigma_grid,
    wrap_denoiser,
)
from destatic.sampling import StepInfo, sample, sampler_info

__all__ = ["Pipeline", "lanczos", "to_pil"]

_REQUEST_FIELDS = {f.name for f in dataclasses.fields(GenerationRequest)}
_RUN_OPTIONS = {"noise", "sigmas", "callback", "progress", "preview"}


@dataclass
class Pipeline(PipelineBase):
    """A latent (or pixel-space) generative model: any network × any process/target × any
    sampler (:class:`PipelineBase` holds the parts)."""

    _lora_names: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self,
        request: GenerationRequest,
        *,
        noise: torch.Tensor | None = None,
        sigmas: torch.Tensor | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        progress: bool = False,
        preview: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Media for ``request`` as a float tensor in [0, 1] ([B, C, H, W] for images,
        [B, C, F, H, W] for clips); for an audio model, waveforms [B, channels, samples] in
        [-1, 1], cut to the span the request asks for (``seconds_start`` … ``+ seconds``).

        ``noise`` replaces the seeded initial noise (unit variance, latent shape); ``sigmas``
        the request's grid; ``callback(StepInfo)`` sees every step; ``progress`` shows a bar;
        ``preview(i, images)`` receives the decoded estimate x̂0 after step i. A request with
        ``hires_scale`` > 1 runs a second pass on its enlarged images (:meth:`hires_request`;
        ``noise`` and ``sigmas`` are the first pass's), and ``vae_tiling`` runs the
        autoencoder in overlapping tiles."""
        r = request.resolved(self)
        live = {"callback": callback, "progress": progress, "preview": preview}
        with self._tiling(r.vae_tiling):
            images = self._draw(r, noise, sigmas, **live)
            if r.hires_scale != 1:
                images = self._draw(self.hires_request(r, images), None, None, **live)
        if self.media == "audio":
            start, end = audio_span(self, r)
            rate = self.sample_rate
            return images[..., int(start * rate) : int(end * rate)]
        return images

    def _draw(self, r: GenerationRequest, noise, sigmas, *, callback, progress, preview):
        """One pass of the stages for a resolved request (see :meth:`run`)."""
        sampler_info(r.sampler)  # unknown names fail before any work
        self.use_loras(r.loras)
        inputs = prepare_inputs(r, self.default_size, len(r.prompts))
        self.check_size(inputs.width, inputs.height)
        conditioning = encode_conditioning(self, r, inputs)
        conditioning = same_token_count(self, conditioning, inputs.width, inputs.height)
        sigmas = sigma_grid(self, r, sigmas, inputs)
        state = initial_state(self, r, inputs, sigmas, noise)
        denoiser = wrap_denoiser(self, r, inputs, conditioning, sigmas, state.known)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sigmas) - 1, desc="sampling", unit="step", disable=not progress)

        def report(info: StepInfo) -> None:
            bar.update()
            if preview is not None:
                preview(info.i, self.decode(info.denoised))
            if callback is not None:
                callback(info)

        with bar:
            latents = sample(
                r.sampler,
                denoiser,
                state.x,
                sigmas,
                generator=state.generators,
                callback=report,
                process=self.process,  # tcd reads it; it picks the noise (CosineEDM)
                **r.sampler_options,
            )
        return self.decode(latents)

    def hires_request(self, r: GenerationRequest, images: torch.Tensor) -> GenerationRequest:
        """The hires fix's second pass (A1111's): the first pass's ``images`` enlarged by
        ``r.hires_scale`` with Lanczos (sides rounded to the model's multiple), redrawn image →
        image at ``r.hires_strength`` with the same prompts and seeds."""
        if self.media == "audio":
            raise ValueError("the hires pass is for images; leave hires_scale at 1 for audio")
        if r.hires_scale < 1:
            raise ValueError(f"hires_scale must be at least 1, got {r.hires_scale:g}")
        if r.image is not None or r.controlnet is not None:
            raise ValueError("the hires pass is for text → image: drop the input or control image")
        m = self.size_multiple
        height, width = (max(m, round(side * r.hires_scale / m) * m) for side in images.shape[-2:])
        return dataclasses.replace(
            r,
            image=lanczos(images, width, height),
            strength=r.hires_strength,
            width=None,
            height=None,
            hires_scale=1.0,
        )

    @contextlib.contextmanager
    def _tiling(self, on: bool) -> Iterator[None]:
        """The autoencoder tiled (512-pixel tiles) inside the block when ``on``; a pixel-space
        model has nothing to tile, and tiling enabled by the caller stays as it is."""
        vae = self.autoencoder
        if on and vae is not None and not hasattr(vae, "enable_tiling"):
            raise ValueError(
                f"vae_tiling: {type(vae).__name__} has no tiled decode (it decodes frame by "
                "frame already); leave --vae-tiling off"
            )
        if not on or vae is None or vae.tile_pixels is not None:
            yield
            return
        vae.enable_tiling()
        try:
            yield
        finally:
            vae.disable_tiling()

    def generate(self, prompt: str | Sequence[str], **kwargs) -> torch.Tensor:
        """:meth:`run` on a request built from keywords: every :class:`GenerationRequest`
        field (``negative_prompt``, ``steps``, ``sampler``, ``grid``, ``guidance``, ``seed``,
        ``width``, ``height``, ``num_images``, ``image``, ``strength``, ``mask``,
        ``controlnet``, ``control_image``, ``variation_seed``, …), :meth:`run`'s options
        (``noise``, ``sigmas``, ``callback``, ``progress``, ``preview``), and any other keyword
        as a sampler option (``eta``, ``s_noise``, …). Unset sampling fields take the model's
        defaults (:attr:`sampling_defaults`)."""
        run = {k: kwargs.pop(k) for k in list(kwargs) if k in _RUN_OPTIONS}
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in _REQUEST_FIELDS}
        if fields.get("negative_prompt") is None:
            fields["negative_prompt"] = ""
        fields["sampler_options"] = {**fields.get("sampler_options", {}), **kwargs}
        prompt = prompt if isinstance(prompt, str) else list(prompt)
        return self.run(GenerationRequest(prompt=prompt, **fields), **run)

    def __call__(self, prompt: str | Sequence[str], **kwargs):
        """``generate`` as a list of ``PIL.Image`` (the docs/architecture.md contract); for a
        video model, a list of clips, each a list of frames; for an audio model, a list of
        float32 numpy waveforms (channels, samples) at :attr:`sample_rate`."""
        media = self.generate(prompt, **kwargs)
        if self.media == "audio":
            return list(media.cpu().numpy())
        if media.ndim == 5:  # (B, C, F, H, W)
            return [to_pil(clip.transpose(0, 1)) for clip in media]
        return to_pil(media)

    # -- device and precision --------------------------------------------------------------------
    def to(
        self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> Pipeline:
        """Move every component — network, autoencoder, text encoder — to ``device`` and cast
        it to ``dtype`` (either None: unchanged; names as ``--device``/``--dtype``, ``auto``
        included: :func:`~destatic.pipelines.devices.pick_device`). An fp16 pipeline keeps an
        autoencoder whose config says ``force_upcast`` in fp32; bf16 on the CPU puts the
        convolutions in channels_last (:func:`~destatic.models.speedups.preferred_layout`).
        Returns the pipeline."""
        from destatic.models.speedups import preferred_layout, set_layout
        from destatic.pipelines.devices import pick_device, pick_dtype, upcast_dtype

        if device is not None:
            device, _ = pick_device(device, "fp32")
        if dtype is not None:
            dtype = pick_dtype(dtype, device or self.device)
        modules = [self.network, self.text_encoder, *self.extras.values()]
        for module in modules:
            module.to(device=device, dtype=dtype)
        if self.autoencoder is not None:
            self.autoencoder.to(device=device, dtype=upcast_dtype(self.autoencoder.config, dtype))
            modules.append(self.autoencoder)
        if dtype is not None:
            for module in modules:
                set_layout(module, preferred_layout(self.device, dtype))
        return self

    # -- LoRA adapters on the network (destatic.models.lora) ---------------------------------

    def use_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Make sure a request's adapters are loaded, each at its scale (a file is loaded once
        and rescaled on later requests)."""
        for path, scale in loras:
            name = self._lora_names.get(str(path))
            if name is None:
                self._lora_names[str(path)] = self.load_lora(path, scale=float(scale))
            else:
                self.set_lora_scale(name, float(scale))

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
        self._lora_names = {p: n for p, n in self._lora_names.items() if name not in (None, n)}

    @property
    def loras(self) -> dict[str, float]:
        """Loaded adapters and their scales, in load order."""
        from destatic.models.lora import lora_scales

        return lora_scales(self.network)


def to_pil(images: torch.Tensor) -> list:
    """Images [B, C, H, W] in [0, 1] → 8-bit ``PIL.Image``s."""
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in arrays]


def lanczos(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Images [B, C, H, W] in [0, 1] resized to ``width`` × ``height`` with Lanczos, through
    8-bit images as A1111's Lanczos upscaler does (float32, on the CPU)."""
    import numpy as np
    from PIL import Image

    resized = [im.resize((width, height), Image.Resampling.LANCZOS) for im in to_pil(images)]
    arrays = np.stack([np.asarray(im, np.float32).reshape(height, width, -1) for im in resized])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 255
