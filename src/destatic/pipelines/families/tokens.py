"""destatic's token models: a VQ tokenizer (``VQModel``) whose codes a ``TokenTransformer`` on
MiniLM text predicts — next token by next token (LlamaGen; Sun et al. 2024) or all at once in a
few masked passes (MaskGIT; Chang et al. 2022). No noise process: the family only says which
folders are token models (``model_index.json``'s ``_class_name`` ``DestaticTokenPipeline``),
how their text encoder loads and saves (as destatic's own models: MiniLM from its package) and
their defaults. :mod:`destatic.pipelines.tokens` loads and runs them."""

from __future__ import annotations

from destatic.pipelines.families.base import Family, register_family
from destatic.pipelines.families.own import _save_text_encoder, _text_encoder

__all__ = ["TOKENS", "TOKEN_PIPELINE"]

#: ``model_index.json``'s ``_class_name`` of a token model's folder.
TOKEN_PIPELINE = "DestaticTokenPipeline"

TOKENS = register_family(
    Family(
        name="destatic-tokens",
        description="destatic's VQ-token transformer (autoregressive or MaskGIT) on MiniLM text",
        matches=lambda index: index.get("_class_name") == TOKEN_PIPELINE,
        text_encoder=_text_encoder,
        # steps: MaskGIT's passes (an autoregressive model draws one token per call); guidance
        # scales the logits (LlamaGen's classifier-free guidance)
        defaults={"steps": 8, "sampler": "autoregressive", "guidance": 3.0},
        required=("tokenizer", "transformer", "text_encoder"),
        save_text_encoder=_save_text_encoder,
    )
)
