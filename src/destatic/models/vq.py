"""The VQ image tokenizer: a convolutional autoencoder whose latent is a grid of codebook indices.

VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning") and VQGAN (Esser et
al. 2021, "Taming Transformers for High-Resolution Image Synthesis"): an encoder maps an image
x ∈ [-1, 1]^{C×H×W} to a grid of vectors z = E(x) ∈ R^{D×h×w} (h = H/f, w = W/f,
f = 2^(levels−1)); each vector is replaced by its nearest row of a codebook e ∈ R^{K×D},

    k(i, j) = argmin_k ‖z_{:, i, j} − e_k‖₂,        z_q = e_{k(i, j)},

and a decoder maps z_q back to pixels, x̂ = G(z_q). The image is then the token grid k ∈
{0 … K−1}^{h×w} that an autoregressive or masked transformer models. Training (the codebook by
EMA k-means, the encoder through the straight-through estimator) is
:mod:`destatic.training.tasks.tokenizer`.

Attribute names match diffusers' ``VQModel`` (``encoder.*``, ``quant_conv``,
``quantize.embedding.weight``, ``post_quant_conv``, ``decoder.*``), so its folders load with
``load_state_dict(strict=True)``; the encoder and decoder are the KL autoencoder's
(:mod:`destatic.models.autoencoder`), the encoder without the doubled (mean, log-variance) output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from destatic.models.autoencoder import Decoder, Encoder, check_vae_blocks
from destatic.models.config import (
    JsonConfig,
    check_divides,
    check_positive,
    check_positive_float,
    check_sample_size,
)

__all__ = ["VQConfig", "VQModel", "VectorQuantizer"]


@dataclasses.dataclass
class VQConfig(JsonConfig):
    """Hyper-parameters of the tokenizer, with diffusers' ``VQModel`` field names and defaults.

    ``vq_embed_dim`` (D, the code width) defaults to ``latent_channels``; a 1×1 ``quant_conv``
    maps the encoder's ``latent_channels`` to D and ``post_quant_conv`` maps back. Only
    ``norm_type = "group"`` is supported (diffusers' ``"spatial"`` conditions the decoder's norms
    on z_q, MoVQ).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 3
    sample_size: int = 32
    num_vq_embeddings: int = 256
    norm_num_groups: int = 32
    vq_embed_dim: int | None = None
    scaling_factor: float = 0.18215
    norm_type: str = "group"
    mid_block_add_attention: bool = True
    lookup_from_codebook: bool = False
    force_upcast: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # diffusers' "_..." keys

    def __post_init__(self) -> None:
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        check_vae_blocks(self)
        if self.norm_type != "group":
            raise ValueError(f"unsupported VQModel norm_type {self.norm_type!r} (only 'group')")
        if self.act_fn != "silu":
            raise ValueError(f"unsupported VQModel act_fn {self.act_fn!r} (only 'silu')")

    @property
    def code_dim(self) -> int:
        """D, the width of a codebook row."""
        return self.latent_channels if self.vq_embed_dim is None else self.vq_embed_dim

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working tokenizer."""
        check_positive(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            latent_channels=self.latent_channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            num_vq_embeddings=self.num_vq_embeddings,
            vq_embed_dim=self.vq_embed_dim,
        )
        check_positive_float(scaling_factor=self.scaling_factor)
        check_sample_size(self.sample_size)
        check_divides(
            "norm_num_groups", self.norm_num_groups, "block_out_channels", self.block_out_channels
        )

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> VQConfig:
        """Read a diffusers ``VQModel`` config.json dict (a ValueError names an unsupported
        option)."""
        cfg, private = cls._read_diffusers(cfg, {}, "VQModel")
        config = cls(**cfg, extra=private)
        config.validate()
        return config


class VectorQuantizer(nn.Module):
    """The codebook e ∈ R^{K×D} (``embedding.weight``) and the nearest-row lookup.

    Rows start uniform in [−1/K, 1/K] (as diffusers and taming-transformers initialise them).
    """

    def __init__(self, num_codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Codes [N] of vectors ``flat`` [N, D]: argmin_k ‖z − e_k‖₂ (the first k on ties)."""
        weight = self.embedding.weight.to(flat.dtype)
        return torch.cdist(flat, weight).argmin(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, D, h, w] → (z_q = e_k [B, D, h, w], codes k [B, h, w] long)."""
        b, d, h, w = z.shape
        codes = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)
        return self.lookup(codes).to(z.dtype), codes

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] → codebook rows as a latent [B, D, h, w]."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """Image tokenizer (VQ-VAE / VQGAN) with diffusers' ``VQModel`` keys (module doc).

    ``encode`` → ``quantize_latents`` → ``decode_latents`` is diffusers' ``VQModel.forward``;
    ``codes_from_images`` / ``images_from_codes`` are the token interface.
    """

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        lat, dim = config.latent_channels, config.code_dim
        self.encoder = Encoder(config, double_z=False)  # type: ignore[arg-type]
        self.quant_conv = nn.Conv2d(lat, dim, 1)
        self.quantize = VectorQuantizer(config.num_vq_embeddings, dim)
        self.post_quant_conv = nn.Conv2d(dim, lat, 1)
        self.decoder = Decoder(config)  # type: ignore[arg-type]

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side: f = 2^(levels − 1)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def num_codes(self) -> int:
        """K, the codebook size (the image vocabulary)."""
        return self.config.num_vq_embeddings

    @property
    def code_dim(self) -> int:
        """D, the width of a codebook row."""
        return self.config.code_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C_in, H, W] in [-1, 1] → z = quant_conv(E(x)) [B, D, H/f, W/f], before
        quantisation (diffusers' ``encode().latents``)."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"the tokenizer takes images [B, {self.config.in_channels}, H, W], "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not a multiple of the tokenizer's factor {f}"
            )
        return self.quant_conv(self.encoder(x))

    def quantize_latents(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, D, h, w] → (z_q, codes [B, h, w] long): each vector's nearest codebook row
        by Euclidean distance (the first on ties, as diffusers' argmin)."""
        if z.ndim != 4 or z.shape[1] != self.code_dim:
            raise ValueError(
                f"latents must be [B, {self.code_dim}, h, w], got shape {tuple(z.shape)}"
            )
        return self.quantize(z)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents [B, D, h, w] → images [B, C_out, h·f, w·f] in about [-1, 1]:
        G(post_quant_conv(z_q)) (diffusers' ``decode(z_q, force_not_quantize=True)``)."""
        return self.decoder(self.post_quant_conv(z_q))

    def codes_from_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C_in, H, W] in [-1, 1] → token grid [B, H/f, W/f] long."""
        return self.quantize_latents(self.encode(x))[1]

    def images_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Token grid [B, h, w] (integers in [0, K)) → images [B, C_out, h·f, w·f]."""
        if codes.ndim != 3 or codes.is_floating_point() or codes.is_complex():
            raise ValueError(
                f"codes must be an integer tensor [B, h, w], got {codes.dtype} "
                f"of shape {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(
                f"codes must lie in [0, {self.num_codes}), got "
                f"{int(codes.min())} … {int(codes.max())}"
            )
        z_q = self.quantize.lookup(codes.long())
        return self.decode_latents(z_q.to(self.post_quant_conv.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction G(z_q(E(x))) (diffusers' ``VQModel(x).sample``)."""
        return self.decode_latents(self.quantize_latents(self.encode(x))[0])
