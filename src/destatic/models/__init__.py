"""Denoising networks and their building blocks (docs/architecture.md, "Layers")."""

from destatic.models.attention import (
    Attention,
    BasicTransformerBlock,
    FeedForward,
    SpatialTransformer,
)
from destatic.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from destatic.models.layers import (
    Downsample,
    ResnetBlock,
    TimestepEmbedding,
    Upsample,
    timestep_embedding,
)
from destatic.models.mmdit import MMDIT_MODELS, MMDiT, MMDiTConfig
from destatic.models.oobleck import AutoencoderOobleck, OobleckConfig
from destatic.models.speedups import fuse_projections, optimize, unfuse_projections
from destatic.models.stable_audio import (
    StableAudioDiT,
    StableAudioDiTConfig,
    StableAudioProjection,
    StableAudioProjectionConfig,
)
from destatic.models.text import (
    CLIPTextEncoder,
    MiniLMTextEncoder,
    SD3TextEncoder,
    SDXLTextEncoder,
    TextEmbedding,
    TextEncoder,
)
from destatic.models.token_transformer import KVCache, TokenTransformer, TokenTransformerConfig
from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.models.video_dit import VIDEO_DIT_MODELS, VideoDiT, VideoDiTConfig
from destatic.models.vq import VQConfig, VQModel
from destatic.models.wan import WanConfig, WanTransformer3DModel
from destatic.models.wan_vae import AutoencoderKLWan, WanVAEConfig

__all__ = [
    "MMDIT_MODELS",
    "VIDEO_DIT_MODELS",
    "Attention",
    "AutoencoderConfig",
    "AutoencoderKL",
    "AutoencoderKLWan",
    "AutoencoderOobleck",
    "BasicTransformerBlock",
    "CLIPTextEncoder",
    "DiagonalGaussian",
    "Downsample",
    "FeedForward",
    "KVCache",
    "MMDiT",
    "MMDiTConfig",
    "MiniLMTextEncoder",
    "OobleckConfig",
    "ResnetBlock",
    "SD3TextEncoder",
    "SDXLTextEncoder",
    "SpatialTransformer",
    "StableAudioDiT",
    "StableAudioDiTConfig",
    "StableAudioProjection",
    "StableAudioProjectionConfig",
    "TextEmbedding",
    "TextEncoder",
    "TimestepEmbedding",
    "TokenTransformer",
    "TokenTransformerConfig",
    "UNet2DCondition",
    "UNetConfig",
    "Upsample",
    "VQConfig",
    "VQModel",
    "VideoDiT",
    "VideoDiTConfig",
    "WanConfig",
    "WanTransformer3DModel",
    "WanVAEConfig",
    "fuse_projections",
    "optimize",
    "timestep_embedding",
    "unfuse_projections",
]
