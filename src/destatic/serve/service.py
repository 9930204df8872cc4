"""One generation service behind the web UI and the HTTP API: checks a request against the
server's limits, runs it on the pipeline one at a time, and returns PNG-ready images (or, for
a video model, clips of frames; for an audio model, waveforms) with their parameters.

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

from destatic.pipelines import GenerationRequest, RequestError, to_pil
from destatic.sampling import GRIDS, SAMPLERS

__all__ = [
    "CLIENT_FIELDS",
    "DEFAULT_FPS",
    "Busy",
    "Generated",
    "GenerationService",
    "Limits",
    "RequestError",
    "request_from_json",
]


DEFAULT_FPS = 8  # frames per second of a clip whose request does not say (as destatic generate)


class Busy(RuntimeError):
    """The waiting line is full; try again later."""


@dataclass
class Limits:
    max_side: int = 512  # pixels, per side
    max_images: int = 8  # per request
    max_steps: int = 100
    max_prompt_chars: int = 2000
    max_waiting: int = 16  # requests queued behind the one running
    max_upload_side: int = 4096  # pixels, per side of an image uploaded to the UI (resized)
    max_image_bytes: int = 8 * 2**20  # one encoded image (PNG, JPEG, WebP)
    max_body_bytes: int = 16 * 2**20  # one HTTP request body
    max_frames: int = 64  # per clip, for a video model
    max_fps: int = 120  # frames per second of a video's playback
    max_seconds: float = 30.0  # per sound, for an audio model
    max_beams: int = 8  # beams of a token model's beam search


# What a client may set; the server fills the rest (its model, ControlNet and routing), so no
# request can name a file or folder on the server.
CLIENT_FIELDS = (
    "prompt",
    "negative_prompt",
    "steps",
    "sampler",
    "grid",
    "guidance",
    "guidance_rescale",
    "seed",
    "num_images",
    "width",
    "height",
    "image",
    "strength",
    "mask",
    "variation_seed",
    "variation_strength",
    "control_image",
    "control_canny",
    "control_scale",
    "control_start",
    "control_end",
    "hires_scale",
    "hires_strength",
    "vae_tiling",
    "num_frames",
    "seconds",
    "seconds_start",
    "temperature",
    "top_k",
    "top_p",
    "beams",
)
_SERVER_FIELDS = ("model", "controlnet", "loras", "sampler_options", "keep_unmasked")
# what an audio model has no use for (left unset)
_PICTURE_FIELDS = ("width", "height", "image", "mask", "control_image", "num_frames")
# what a token model has no use for (left unset): inputs, frames and a diffusion model's grid
_NOT_FOR_TOKENS = ("image", "mask", "control_image", "num_frames", "grid")
_DECODING = ("temperature", "top_k", "top_p", "beams")


def request_from_json(fields: Any) -> GenerationRequest:
    """A client's JSON object (images already decoded) as a request; fields outside
    :data:`CLIENT_FIELDS` are a :class:`RequestError` naming the valid ones."""
    if not isinstance(fields, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(fields) - set(CLIENT_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; valid: {', '.join(CLIENT_FIELDS)}")
    if "prompt" not in fields:
        raise RequestError("the field 'prompt' is required")
    return GenerationRequest.from_dict(fields)


@dataclass
class Generated:
    # PIL images; for a video model, clips (each a list of PIL frames); for an audio model,
    # waveforms (each a (channels, samples) float32 array in [-1, 1])
    images: list[Any]
    requests: list[GenerationRequest] = field(default_factory=list)  # the one of each image
    warnings: list[str] = field(default_factory=list)  # e.g. a truncated prompt
    sample_rate: int | None = None  # of the waveforms (None: images or clips)

    @property
    def clips(self) -> bool:
        """Whether these are a video model's clips rather than images."""
        return bool(self.images) and isinstance(self.images[0], list)

    @property
    def sounds(self) -> bool:
        """Whether these are an audio model's waveforms."""
        return self.sample_rate is not None


def _text(name: str, value: Any, limit: int) -> None:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be text")
    if len(value) > limit:
        raise RequestError(f"prompts are limited to {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{name} is not valid Unicode text (a lone surrogate?)") from None


