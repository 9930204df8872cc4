"""One generation request: every parameter of one call, in one typed dataclass.

The CLI, the web UI, the HTTP API, the Python API and the PNG metadata (``--from``) all build a
:class:`GenerationRequest` and hand it to :meth:`Pipeline.run`; nothing else spells the
parameters out. Fields left ``None`` are filled in one place, :meth:`GenerationRequest.resolved`:
the model folder's stored defaults (``destatic_defaults`` in ``model_index.json``: a distilled
student's sampler and steps), else its family's defaults (:mod:`destatic.pipelines.families`).

A request serialises to the JSON stored in every PNG destatic writes (the ``destatic`` text
chunk, beside A1111's ``parameters`` text), so ``destatic generate --from image.png`` is
``GenerationRequest.from_png(path)``: one request per image, with that image's own seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from destatic.bundled import companions, resolve
from destatic.io.hub_cache import is_repo_id

if TYPE_CHECKING:
    from destatic.pipelines.base import PipelineBase

__all__ = ["BEAMS", "CHUNK", "DECODING", "GenerationRequest", "RequestError"]

#: The PNG text chunk holding a request as JSON.
CHUNK = "destatic"
#: A token model's decoding fields (:mod:`destatic.pipelines.tokens`); None = the model's default.
DECODING = ("temperature", "top_k", "top_p", "beams")
#: The beams of ``sampler="beam"`` when ``beams`` is unset.
BEAMS = 4


class RequestError(ValueError):
    """A request that cannot run; the message says what to change."""


# The kinds of the JSON-facing fields, for :meth:`GenerationRequest.from_dict`'s type checks.
_TEXT = (
    "negative_prompt",
    "model",
    "config",
    "tokenizer",
    "vae",
    "motion_adapter",
    "sampler",
    "grid",
)
_INTS = ("steps", "width", "height", "num_images", "num_frames", "top_k", "beams")
_FLOATS = (
    "guidance",
    "hires_scale",
    "hires_strength",
    "guidance_rescale",
    "strength",
    "variation_strength",
    "control_scale",
    "control_start",
    "control_end",
    "seconds",
    "seconds_start",
    "temperature",
    "top_p",
)
_FLAGS = ("keep_unmasked", "control_canny", "vae_tiling")
_SOURCES = ("config", "tokenizer", "vae", "motion_adapter")  # load()'s keywords beside the model
_INPUTS = ("image", "mask", "control_image", "controlnet")  # a path, or an object in memory


@dataclass
class GenerationRequest:
    """Everything that determines a generation (with the model's weights).

    ``prompt`` is one text or a list; ``num_images`` images are drawn per prompt with the
    consecutive seeds ``seed, seed + 1, …`` (or ``seed`` is a list, one per image).
    ``image``/``mask``/``control_image`` are a file path or an image in memory (PIL, array or
    tensor in [0, 1]); ``controlnet`` a folder or a loaded network.
    """

    prompt: str | list[str] = ""
    negative_prompt: str | list[str] = ""
    # sampling: None = the model's default
    steps: int | None = None
    sampler: str | None = None
    grid: str | None = None
    guidance: float | None = None
    guidance_rescale: float = 0.0  # Lin et al. 2024: 0 = off
    guidance_interval: tuple[float, float] | None = None  # guide only for σ in (lo, hi]
    sampler_options: dict[str, Any] = field(default_factory=dict)  # eta, s_noise, …
    # what to draw
    seed: int | list[int] = 0
    num_images: int = 1  # per prompt
    width: int | None = None  # None: the model's size (or the input image's)
    height: int | None = None
    model: str = ""  # the folder it came from ("" = the bundled default model)
    # what a single-file model was built with ("" = none): --config, --tokenizer, --vae
    config: str = ""  # a diffusers folder (or cached repo id) with its configs
    tokenizer: str = ""  # a tokenizer folder
    vae: str = ""  # another autoencoder: a vae/ folder or a .safetensors file
    motion_adapter: str = ""  # a MotionAdapter folder animating an SD 1.x model (AnimateDiff)
    # image → image and inpainting
    image: Any = None
    strength: float = 1.0
    mask: Any = None  # white = repaint
    keep_unmasked: bool = False  # an inpainting model also holds the kept pixels
    # variations (A1111's variation seed)
    variation_seed: int | list[int] | None = None
    variation_strength: float = 0.0
    # structural control
    controlnet: Any = None
    control_image: Any = None
    control_canny: bool = False  # trace Canny edges of control_image first
    control_scale: float = 1.0
    control_start: float = 0.0
    control_end: float = 1.0
    # adapters: [[file or folder, scale], …]
    loras: list[list] = field(default_factory=list)
    # other media: frames of a video model, seconds of an audio model
    num_frames: int | None = None
    seconds: float | None = None  # duration of the audio (None: as long as the model makes)
    seconds_start: float = 0.0  # where it starts in the model's timeline (Stable Audio's)
    # large images: a hires-fix pass (draw, enlarge by hires_scale with Lanczos, then image →
    # image at hires_strength; 1 = off) and a VAE run in overlapping tiles (bounded memory)
    hires_scale: float = 1.0
    hires_strength: float = 0.7
    vae_tiling: bool = False
    # token models (autoregressive / MaskGIT): sampling of the codes; None = the model's default
    temperature: float | None = None  # 0: greedy
    top_k: int | None = None  # keep the k likeliest codes (0: all)
    top_p: float | None = None  # keep the smallest set of codes holding p of the mass (1: all)
    beams: int | None = None  # > 1: beam search (sampler "beam")

    # -- shape of the batch ----------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        """One prompt per image (each repeated ``num_images`` times)."""
        texts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        return [t for t in texts for _ in range(self.num_images)]

    @property
    def negatives(self) -> list[str]:
        """One negative prompt per image."""
        batch = len(self.prompts)
        negative = self.negative_prompt
        texts = [negative] if isinstance(negative, str) else list(negative)
        if len(texts) == 1:
            return texts * batch
        if len(texts) * self.num_images == batch:
            return [t for t in texts for _ in range(self.num_images)]
        raise RequestError(f"got {len(texts)} negative prompts for {batch // self.num_images}")

    @property
    def has_negative(self) -> bool:
        """Whether any image has a non-empty negative prompt."""
        return any(self.negatives)

    @property
    def seeds(self) -> list[int]:
        """One seed per image."""
        return _per_image(self.seed, len(self.prompts), "seeds")

    @property
    def variation_seeds(self) -> list[int] | None:
        if self.variation_seed is None:
            return None
        return _per_image(self.variation_seed, len(self.prompts), "variation seeds")

    def for_image(self, i: int, width: int | None = None, height: int | None = None):
        """The request that draws image ``i`` of this one alone (what its PNG stores)."""
        vseeds = self.variation_seeds
        return dataclasses.replace(
            self,
            prompt=self.prompts[i],
            negative_prompt=self.negatives[i],
            seed=self.seeds[i],
            variation_seed=None if vseeds is None else vseeds[i],
            num_images=1,
            width=width or self.width,
            height=height or self.height,
        )

    def for_images(
        self, sizes: list[tuple[int, int]], default_size: int
    ) -> list[GenerationRequest]:
        """The request of each output image (what its PNG stores), given the images' sizes:
        its own prompt and seed, and the size it was drawn at — the model's ``default_size``
        when unset, and the size before the hires pass when there is one."""
        if self.hires_scale == 1:
            return [self.for_image(i, w, h) for i, (w, h) in enumerate(sizes)]
        w, h = self.width or default_size, self.height or default_size
        return [self.for_image(i, w, h) for i in range(len(sizes))]

    # -- defaults ------------------------------------------------------------------------------
    def with_companions(self) -> GenerationRequest:
        """Routed to the bundled companions of the bundled default model
        (:func:`destatic.bundled.companions`): a masked request goes to its inpainting variant
        (holding the kept pixels), a control image given without a ControlNet gets its
        ControlNet. Other models are left as they are."""
        found = companions(self.model or None)
        routed = self
        if self.mask is not None and "inpaint" in found:
            routed = dataclasses.replace(routed, model=str(found["inpaint"]), keep_unmasked=True)
        if self.control_image is not None and self.controlnet is None and "control" in found:
            routed = dataclasses.replace(routed, controlnet=str(found["control"]))
        return routed

    def canonical(self) -> GenerationRequest:
        """This request with its sampler and grid in destatic's names: an A1111 label such as
        ``"DPM++ 2M Karras"`` becomes ``sampler="dpmpp_2m", grid="karras"``
        (:mod:`destatic.sampling.aliases`); a token model's decoders
        (:data:`destatic.sampling.tokens.DECODERS`) pass through; an unknown name is a
        :class:`RequestError` that lists the valid ones."""
        from destatic.sampling.aliases import resolve_grid, resolve_sampler
        from destatic.sampling.tokens import DECODERS

        try:
            if self.sampler is None or self.sampler in DECODERS:
                sampler, grid = self.sampler, resolve_grid(self.grid)
            else:
                sampler, grid = resolve_sampler(self.sampler, self.grid)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return dataclasses.replace(self, sampler=sampler, grid=grid)

    def resolved(self, pipe: PipelineBase) -> GenerationRequest:
        """This request in canonical names (:meth:`canonical`) with every unset sampling field
        filled: the model folder's stored defaults, else the family's (:attr:`Family.defaults`);
        the grid last falls back to the process's (``karras``, or ``sgm_uniform`` for a flow
        starting at σ = ∞). A token model (one with ``decoding_defaults``) also fills the
        decoding fields, and ``beams`` > 1 is the ``beam`` sampler (``sampler="beam"`` alone
        has :data:`BEAMS`); other models refuse them."""
        d = pipe.sampling_defaults
        r = self.canonical()
        r = dataclasses.replace(
            r,
            steps=int(r.steps if r.steps is not None else d["steps"]),
            sampler=r.sampler or d["sampler"],
            grid=r.grid or d["grid"],
            guidance=float(r.guidance if r.guidance is not None else d["guidance"]),
        )
        decoding = getattr(pipe, "decoding_defaults", None)
        given = [name for name in DECODING if getattr(r, name) is not None]
        if decoding is None:
            if given:
                raise RequestError(f"{given[0]} is for token models; this is a diffusion model")
            return r
        filled = {k: getattr(r, k) if getattr(r, k) is not None else decoding[k] for k in DECODING}
        if self.sampler == "beam" and self.beams is None:
            filled["beams"] = BEAMS
        beams = filled["beams"]  # its type is the pipeline's to check
        sampler = "beam" if isinstance(beams, int) and beams > 1 else r.sampler
        return dataclasses.replace(r, sampler=sampler, **filled)

    # -- the model's sources ------------------------------------------------------------------
    def load_options(self) -> dict[str, str | None]:
        """The keywords of :func:`destatic.pipelines.load` beside the model (``config``,
        ``tokenizer``, ``vae``, ``motion_adapter``) that this request records; unset ones are
        ``None``."""
        return {name: getattr(self, name) or None for name in _SOURCES}

    def check_sources(self, origin: str | Path) -> None:
        """Raise a one-line :class:`RequestError` when a model file or folder this request
        records (``model``, ``config``, ``tokenizer``, ``vae``, ``motion_adapter``; read from
        ``origin``) is gone:
        a bundled name or a repo id of the local cache is left to the loader."""
        for name in ("model", *_SOURCES):
            value = getattr(self, name)
            if value and not _findable(value):
                flag = "--" + name.replace("_", "-")
                raise RequestError(
                    f"{origin} was drawn with {flag} {value}, which is not there any more; "
                    f"put it back, or generate from its prompt with another {flag}"
                )

    # -- JSON and PNG metadata -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form: inputs given as paths keep their path, inputs in memory become
        ``None`` (an uploaded image cannot be stored in the PNG's text)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["sampler_options"] = dict(self.sampler_options)
        for name in _INPUTS:
            value = getattr(self, name)
            out[name] = str(value) if isinstance(value, (str, Path)) else None
        out["loras"] = [[str(p), float(s)] for p, s in self.loras]
        out["seed"] = self.seed if isinstance(self.seed, int) else list(self.seed)
        if self.guidance_interval is not None:
            out["guidance_interval"] = list(self.guidance_interval)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any) -> GenerationRequest:
        """From JSON fields (an HTTP body, a PNG's chunk), with every type checked: unknown
        fields and wrong types are a :class:`RequestError`. ``""`` stands for no input path, as
        in the PNGs of earlier versions."""
        if not isinstance(data, dict):
            raise RequestError("the request must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}; valid: {', '.join(sorted(names))}")
        data = {k: (None if k in _INPUTS and v == "" else v) for k, v in data.items()}
        _check_types(data)
        if isinstance(data.get("guidance_interval"), list):
            data["guidance_interval"] = tuple(data["guidance_interval"])
        data["loras"] = [[str(p), float(s)] for p, s in data.get("loras", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> GenerationRequest:
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, RecursionError) as e:
            if isinstance(e, RequestError):
                raise
            raise RequestError(f"not valid JSON ({e})") from None

    @classmethod
    def from_file(cls, path: str | Path) -> GenerationRequest:
        """The request a file written by ``destatic generate`` was drawn with: a sound's
        (``.wav``, ``.flac``, …) or a video's (``.mp4``, ``.gif``, ``.webp``: the JSON in its
        metadata), else a PNG's (:meth:`from_png`)."""
        from destatic.io.audio import READ_SUFFIXES as SOUNDS
        from destatic.io.audio import read_audio_request
        from destatic.io.video import READ_SUFFIXES as VIDEOS
        from destatic.io.video import read_video_comment

        suffix = Path(path).suffix.lower()
        if suffix in SOUNDS:
            try:
                stored = read_audio_request(path)
            except FileNotFoundError as e:
                raise RequestError(str(e)) from None
            text, what = (None if stored is None else json.dumps(stored)), "sounds"
        elif suffix in VIDEOS:
            text, what = read_video_comment(path), "videos"
        else:
            return cls.from_png(path)
        if text is None:
            raise RequestError(
                f"{path} carries no destatic generation parameters: only {what} written by "
                "destatic generate do"
            )
        try:
            return cls.from_json(text)
        except RequestError as e:
            raise RequestError(f"{path}: its destatic parameters are damaged ({e})") from None

    @classmethod
    def from_png(cls, path: str | Path) -> GenerationRequest:
        """The request a PNG was generated with: destatic's own chunk, else AUTOMATIC1111's
        ``parameters`` text (:meth:`from_a1111`); a :class:`RequestError` otherwise."""
        from destatic.pipelines.inputs import open_image

        info = open_image(path, "RGB").info
        text = info.get(CHUNK)
        if text is None and isinstance(info.get("parameters"), str):
            try:
                return cls.from_a1111(info["parameters"])
            except RequestError as e:
                raise RequestError(f"{path}: its A1111 parameters cannot be used ({e})") from None
        if text is None:
            raise RequestError(
                f"{path} carries no destatic generation parameters (nor A1111's parameters "
                "text): only PNGs written by destatic generate or A1111 do"
            )
        try:
            return cls.from_json(text)
        except RequestError as e:
            raise RequestError(f"{path}: its destatic parameters are damaged ({e})") from None

    @classmethod
    def from_a1111(cls, text: str) -> GenerationRequest:
        """The request an AUTOMATIC1111 ``parameters`` text describes (prompt, negative
        prompt, steps, sampler label and schedule type, CFG scale, seed, size, variation seed,
        hires upscale): sampler and grid in destatic's names (:meth:`canonical`); the model is
        left to the caller (an A1111 model name is no folder here)."""
        from destatic.pipelines.a1111 import parse_parameters, request_fields

        try:
            fields = request_fields(parse_parameters(text))
        except ValueError as e:
            raise RequestError(str(e)) from None
        _check_types(fields)
        return cls(**fields).canonical()

    def a1111(self) -> str:
        """AUTOMATIC1111's ``parameters`` text, which other tools and image viewers show."""
        lines = [self.prompt if isinstance(self.prompt, str) else " | ".join(self.prompt)]
        if self.has_negative:
            lines.append(f"Negative prompt: {self.negatives[0]}")
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.sampler}",
            f"Schedule type: {self.grid or 'default'}",
            f"CFG scale: {self.guidance:g}" if self.guidance is not None else "CFG scale: default",
            f"Seed: {self.seeds[0]}",
        ]
        if self.width and self.height:
            fields.append(f"Size: {self.width}x{self.height}")
        if self.variation_strength:
            fields.append(f"Variation seed: {self.variation_seed}")
            fields.append(f"Variation seed strength: {self.variation_strength:g}")
        if self.image is not None:
            fields.append(f"Denoising strength: {self.strength:g}")
        if self.hires_scale != 1:
            fields.append(f"Denoising strength: {self.hires_strength:g}")
            fields.append(f"Hires upscale: {self.hires_scale:g}")
            fields.append("Hires upscaler: Lanczos")
        if self.vae_tiling:
            fields.append("Tiled VAE: True")
        labels = {
            "temperature": "Temperature",
            "top_k": "Top-k",
            "top_p": "Top-p",
            "beams": "Beams",
        }
        for name, label in labels.items():
            if getattr(self, name) is not None:
                fields.append(f"{label}: {getattr(self, name):g}")
        if self.controlnet is not None:
            name = Path(self.controlnet).name if isinstance(self.controlnet, str) else "controlnet"
            fields.append(
                f"ControlNet: {name} (weight {self.control_scale:g}, "
                f"steps {self.control_start:g}-{self.control_end:g}"
                + (", canny)" if self.control_canny else ")")
            )
        if self.vae:
            fields.append(f"VAE: {Path(self.vae).name}")
        if self.motion_adapter:
            fields.append(f"Motion adapter: {Path(self.motion_adapter).name}")
        if self.loras:
            named = ", ".join(f"{Path(p).stem}:{float(s):g}" for p, s in self.loras)
            fields.append(f"LoRA: {named}")
        fields.append(f"Model: {Path(self.model).name if self.model else 'destatic default'}")
        return "\n".join([*lines, ", ".join(fields)])

    def png_info(self):
        """A ``PIL.PngImagePlugin.PngInfo`` with both chunks; pass it as ``pnginfo=``."""
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_itxt("parameters", self.a1111())
        info.add_itxt(CHUNK, self.to_json())
        return info


