"""One generation service behind the web UI and the HTTP API: checks a request against the
server's limits, runs it on the pipeline one at a time, and returns PNG-ready images with
their parameters.

Every check happens before any work, and every failure is a :class:`RequestError` with a
one-line message for the user; the service itself never ends up in a bad state, so a burst of
bad or concurrent requests is followed by a good answer.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

from destatic.pipelines.metadata import GenerationParams
from destatic.sampling import GRIDS, SAMPLERS

__all__ = ["Busy", "Generated", "GenerationService", "Limits", "Request", "RequestError"]


class RequestError(ValueError):
    """A request the server will not run; the message says what to change."""


class Busy(RuntimeError):
    """The waiting line is full; try again later."""


@dataclass
class Limits:
    max_side: int = 512  # pixels, per side
    max_images: int = 8  # per request
    max_steps: int = 100
    max_prompt_chars: int = 2000
    max_waiting: int = 16  # requests queued behind the one running


@dataclass
class Request:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "dpmpp_2m"
    grid: str | None = None
    guidance: float = 3.0
    seed: int = 0
    num_images: int = 1
    width: int | None = None
    height: int | None = None
    strength: float = 1.0
    image: Any = None  # PIL image (image → image, inpainting)
    mask: Any = None  # PIL image, white = repaint
    control_image: Any = None  # PIL image: the server's ControlNet steers with it
    control_canny: bool = False  # trace Canny edges of control_image first
    control_scale: float = 1.0
    control_start: float = 0.0
    control_end: float = 1.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Request:
        """From JSON fields; unknown fields and wrong types are a :class:`RequestError`."""
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}; valid: {', '.join(names)}")
        if "prompt" not in data:
            raise RequestError("the field 'prompt' is required")
        return cls(**data)


@dataclass
class Generated:
    images: list[Any]  # PIL images
    params: list[GenerationParams] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. a truncated prompt


def _number(name: str, value: Any, kind: type, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RequestError(f"{name} must be {'a number' if kind is float else 'an integer'}")
    if not low <= value <= high:
        raise RequestError(f"{name} = {value} is out of range: use {low:g} … {high:g}")


class GenerationService:
    """``service.run(request)`` → :class:`Generated`; thread-safe (one generation at a time)."""

    def __init__(
        self,
        pipeline,
        limits: Limits | None = None,
        model_name: str = "",
        controlnet=None,
        controlnet_name: str = "",
        inpainter=None,
        inpainter_name: str = "",
    ):
        self.pipeline = pipeline
        self.inpainter = inpainter  # an inpainting model for masked requests (optional)
        self.inpainter_name = inpainter_name
        self.limits = limits or Limits()
        self.model_name = model_name
        self.controlnet = controlnet
        self.controlnet_name = controlnet_name
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.limits.max_waiting + 1)

    # -- checks --------------------------------------------------------------------------------
    def check(self, r: Request) -> None:
        """Raise :class:`RequestError` unless the request is valid and within the limits."""
        lim = self.limits
        if not isinstance(r.prompt, str) or not isinstance(r.negative_prompt, str):
            raise RequestError("prompt and negative_prompt must be text")
        if len(r.prompt) > lim.max_prompt_chars or len(r.negative_prompt) > lim.max_prompt_chars:
            raise RequestError(f"prompts are limited to {lim.max_prompt_chars} characters")
        if r.sampler not in SAMPLERS:
            raise RequestError(
                f"unknown sampler {r.sampler!r}; choose one of {', '.join(SAMPLERS)}"
            )
        if r.grid is not None and r.grid not in GRIDS:
            raise RequestError(f"unknown grid {r.grid!r}; choose one of {', '.join(GRIDS)}")
        _number("steps", r.steps, int, 1, lim.max_steps)
        _number("num_images", r.num_images, int, 1, lim.max_images)
        _number("guidance", r.guidance, float, 0, 50)
        _number("seed", r.seed, int, 0, 2**63 - 1)
        _number("strength", r.strength, float, 0.01, 1)
        m = self.pipeline.size_multiple
        for name in ("width", "height"):
            side = getattr(r, name)
            if side is None:
                continue
            _number(name, side, int, m, lim.max_side)
            if side % m:
                raise RequestError(f"{name} = {side} must be a multiple of {m} for this model")
        if r.image is not None:
            w, h = r.image.size
            if w > lim.max_side or h > lim.max_side:
                raise RequestError(f"the image is {w}×{h}; the limit is {lim.max_side} per side")
            if w % m or h % m:
                raise RequestError(f"the image is {w}×{h}; both sides must be multiples of {m}")
        if r.mask is not None:
            if r.image is None:
                raise RequestError("a mask needs an image (inpainting)")
            if r.mask.size != r.image.size:
                raise RequestError(
                    f"the mask is {r.mask.size[0]}×{r.mask.size[1]} but the image is "
                    f"{r.image.size[0]}×{r.image.size[1]}"
                )
        if r.image is None and r.strength != 1:
            raise RequestError("strength needs an image (image → image)")
        if r.control_image is not None:
            if self.controlnet is None:
                raise RequestError("this server has no ControlNet (destatic serve --controlnet)")
            _number("control_scale", r.control_scale, float, 0, 5)
            _number("control_start", r.control_start, float, 0, 1)
            _number("control_end", r.control_end, float, 0, 1)
            if r.control_start >= r.control_end:
                raise RequestError("control_start must be below control_end")
            w, h = r.control_image.size
            want = (r.width or self.pipeline.default_size, r.height or self.pipeline.default_size)
            if r.image is not None:
                want = r.image.size
            if (w, h) != want:
                raise RequestError(
                    f"the control image is {w}×{h} but the image is {want[0]}×{want[1]}"
                )

    @staticmethod
    def control_map(image, canny: bool):
        """The control image as the ControlNet sees it: RGB, traced to Canny edges if asked."""
        image = image.convert("RGB")
        if not canny:
            return image
        import numpy as np
        from PIL import Image

        from destatic.data.edges import canny_edges

        return Image.fromarray(canny_edges(np.asarray(image)))

    def _control_map(self, r: Request):
        return self.control_map(r.control_image, r.control_canny)

    # -- running -------------------------------------------------------------------------------
    def run(self, r: Request) -> Generated:
        self.check(r)
        if not self._slots.acquire(blocking=False):
            raise Busy(f"the server is busy ({self.limits.max_waiting} requests waiting)")
        try:
            with self._lock, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                extra = {}
                if r.image is not None:
                    extra = {"image": r.image.convert("RGB"), "strength": r.strength}
                    if r.mask is not None:
                        extra["mask"] = r.mask.convert("L")
                        extra["keep_unmasked"] = True  # also for an inpainting model
                if r.control_image is not None:
                    extra.update(
                        controlnet=self.controlnet,
                        control_image=self._control_map(r),
                        control_scale=r.control_scale,
                        control_start=r.control_start,
                        control_end=r.control_end,
                    )
                masked = r.mask is not None and self.inpainter is not None
                pipe = self.inpainter if masked else self.pipeline
                try:
                    images = pipe(
                        r.prompt,
                        negative_prompt=r.negative_prompt or None,
                        steps=r.steps,
                        sampler=r.sampler,
                        grid=r.grid,
                        guidance=r.guidance,
                        seed=r.seed,
                        num_images=r.num_images,
                        width=r.width,
                        height=r.height,
                        **extra,
                    )
                except ValueError as e:  # the pipeline's own checks: the user's to fix
                    raise RequestError(str(e)) from None
            notes = list(dict.fromkeys(str(w.message) for w in caught))
        finally:
            self._slots.release()
        control = {}
        if r.control_image is not None:
            control = dict(
                controlnet=self.controlnet_name or "controlnet",
                control_canny=r.control_canny,
                control_scale=r.control_scale,
                control_start=r.control_start,
                control_end=r.control_end,
            )
        params = [
            GenerationParams(
                prompt=r.prompt,
                negative_prompt=r.negative_prompt,
                steps=r.steps,
                sampler=r.sampler,
                grid=r.grid,
                guidance=r.guidance,
                seed=r.seed + i,
                width=im.width,
                height=im.height,
                model=self.inpainter_name if masked else self.model_name,
                strength=r.strength,
                **control,
            )
            for i, im in enumerate(images)
        ]
        return Generated(images, params, notes)