def _choice(name: str, value: Any, options) -> None:
    if not isinstance(value, str) or value not in options:
        shown = repr(value) if isinstance(value, str) else f"of type {type(value).__name__}"
        raise RequestError(f"unknown {name} {shown}; choose one of {', '.join(options)}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false")


def _image(name: str, value: Any) -> None:
    from PIL import Image

    if value is not None and not isinstance(value, Image.Image):
        raise RequestError(f"{name} must be an image")


def _optional_number(name: str, value: Any, kind: type, low: float, high: float) -> None:
    if value is not None:
        _number(name, value, kind, low, high)


def _number(name: str, value: Any, kind: type, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RequestError(f"{name} must be {'a number' if kind is float else 'an integer'}")
    if not low <= value <= high:
        raise RequestError(f"{name} = {value} is out of range: use {low:g} … {high:g}")


class GenerationService:
    """``service.run(request)`` → :class:`Generated`; thread-safe (one generation at a time).

    ``pipeline`` draws every request; ``inpainter`` (optional) draws the masked ones and
    ``controlnet`` steers those with a control image. Unset sampling fields take the model's
    defaults (:meth:`GenerationRequest.resolved`): the UI shows them as :attr:`defaults`."""

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
        self.inpainter = inpainter
        self.inpainter_name = inpainter_name
        self.limits = limits or Limits()
        self.model_name = model_name
        self.controlnet = controlnet
        self.controlnet_name = controlnet_name
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.limits.max_waiting + 1)

    @property
    def defaults(self) -> dict:
        """The model's sampling defaults (steps, sampler, grid, guidance; a token model's
        temperature, top_k, top_p and beams too)."""
        return {**self.pipeline.sampling_defaults, **(self.decoding or {})}

    @property
    def decoding(self) -> dict | None:
        """A token model's decoding defaults (None: a diffusion model)."""
        return getattr(self.pipeline, "decoding_defaults", None)

    @property
    def tokens(self) -> bool:
        """Whether the model draws VQ tokens (autoregressive or MaskGIT), not by diffusion."""
        return self.decoding is not None

    @property
    def media(self) -> str:
        """What the model makes: "image", "video" (clips) or "audio" (``Family.media``)."""
        return self.pipeline.family.media

    @property
    def video(self) -> bool:
        """Whether the model draws clips (``Family.media == "video"``) rather than images."""
        return self.media == "video"

    @property
    def audio(self) -> bool:
        """Whether the model makes sounds (``Family.media == "audio"``)."""
        return self.media == "audio"

    @property
    def sample_rate(self) -> int | None:
        """An audio model's samples per second (None: images or clips)."""
        return self.pipeline.sample_rate if self.audio else None

    @property
    def default_frames(self) -> int | None:
        """The frames of a clip when a request leaves ``num_frames`` unset (None: images):
        the network's, as :meth:`~destatic.pipelines.base.PipelineBase.latent_shape` fills it."""
        return int(self.pipeline.network.config.num_frames) if self.video else None

    def check_fps(self, fps: Any) -> int:
        """``fps`` (frames per second of a clip's playback) if valid for this model;
        :data:`DEFAULT_FPS` when it is None."""
        if fps is None:
            return DEFAULT_FPS
        if not self.video:
            made = "sounds" if self.audio else "still images"
            raise RequestError(f"fps is for video models; this model makes {made}")
        _number("fps", fps, int, 1, self.limits.max_fps)
        return fps

    # -- checks --------------------------------------------------------------------------------
    def check(self, r: GenerationRequest) -> None:
        """Raise :class:`RequestError` unless the request is valid and within the limits."""
        lim = self.limits
        for name in _SERVER_FIELDS:
            value = getattr(r, name)
            if value not in (None, "", [], {}, False):
                raise RequestError(f"{name} is set by the server, not by a request")
        _text("prompt", r.prompt, lim.max_prompt_chars)
        _text("negative_prompt", r.negative_prompt, lim.max_prompt_chars)
        for name, options in (("sampler", SAMPLERS), ("grid", GRIDS)):
            value = getattr(r, name)
            if value is not None and not isinstance(value, str):
                _choice(name, value, options)
        r.canonical()  # A1111 labels ("DPM++ 2M Karras") resolve; unknown names fail
        _optional_number("steps", r.steps, int, 1, lim.max_steps)
        _number("num_images", r.num_images, int, 1, lim.max_images)
        _optional_number("guidance", r.guidance, float, 0, 50)
        _number("guidance_rescale", r.guidance_rescale, float, 0, 1)
        for name in ("seed", "variation_seed"):
            for seed in (
                getattr(r, name) if isinstance(getattr(r, name), list) else [getattr(r, name)]
            ):
                _optional_number(name, seed, int, 0, 2**63 - 1)
        _number("strength", r.strength, float, 0.01, 1)
        _number("variation_strength", r.variation_strength, float, 0, 1)
        _number("control_scale", r.control_scale, float, 0, 5)
        _number("control_start", r.control_start, float, 0, 1)
        _number("control_end", r.control_end, float, 0, 1)
        _flag("control_canny", r.control_canny)
        _flag("vae_tiling", r.vae_tiling)
        _number("hires_scale", r.hires_scale, float, 1, 4)
        _number("hires_strength", r.hires_strength, float, 0.01, 1)
        _optional_number("num_frames", r.num_frames, int, 1, lim.max_frames)
        for name in ("image", "mask", "control_image"):
            _image(name, getattr(r, name))
        if self.audio:
            self._check_sound(r)
            return
        if self.tokens:
            self._check_tokens(r)
            return
        given = [name for name in _DECODING if getattr(r, name) is not None]
        if given:
            raise RequestError(f"{given[0]} is for token models; this is a diffusion model")
        if r.seconds is not None or r.seconds_start != 0:
            made = "clips" if self.video else "images"
            raise RequestError(f"seconds needs an audio model; this model draws {made}")
        self._check_sizes(r)

    def _check_sound(self, r: GenerationRequest) -> None:
        """An audio model's request: no image fields, and the span [seconds_start,
        seconds_start + seconds] within the model's length and the server's limit."""
        for name in _PICTURE_FIELDS:
            if getattr(r, name) is not None:
                raise RequestError(f"{name} is for image and video models; this is an audio model")
        if r.hires_scale != 1:
            raise RequestError("hires_scale is for image models; this is an audio model")
        most = self.limits.max_seconds
        _optional_number("seconds", r.seconds, float, 0, most)
        _number("seconds_start", r.seconds_start, float, 0, self.pipeline.max_seconds)
        try:
            start, end = self.pipeline.audio_span(r.seconds_start, r.seconds)
        except ValueError as e:  # the model's own check: the span does not fit
            raise RequestError(str(e)) from None
        if end - start > most + 1e-9:  # seconds unset: the model's whole length
            raise RequestError(
                f"without seconds, this model makes {end - start:.3g} s (to its end at "
                f"{end:.3g} s); the server's limit is {most:g} s: ask for seconds ≤ {most:g}"
            )

    def _check_tokens(self, r: GenerationRequest) -> None:
        """A token model's request: decoding fields within the limits, its own size, and no
        input images, frames, grid, hires pass, variations or seconds."""
        from destatic.pipelines.tokens import TAKES, check_decoding

        try:
            check_decoding(r, int(self.pipeline.tokenizer.num_codes))
        except ValueError as e:
            raise RequestError(str(e)) from None
        _optional_number("temperature", r.temperature, float, 0, 100)
        _optional_number("beams", r.beams, int, 1, self.limits.max_beams)
        wrong = [name for name in _NOT_FOR_TOKENS if getattr(r, name) is not None]
        wrong += [
            n for n, v in (("hires_scale", r.hires_scale), ("strength", r.strength)) if v != 1
        ]
        wrong += [name for name in ("variation_strength", "seconds_start") if getattr(r, name)]
        wrong += ["seconds"] if r.seconds is not None else []
        if wrong:
            raise RequestError(f"{wrong[0]} is not for token models; {TAKES}")
        side = self.pipeline.default_size
        for name in ("width", "height"):
            value = getattr(r, name)
            if value is not None and value != side:
                raise RequestError(f"{name} = {value}: this token model draws {side}×{side} only")

    def _check_sizes(self, r: GenerationRequest) -> None:
        lim, m = self.limits, self.pipeline.size_multiple
        for name in ("width", "height"):
            side = getattr(r, name)
            if side is None:
                continue
            _number(name, side, int, m, lim.max_side)
            if side % m:
                raise RequestError(f"{name} = {side} must be a multiple of {m} for this model")
        try:  # the family's own check of the frames (a video model's only, in range)
            self.pipeline.latent_shape(1, m, m, r.num_frames)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if r.hires_scale != 1:
            self._check_hires(r)
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
            self._check_control(r)

    def _check_hires(self, r: GenerationRequest) -> None:
        if r.image is not None or r.control_image is not None:
            raise RequestError("hires_scale is for text → image (no image or control image)")
        default = self.pipeline.default_size
        largest = max(r.width or default, r.height or default) * r.hires_scale
        if largest > self.limits.max_side:
            raise RequestError(
                f"hires_scale {r.hires_scale:g} makes a {largest:g}-pixel side; the limit is "
                f"{self.limits.max_side}"
            )

    def _check_control(self, r: GenerationRequest) -> None:
        if self.controlnet is None:
            raise RequestError("this server has no ControlNet (destatic serve --controlnet)")
        if r.control_start >= r.control_end:
            raise RequestError("control_start must be below control_end")
        w, h = r.control_image.size
        want = (r.width or self.pipeline.default_size, r.height or self.pipeline.default_size)
        if r.image is not None:
            want = r.image.size
        if (w, h) != want:
            raise RequestError(f"the control image is {w}×{h} but the image is {want[0]}×{want[1]}")

    @staticmethod
    def control_map(image, canny: bool):
        """The control image as the ControlNet sees it: RGB, traced to Canny edges if asked."""
        from destatic.pipelines.inputs import canny_map

        return canny_map(image) if canny else image.convert("RGB")

    # -- running -------------------------------------------------------------------------------
    def route(self, r: GenerationRequest):
        """The pipeline that draws ``r`` and the request as it runs there: a masked request
        goes to the inpainting model (holding the kept pixels), a control image gets the
        server's ControlNet; unset sampling fields take that model's defaults."""
        masked = r.mask is not None and self.inpainter is not None
        pipe = self.inpainter if masked else self.pipeline
        routed = dataclasses.replace(
            r,
            model=self.inpainter_name if masked else self.model_name,
            keep_unmasked=r.mask is not None,
            controlnet=self.controlnet if r.control_image is not None else None,
        )
        return pipe, routed.resolved(pipe)

    def run(self, r: GenerationRequest) -> Generated:
        self.check(r)
        if not self._slots.acquire(blocking=False):
            raise Busy(f"the server is busy ({self.limits.max_waiting} requests waiting)")
        try:
            with self._lock, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pipe, routed = self.route(r)
                try:
                    media = pipe.run(routed)
                except ValueError as e:  # the pipeline's own checks: the user's to fix
                    raise RequestError(str(e)) from None
            notes = list(dict.fromkeys(str(w.message) for w in caught))
        finally:
            self._slots.release()
        if self.audio:  # waveforms (B, channels, samples)
            sounds = [w.float().cpu().numpy() for w in media]
            requests = [routed.for_image(i) for i in range(len(sounds))]
            return Generated(sounds, requests, notes, sample_rate=pipe.sample_rate)
        # images (B, C, H, W) → PIL images; clips (B, C, F, H, W) → lists of PIL frames
        images = [to_pil(c.transpose(0, 1)) for c in media] if media.ndim == 5 else to_pil(media)
        sizes = [(im[0] if isinstance(im, list) else im).size for im in images]
        shown = (self.controlnet_name or "controlnet") if r.control_image is not None else None
        requests = [
            dataclasses.replace(drawn, controlnet=shown)
            for drawn in routed.for_images(sizes, pipe.default_size)
        ]
        return Generated(images, requests, notes)
