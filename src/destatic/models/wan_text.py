"""The text encoder of Wan 2.1: UMT5-XXL's encoder (Chung et al. 2023, "UniMax: Fairer and
More Effective Language Sampling for Large-Scale Multilingual Pretraining"), as diffusers'
``WanPipeline._get_t5_prompt_embeds`` runs it.

Prompts are tidied (HTML entities unescaped twice, runs of white space made one space; diffusers
also runs ``ftfy.fix_text`` when ftfy is installed, destatic does not), padded to 512 tokens
with the padding masked in UMT5's attention, and the states of the padding set to zero: the
transformer attends to all 512 tokens, with no mask of its own.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from destatic.models.clip_vision import CLIPImageEncoder
from destatic.models.text import _WEIGHTS, T5TextEncoder, TextEmbedding, _check_dir, _load_local

__all__ = ["WAN_TOKENS", "UMT5TextEncoder", "WanImagePromptEncoder", "clean_prompt"]

#: diffusers' WanPipeline ``max_sequence_length``
WAN_TOKENS = 512


def clean_prompt(text: str) -> str:
    """diffusers' ``prompt_clean`` without ftfy: HTML unescaped twice, white space collapsed."""
    return " ".join(html.unescape(html.unescape(text)).split())


class UMT5TextEncoder(T5TextEncoder):
    """One UMT5 encoder over ``max_sequence_length`` (512) tokens; padding states are zero and
    ``mask`` marks the real tokens; no pooled vector."""

    def __init__(self, model, tokenizer, max_sequence_length: int = WAN_TOKENS):
        super().__init__(model, tokenizer, max_sequence_length)

    @classmethod
    def from_folders(
        cls,
        folder: str | Path,
        *,
        max_sequence_length: int = WAN_TOKENS,
        torch_dtype: torch.dtype | None = None,
    ) -> UMT5TextEncoder:
        """Load ``text_encoder`` (``UMT5EncoderModel``) and ``tokenizer`` from a diffusers
        pipeline folder, with ``local_files_only=True`` only."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = Path(folder)
        model_dir = _check_dir(folder / "text_encoder", "UMT5 text encoder", _WEIGHTS)
        tokenizer_dir = _check_dir(
            folder / "tokenizer", "UMT5 tokenizer", [["tokenizer.json"], ["spiece.model"]]
        )
        model, tokenizer = _load_local(
            UMT5EncoderModel, model_dir, AutoTokenizer, tokenizer_dir, torch_dtype
        )
        return cls(model, tokenizer, max_sequence_length)

    def _encode(self, prompts: list[str]) -> TextEmbedding:
        embedding = super()._encode([clean_prompt(p) for p in prompts])
        tokens = embedding.tokens * embedding.mask[..., None].to(embedding.tokens.dtype)
        return TextEmbedding(tokens=tokens, pooled=embedding.pooled, mask=embedding.mask)


class WanImagePromptEncoder(UMT5TextEncoder):
    """Wan 2.1 image→video's prompt encoders: UMT5 for the text (as :class:`UMT5TextEncoder`)
    and ``image_encoder``, CLIP's vision tower for the image prompt
    (:class:`~destatic.models.clip_vision.CLIPImageEncoder`; None for an image→video network
    that reads no CLIP tokens)."""

    def __init__(
        self,
        model,
        tokenizer,
        image_encoder: CLIPImageEncoder | None,
        max_sequence_length: int = WAN_TOKENS,
    ):
        super().__init__(model, tokenizer, max_sequence_length)
        self.image_encoder = image_encoder
