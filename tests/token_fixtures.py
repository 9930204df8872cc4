"""Tiny token models with random weights for the token pipeline, CLI and server tests: a VQ
tokenizer (8 codes per side, 2× down: 16×16 images), a one-block token transformer, MiniLM
from its package."""

from __future__ import annotations

from pathlib import Path

import torch

from destatic.models.text import MiniLMTextEncoder
from destatic.models.token_transformer import TokenTransformer, TokenTransformerConfig
from destatic.models.vq import VQConfig, VQModel
from destatic.pipelines import TokenPipeline, save

TEXT_LENGTH = 8
CODES = 32
GRID = 8
SIDE = 16  # GRID × the tokenizer's factor 2


def tiny_tokenizer(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    config = VQConfig(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        latent_channels=4,
        num_vq_embeddings=CODES,
        sample_size=SIDE,
    )
    tokenizer = VQModel(config)
    with torch.no_grad():  # a codebook spread wide enough that codes draw different pixels
        tokenizer.quantize.embedding.weight.normal_(0, 2)
    return tokenizer.eval()


def tiny_token_pipeline(
    seed: int = 0, *, causal: bool = True, defaults: dict | None = None
) -> TokenPipeline:
    """A random token model drawing 16×16 images (autoregressive, or MaskGIT unless
    ``causal``)."""
    encoder = MiniLMTextEncoder.from_package(max_length=TEXT_LENGTH)
    tokenizer = tiny_tokenizer(seed)
    torch.manual_seed(seed + 1)
    config = TokenTransformerConfig(
        num_codes=CODES,
        grid_size=GRID,
        context_dim=encoder.dim,
        context_length=TEXT_LENGTH,
        width=32,
        layers=1,
        heads=2,
        causal=causal,
    )
    transformer = TokenTransformer(config)
    with torch.no_grad():  # logits far enough apart that the text and the seed matter
        transformer.output.weight.mul_(20)
    return TokenPipeline.from_parts(tokenizer, transformer.eval(), encoder, defaults or {})


def tiny_token_folder(folder: Path, **options) -> Path:
    """:func:`tiny_token_pipeline` saved with :func:`destatic.pipelines.save`."""
    save(tiny_token_pipeline(**options), folder)
    return folder
