"""The pipeline: a network × a process and target × a text encoder × an autoencoder, of one
family; any sampler, any grid.

``pipe.run(request)`` draws a :class:`~destatic.pipelines.request.GenerationRequest` through the
stages of :mod:`destatic.pipelines.stages`; ``pipe.generate(prompt, **fields)`` and
``pipe(prompt, **fields)`` (the public contract: PIL images) build the request from keywords.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from destatic.pipelines.base import PipelineBase
from destatic.pipelines.request import GenerationRequest
from destatic.pipelines.stages import (
    encode_conditioning,
    initial_state,
    prepare_inputs,
    sigma_grid,
    wrap_denoiser,
)
from destatic.sampling import StepInfo, sample, sampler_info

__all__ = ["Pipeline", "to_pil"]

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
        """Media for ``request`` as a float tensor in [0, 1] ([B, C, H, W] for images).

        ``noise`` replaces the seeded initial noise (unit variance, latent shape); ``sigmas``
        the request's grid; ``callback(StepInfo)`` sees every step; ``progress`` shows a bar;
        ``preview(i, images)`` receives the decoded estimate x̂0 after step i."""
        r = request.resolved(self)
        sampler_info(r.sampler)  # unknown names fail before any work
        self.use_loras(r.loras)
        inputs = prepare_inputs(r, self.default_size, len(r.prompts))
        self.check_size(inputs.width, inputs.height)
        conditioning = encode_conditioning(self, r)
        sigmas = sigma_grid(self, r, sigmas)
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
                **r.sampler_options,
            )
        return self.decode(latents)

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
        """``generate`` as a list of ``PIL.Image`` (the docs/architecture.md contract)."""
        return to_pil(self.generate(prompt, **kwargs))

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
