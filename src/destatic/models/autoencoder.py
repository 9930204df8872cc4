"""The Stable Diffusion KL autoencoder (SD 1.x/2.x VAE), written as a plain torch module.

The first stage of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"): a convolutional encoder maps an image to the mean and log-variance of a
diagonal Gaussian posterior over an 8×-downsampled latent (the variational autoencoder of Kingma &
Welling 2014, "Auto-Encoding Variational Bayes"), and a convolutional decoder maps latents back
to pixels. Attribute names match diffusers' ``AutoencoderKL`` (``encoder.down_blocks.0.resnets.0
.norm1``, ``encoder.mid_block.attentions.0.to_q``, ``quant_conv``, ``decoder.up_blocks.0.upsamplers
.0.conv``, ...) so its checkpoints load with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.config import JsonConfig
from destatic.models.layers import Downsample, ResnetBlock, Upsample

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AutoencoderConfig(JsonConfig):
    """Hyper-parameters of the KL autoencoder, with diffusers' ``AutoencoderKL`` field names."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True  # stored only; this module runs in whatever dtype it is cast to
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # diffusers' "_..." keys

    def __post_init__(self) -> None:
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types / up_block_types must match block_out_channels")
        for t in self.down_block_types:
            if t != "DownEncoderBlock2D":
                raise ValueError(f"unsupported down block type {t!r} (only DownEncoderBlock2D)")
        for t in self.up_block_types:
            if t != "UpDecoderBlock2D":
                raise ValueError(f"unsupported up block type {t!r} (only UpDecoderBlock2D)")
        if not isinstance(self.layers_per_block, int):
            raise ValueError("unsupported option layers_per_block: must be a single int")

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> AutoencoderConfig:
        """Read a diffusers ``AutoencoderKL`` config.json dict.

        Options outside the SD 1.x/2.x VAE (other activations, ``latents_mean``/``latents_std``,
        other block types, ...) must be absent or at their diffusers default, otherwise a
        ValueError names the option.
        """
        cfg, private = cls._read_diffusers(cfg, _UNSUPPORTED_DEFAULTS, "AutoencoderKL")
        return cls(**cfg, extra=private)


# diffusers options outside the SD 1.x/2.x VAE: accepted only at these (default) values.
_UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "latents_mean": (None,),
    "latents_std": (None,),
}


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class VAEDownsample(Downsample):
    """Stride-2 3×3 convolution without padding after a (0, 1, 0, 1) zero pad (right/bottom only).

    The VAE encoder pads asymmetrically, unlike the U-Net's symmetric ``padding=1`` downsampler.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H·W positions, with a GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q = self.to_q(y)[:, None]  # (B, 1, HW, C)
        k = self.to_k(y)[:, None]
        v = self.to_v(y)[:, None]
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        y = self.to_out[1](self.to_out[0](y))
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """ResnetBlock → (attention) → ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, None, groups) for _ in range(2)]
        )
        self.attentions = nn.ModuleList(
            [SpatialSelfAttention(channels, groups)] if add_attention else []
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock(nn.Module):
    """``layers`` ResnetBlocks, then (unless last) a VAE downsampler."""

    def __init__(
        self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, None, groups)
                for i in range(layers)
            ]
        )
        self.downsamplers = nn.ModuleList([VAEDownsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock(nn.Module):
    """``layers`` ResnetBlocks, then (unless last) nearest ×2 upsampling and a 3×3 conv."""

    def __init__(
        self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, None, groups)
                for i in range(layers)
            ]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


# ----------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Image (B, C_in, H, W) → posterior moments (B, 2·latent, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch = config.block_out_channels
        g = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock(
                    ch[max(i - 1, 0)], ch[i], config.layers_per_block, g, i < len(ch) - 1
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch0, H, W)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2·latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent, h, w) → image (B, C_out, h·f, w·f)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        rev = tuple(reversed(config.block_out_channels))
        g = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock(
                    rev[max(i - 1, 0)], rev[i], config.layers_per_block + 1, g, i < len(rev) - 1
                )
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, ch_last, h, w)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C_out, H, W)


# ----------------------------------------------------------------------------------------------
# Posterior and autoencoder
# ----------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """Diagonal Gaussian N(mean, exp(logvar)) from moments (B, 2·C, h, w) split along channels."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)  # (B, C, h, w) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self ‖ other) per sample, summed over (C, h, w); ``other=None`` is N(0, I)."""
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean) ** 2 / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=[1, 2, 3],
        )


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (Rombach et al. 2022; Kingma & Welling 2014), diffusers keys."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        lat = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, C_in, H, W) in [-1, 1] → posterior over latents (B, latent, H/f, W/f)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent, h, w) (unscaled) → image (B, C_out, h·f, w·f)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def latents_from_images(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Diffusion-space latents: (posterior sample − shift_factor) · scaling_factor."""
        z = self.encode(x).sample(generator)
        shift = self.config.shift_factor or 0.0
        return (z - shift) * self.config.scaling_factor

    def images_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Images from diffusion-space latents: decode(z / scaling_factor + shift_factor)."""
        shift = self.config.shift_factor or 0.0
        return self.decode(z / self.config.scaling_factor + shift)