def _findable(value: str) -> bool:
    """Whether a recorded source can still be found: an existing path, a bundled model's name
    or an ``org/name`` repo id (which the loader looks up in the local cache)."""
    return resolve(value).exists() or is_repo_id(value)


def _per_image(value: int | list[int], batch: int, name: str) -> list[int]:
    values = list(range(value, value + batch)) if isinstance(value, int) else list(value)
    if len(values) != batch:
        raise RequestError(f"got {len(values)} {name} for {batch} images")
    return values


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _text(name: str, v: Any) -> None:
    if not isinstance(v, str):
        raise RequestError(f"{name} must be text")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{name} is not valid Unicode text (a lone surrogate?)") from None


def _check_types(data: dict[str, Any]) -> None:
    """Raise a :class:`RequestError` naming the first field of the wrong type."""
    for name, v in data.items():
        if name in ("prompt", "negative_prompt") and isinstance(v, list):
            for item in v:
                _text(name, item)
        elif name == "prompt" or (name in _TEXT and v is not None):
            _text(name, v)
        elif name in _INTS and v is not None and not _is_int(v):
            raise RequestError(f"{name} must be an integer")
        elif name in _FLOATS and v is not None and not _is_number(v):
            raise RequestError(f"{name} must be a finite number")
        elif name in _FLAGS and not isinstance(v, bool):
            raise RequestError(f"{name} must be true or false")
        elif name in ("seed", "variation_seed") and v is not None:
            if not (_is_int(v) or (isinstance(v, list) and v and all(map(_is_int, v)))):
                raise RequestError(f"{name} must be an integer or a list of integers")
        elif name == "guidance_interval" and v is not None:
            ok = isinstance(v, (list, tuple)) and len(v) == 2
            if not ok or not all(_is_number(x) or x == math.inf for x in v):
                raise RequestError(f"{name} must be two numbers [low, high] (σ)")
        elif name == "loras" and not _lora_list(v):
            raise RequestError("loras must be a list of [path, scale] pairs")
        elif name == "sampler_options" and not isinstance(v, dict):
            raise RequestError("sampler_options must be an object")


def _lora_list(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str) and _is_number(x[1])
        for x in v
    )
