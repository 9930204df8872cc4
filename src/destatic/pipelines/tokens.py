"""Token models: text → the codes of a VQ tokenizer → an image, with no noise and no σ.

A :class:`TokenPipeline` is a VQ tokenizer (``VQModel``: an image is an ``h × w`` grid of
codebook indices, van den Oord et al. 2017), a ``TokenTransformer`` that predicts those codes
from MiniLM text tokens, and one of the decoders of :mod:`destatic.sampling.tokens`:

* a causal transformer draws code after code, ``p(c_i | text, c_<i)`` (LlamaGen; Sun et al.
  2024), by sampling (``temperature``, ``top_k``, ``top_p``) or by beam search (``beams`` > 1:
  the sequence of highest summed log-probability);
* a bidirectional one fills a fully masked grid in ``steps`` passes, keeping the most confident
  codes on a cosine schedule (MaskGIT; Chang et al. 2022).

Classifier-free guidance acts on the logits, ``ℓ = ℓ_u + w·(ℓ_c − ℓ_u)``, the unconditional
stream reading the negative prompt (empty by default); w = 1 runs no unconditional pass.

A *hybrid* model also names a diffusion ``refiner`` (``destatic_refiner`` in
``model_index.json``): the decoded images are redrawn image → image at the refiner's
``strength`` with the same prompts and seeds — the transformer lays the picture out, diffusion
paints the detail.

The surface is :class:`~destatic.pipelines.Pipeline`'s (``run``, ``generate``, ``__call__``,
``to``, ``sampling_defaults``, …), so the CLI, the server and the metrics take either.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.io import CheckpointError
from destatic.models.registry import load_component, save_component, saved_as
from destatic.models.text import MiniLMTextEncoder
from destatic.pipelines.families import TOKEN_PIPELINE, TOKENS, Family
from destatic.pipelines.pipeline import to_pil
from destatic.pipelines.request import DECODING, GenerationRequest

__all__ = [
    "DECODING_DEFAULTS",
    "TAKES",
    "TokenPipeline",
    "check_decoding",
    "load_tokens",
    "save_tokens",
]

#: What a request leaves unset takes these (unless the folder's ``destatic_defaults`` says).
DECODING_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "beams": 1}
#: The refiner's settings a hybrid folder stores beside its model.
REFINE_KEYS = ("strength", "steps", "sampler", "guidance")
#: What a token model takes (the one line for everything else).
TAKES = (
    "token models take prompts, negative prompts, seeds, guidance, steps (MaskGIT passes), "
    "temperature, top_k, top_p and beams"
)
_RUN_OPTIONS = {"callback", "progress", "preview"}
_REQUEST_FIELDS = {f.name for f in dataclasses.fields(GenerationRequest)}


def check_decoding(r: GenerationRequest, num_codes: int | None = None) -> None:
    """A one-line ValueError unless the decoding fields are valid: temperature ≥ 0 (0 =
    greedy), 0 ≤ top_k (≤ the vocabulary; 0 = off), 0 < top_p ≤ 1, beams ≥ 1 (unset fields
    pass)."""
    number = (int, float)
    checks = {
        "temperature": (number, lambda v: v >= 0, "≥ 0 (0: greedy)"),
        "top_k": (int, lambda v: v >= 0, "an integer ≥ 0 (0: off)"),
        "top_p": (number, lambda v: 0 < v <= 1, "in (0, 1] (1: off)"),
        "beams": (int, lambda v: v >= 1, "an integer ≥ 1"),
    }
    for name, (kind, ok, want) in checks.items():
        v = getattr(r, name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v) or not ok(v):
            raise ValueError(f"{name} = {v!r}: must be {want}")
    if num_codes is not None and r.top_k is not None and r.top_k > num_codes:
        raise ValueError(f"top_k = {r.top_k} is more than the model's {num_codes} codes")


@dataclass
class TokenPipeline:
    """A VQ tokenizer, a token transformer and MiniLM text (see the module docstring)."""

    tokenizer: nn.Module  # destatic.models.vq.VQModel
    transformer: nn.Module  # destatic.models.token_transformer.TokenTransformer
    text_encoder: MiniLMTextEncoder
    defaults: dict = field(default_factory=dict)  # sampling and decoding defaults
    refiner: Any = None  # a diffusion Pipeline redrawing the images (hybrid), or None
    refine: dict = field(default_factory=dict)  # its "model", "strength", "steps", …
    family: Family = TOKENS

    @classmethod
    def from_parts(
        cls,
        tokenizer: nn.Module,
        transformer: nn.Module,
        text_encoder: MiniLMTextEncoder,
        defaults: Mapping[str, Any] | None = None,
    ) -> TokenPipeline:
        """A token pipeline from its networks (what the training tasks export), checked."""
        pipe = cls(tokenizer, transformer, text_encoder, dict(defaults or {}))
        pipe.check_parts()
        return pipe

    # -- what the model is -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def media(self) -> str:
        return self.family.media

    @property
    def grid_size(self) -> int:
        """Codes per side of the image."""
        return int(self.transformer.config.grid_size)

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def bidirectional(self) -> bool:
        """Whether the transformer fills masked codes (MaskGIT) rather than predicting the next."""
        return not bool(self.transformer.config.causal)

    @property
    def default_size(self) -> int:
        """The one size the model draws: its grid of codes × the tokenizer's factor."""
        return self.grid_size * int(self.tokenizer.downsample_factor)

    @property
    def size_multiple(self) -> int:
        return self.default_size

    @property
    def sampling_defaults(self) -> dict:
        """What fills a request's unset ``steps``, ``sampler``, ``grid`` and ``guidance``: the
        folder's ``destatic_defaults`` over the family's; the sampler is the decoder the
        transformer is made for, and an autoregressive model's steps are its tokens."""
        d = {**self.family.defaults, **self.defaults}
        sampler = d["sampler"] if d["sampler"] in self.decoders else self.decoders[0]
        steps = int(d["steps"]) if self.bidirectional else self.num_tokens
        return {"steps": steps, "sampler": sampler, "grid": None, "guidance": float(d["guidance"])}

    @property
    def decoders(self) -> tuple[str, ...]:
        """The decoders the transformer is made for (the first is the default)."""
        return ("maskgit",) if self.bidirectional else ("autoregressive", "beam")

    @property
    def decoding_defaults(self) -> dict:
        """What fills a request's unset ``temperature``, ``top_k``, ``top_p`` and ``beams``."""
        return {k: self.defaults.get(k, v) for k, v in DECODING_DEFAULTS.items()}

    def check_parts(self) -> None:
        """A one-line ValueError when the networks do not fit together."""
        cfg, text = self.transformer.config, self.text_encoder
        pairs = [
            (
                "num_codes",
                int(cfg.num_codes),
                "the tokenizer's codes",
                int(self.tokenizer.num_codes),
            ),
            ("context_dim", int(cfg.context_dim), "the text encoder's width", int(text.dim)),
            ("context_length", int(cfg.context_length), "its tokens", int(text.max_length)),
        ]
        for name, own, what, other in pairs:
            if own != other:
                raise ValueError(f"the transformer's {name} is {own} but {what} are {other}")
        if self.refiner is not None and self.refiner.media != "image":
            raise ValueError(f"the refiner must draw images, not {self.refiner.media}")

    def check_request(self, r: GenerationRequest) -> None:
        """A one-line ValueError for what a token model cannot do with a resolved request."""
        unused = {
            "image": r.image is not None or r.strength != 1,
            "mask": r.mask is not None,
            "controlnet": r.controlnet is not None or r.control_image is not None,
            "loras": bool(r.loras),
            "hires_scale": r.hires_scale != 1,
            "variation_strength": bool(r.variation_strength),
            "num_frames": r.num_frames is not None,
            "seconds": r.seconds is not None or r.seconds_start != 0,
            "grid": r.grid is not None,
            "guidance_rescale": bool(r.guidance_rescale) or r.guidance_interval is not None,
            "sampler_options": bool(r.sampler_options),
            "vae_tiling": r.vae_tiling,
        }
        wrong = [name for name, given in unused.items() if given]
        if wrong:
            raise ValueError(f"{wrong[0]} is for diffusion models; {TAKES}")
        side = self.default_size
        if (r.width or side, r.height or side) != (side, side):
            raise ValueError(
                f"this token model draws {side}×{side} images only ({self.grid_size}² codes); "
                f"asked for {r.width or side}×{r.height or side}"
            )
        check_decoding(r, int(self.tokenizer.num_codes))
        self._check_decoder(r)

    def _check_decoder(self, r: GenerationRequest) -> None:
        if r.sampler not in self.decoders:
            kind = "a bidirectional (MaskGIT)" if self.bidirectional else "a causal"
            raise ValueError(
                f"sampler {r.sampler!r}: this is {kind} token model; use {', '.join(self.decoders)}"
            )
        if self.bidirectional and r.beams != 1:
            raise ValueError("beams is for autoregressive token models; this one is MaskGIT")
        if not self.bidirectional and r.steps != self.num_tokens:
            raise ValueError(
                f"steps = {r.steps}: an autoregressive model draws its {self.num_tokens} codes "
                "one by one; steps are MaskGIT's passes (leave it unset)"
            )
        if not 0 <= r.guidance < 1e3:
            raise ValueError(f"guidance = {r.guidance:g}: must be ≥ 0")

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self,
        request: GenerationRequest,
        *,
        callback: Callable[..., None] | None = None,
        progress: bool = False,
        preview: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] for ``request``: codes from the decoder the request
        resolves to (:meth:`codes`), decoded by the tokenizer, then redrawn by the refiner of a
        hybrid model. ``callback`` sees each step of the decoder; ``progress`` shows a bar;
        ``preview(i, images)`` receives the images once (a token model has no estimate of the
        image before its last code)."""
        r = request.resolved(self)
        self.check_request(r)
        codes = self.codes(r, callback=callback, progress=progress)
        images = self.images_from_codes(codes)
        if self.refiner is not None:
            images = self.refiner.run(self.refine_request(r, images), progress=progress)
        if preview is not None:
            preview(0, images)
        return images

    def context(self, prompts: list[str]) -> torch.Tensor:
        """The text tokens [B, L, C] the transformer reads, on its device and in its dtype."""
        return self.text_encoder.encode(prompts).tokens.to(self.device, self.dtype)

    def codes(
        self, r: GenerationRequest, *, callback: Callable | None = None, progress: bool = False
    ) -> torch.Tensor:
        """The codes [B, N] a resolved request draws: each image from its own seed, so an image
        is the same alone or in a batch. ``callback(i, codes)`` sees the codes after step i
        (unknown ones: the transformer's ``mask_id``)."""
        from tqdm.auto import tqdm

        from destatic.sampling.noise import generators
        from destatic.sampling.tokens import autoregressive, beam_search, maskgit

        context = self.context(r.prompts)
        uncond = None if r.guidance == 1 else self.context(r.negatives)
        total = r.steps if r.sampler == "maskgit" else self.num_tokens
        bar = tqdm(total=total, desc="decoding", unit="step", disable=not progress)

        def report(i: int, codes: torch.Tensor) -> None:
            bar.update()
            if callback is not None:
                callback(i, codes)

        common = {"guidance": float(r.guidance), "callback": report}
        sampling = {
            "temperature": float(r.temperature),
            "top_k": int(r.top_k),
            "top_p": float(r.top_p),
            "generators": generators(r.seeds),
        }
        with bar:
            if r.sampler == "beam":
                return beam_search(self.transformer, context, uncond, beams=r.beams, **common)
            if r.sampler == "maskgit":
                steps = int(r.steps)
                return maskgit(self.transformer, context, uncond, steps=steps, **common, **sampling)
            return autoregressive(self.transformer, context, uncond, **common, **sampling)

    def images_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, N] (or [B, h, w]) → images [B, 3, H, W] in [0, 1] (float32)."""
        grid = codes.reshape(len(codes), self.grid_size, self.grid_size)
        device = next(self.tokenizer.parameters()).device
        images = self.tokenizer.images_from_codes(grid.to(device))
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def refine_request(self, r: GenerationRequest, images: torch.Tensor) -> GenerationRequest:
        """The refiner's image → image request on the decoded ``images``: the same prompts,
        negative prompts and seeds at the folder's strength, steps, sampler and guidance."""
        settings = {k: self.refine[k] for k in REFINE_KEYS if self.refine.get(k) is not None}
        return GenerationRequest(
            prompt=r.prompts,
            negative_prompt=r.negatives,
            seed=r.seeds,
            image=images,
            **settings,
        )

    def generate(self, prompt: str | Sequence[str], **kwargs) -> torch.Tensor:
        """:meth:`run` on a request built from keywords (every :class:`GenerationRequest`
        field, and :meth:`run`'s ``callback``, ``progress`` and ``preview``)."""
        run = {k: kwargs.pop(k) for k in list(kwargs) if k in _RUN_OPTIONS}
        unknown = sorted(set(kwargs) - _REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"unknown keyword(s) {unknown}; {TAKES}")
        prompt = prompt if isinstance(prompt, str) else list(prompt)
        return self.run(GenerationRequest(prompt=prompt, **kwargs), **run)

    def __call__(self, prompt: str | Sequence[str], **kwargs) -> list:
        """:meth:`generate` as a list of ``PIL.Image``."""
        return to_pil(self.generate(prompt, **kwargs))

    def to(
        self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> TokenPipeline:
        """Move every component (the refiner too) to ``device`` and cast it to ``dtype`` (names
        as ``--device``/``--dtype``; None: unchanged). Returns the pipeline."""
        from destatic.pipelines.devices import pick_device, pick_dtype, upcast_dtype

        if device is not None:
            device, _ = pick_device(device, "fp32")
        if dtype is not None:
            dtype = pick_dtype(dtype, device or self.device)
        self.transformer.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        self.tokenizer.to(device=device, dtype=upcast_dtype(self.tokenizer.config, dtype))
        if self.refiner is not None:
            self.refiner.to(device, dtype)
        return self


# -- folders ---------------------------------------------------------------------------------------
def _stored_defaults(defaults: Any, where: Path) -> dict:
    """``destatic_defaults`` of a token folder, checked (one line naming the bad key)."""
    from destatic.sampling.tokens import DECODERS

    if not isinstance(defaults, dict):
        raise CheckpointError(f"{where}: destatic_defaults must be an object")
    unknown = sorted(set(defaults) - {"steps", "sampler", "guidance", *DECODING})
    if unknown:
        raise CheckpointError(f"{where}: destatic_defaults has unknown key(s) {unknown}")
    steps, sampler = defaults.get("steps", 1), defaults.get("sampler", DECODERS[0])
    guidance = defaults.get("guidance", 1.0)
    if type(steps) is not int or not 1 <= steps <= 10_000:
        raise CheckpointError(f"{where}: destatic_defaults.steps must be an integer 1 … 10000")
    if sampler not in DECODERS:
        raise CheckpointError(f"{where}: destatic_defaults.sampler must be one of {DECODERS}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
        raise CheckpointError(f"{where}: destatic_defaults.guidance must be a number ≥ 0")
    try:
        check_decoding(GenerationRequest(**{k: defaults[k] for k in DECODING if k in defaults}))
    except ValueError as e:
        raise CheckpointError(f"{where}: destatic_defaults: {e}") from None
    return dict(defaults)


def _refine_settings(spec: Any, where: Path) -> dict:
    """``destatic_refiner`` of a hybrid folder, checked: a model name or path and its
    image → image settings."""
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str) or not spec["model"]:
        raise CheckpointError(f"{where}: destatic_refiner must be an object with a 'model' name")
    unknown = sorted(set(spec) - {"model", *REFINE_KEYS})
    if unknown:
        raise CheckpointError(f"{where}: destatic_refiner has unknown key(s) {unknown}")
    try:
        request = GenerationRequest.from_dict({k: v for k, v in spec.items() if k != "model"})
    except ValueError as e:
        raise CheckpointError(f"{where}: destatic_refiner: {e}") from None
    if not 0 < request.strength <= 1:
        raise CheckpointError(f"{where}: destatic_refiner.strength must be in (0, 1]")
    return dict(spec)


def load_tokens(
    folder: Path, index: Mapping[str, Any], load_refiner: Callable[[str], Any]
) -> TokenPipeline:
    """The :class:`TokenPipeline` of a ``DestaticTokenPipeline`` folder (its
    ``model_index.json`` is ``index``); ``load_refiner(name)`` loads a hybrid's refiner (a
    bundled name, or a path, relative ones from ``folder``)."""
    where = folder / "model_index.json"
    for key in TOKENS.required:
        if key not in index:
            raise CheckpointError(f"{where} names no {key!r} component")
    tokenizer = load_component(folder / "tokenizer")
    transformer = load_component(folder / "transformer")
    text_encoder = TOKENS.text_encoder(folder, index, transformer)
    defaults = _stored_defaults(index.get("destatic_defaults", {}), where)
    pipe = TokenPipeline(tokenizer, transformer, text_encoder, defaults)
    spec = index.get("destatic_refiner")
    if spec is not None:
        pipe.refine = _refine_settings(spec, where)
        name = pipe.refine["model"]
        local = folder / name
        pipe.refiner = load_refiner(str(local) if local.exists() else name)
    try:
        pipe.check_parts()
        if "sampler" in defaults and defaults["sampler"] not in pipe.decoders:
            raise ValueError(f"destatic_defaults.sampler must be one of {pipe.decoders}")
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return pipe


def save_tokens(pipe: TokenPipeline, folder: str | Path, *, half: bool = False) -> None:
    """Write ``pipe`` as a ``DestaticTokenPipeline`` folder (``half``: fp16 networks). A hybrid
    stores its refiner by the name in ``pipe.refine["model"]`` (save the refiner itself
    there first)."""
    if pipe.refiner is not None and not pipe.refine.get("model"):
        raise ValueError("a hybrid model saves its refiner by name: set refine['model'] first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": TOKEN_PIPELINE}
    dtype = torch.float16 if half else None
    for module in (pipe.tokenizer, pipe.transformer):
        key, name = saved_as(module)
        config = module.config.to_dict()
        save_component(module, folder / key, class_name=name, config=config, dtype=dtype)
        index[key] = ["destatic", name]
    index.update(pipe.family.save_text_encoder(pipe.text_encoder, folder))
    if pipe.defaults:
        index["destatic_defaults"] = dict(pipe.defaults)
    if pipe.refine:
        index["destatic_refiner"] = dict(pipe.refine)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
