"""Convolutional building blocks of the latent-diffusion U-Net (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models", after Ho et al. 2020's DDPM U-Net).

GroupNorm → SiLU → conv residual blocks, a sinusoidal timestep embedding, and stride-2 / nearest
resampling. Attribute names match diffusers' (``norm1``, ``conv1``, ``time_emb_proj``, ...) so its
checkpoints load with ``load_state_dict(strict=True)``. ``ResnetBlock`` accepts ``temb=None`` so the
autoencoder can reuse it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (Wu & He 2018) that normalises a channels_last feature map smaller than
    32×32 in the contiguous layout: ATen's channels_last kernel parallelises over (batch × group)
    with strided reads below 1,024 pixels (the bundled U-Net's bf16 forward at batch 16 spends 67
    ms in it against 12 contiguously, ``benchmarks/cpu_precision.py``). Identical on contiguous
    inputs (the fp32 default), and the same parameters and state-dict keys as ``nn.GroupNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[-2] * x.shape[-1] < 1024 and not x.is_contiguous():
            x = x.contiguous()
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (Ba et al. 2016) computed in fp32 under autocast. CPU autocast leaves
    ``layer_norm`` in bf16, and ATen's bf16 backward sums the γ/β gradients in low precision:
    65% off their fp32 values on a [64, 256, 64] batch (``tests/test_cpu_precision.py``). With
    this norm the bundled model's 400-step bf16 loss curve sits on fp32's (BENCHMARKS.md,
    "Training"). Outside autocast (fp32 training, half-precision inference) it is
    ``nn.LayerNorm`` exactly, with the same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


# ----------------------------------------------------------------------------------------------
# Timestep embedding
# ----------------------------------------------------------------------------------------------


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t`` of shape [B] → [B, dim].

    Frequencies ``exp(-log(max_period) · i / (dim/2 - freq_shift))`` for ``i < dim/2`` (Vaswani et
    al. 2017, as used by DDPM). ``flip_sin_to_cos`` puts the cosines first (SD uses True).
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / (half - freq_shift))  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, 2·half)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: Linear → SiLU → Linear.

    With ``cond_proj_dim`` a second embedding (LCM's guidance-scale embedding, diffusers'
    ``time_cond_proj_dim``) is projected by a bias-free Linear and added to the input first."""

    def __init__(self, in_dim: int, dim: int, cond_proj_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        if cond_proj_dim is not None:
            self.cond_proj = nn.Linear(cond_proj_dim, in_dim, bias=False)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            x = x + self.cond_proj(condition.to(x.dtype))  # (B, in_dim)
        return self.linear_2(self.act(self.linear_1(x)))  # (B, dim)


# ----------------------------------------------------------------------------------------------
# Residual block and resampling
# ----------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(SiLU(GN(conv(SiLU(GN(x))) + proj(temb)))))``.

    The time embedding (if any) is added as a per-channel bias between the two convolutions.
    A 1×1 ``conv_shortcut`` matches channels when ``in_channels != out_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,  # None: no time conditioning (autoencoder)
        groups: int = 32,  # GroupNorm groups
        eps: float = 1e-6,  # GroupNorm epsilon
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if temb is not None and self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3×3 convolution."""

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double the resolution (or reach ``size``) by nearest-neighbour, then a 3×3 convolution."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # (B, C, *size)
        return self.conv(x)
