"""Wan 2.1's video autoencoder (``AutoencoderKLWan``): causal 3-D convolutions, 8× in space
and 4× in time, 16 latent channels normalised per channel.

Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models", Sec. 3.1 (Wan-VAE).

* **Causal in time.** Every 3-D convolution pads its kernel's temporal reach on the past side
  only (``2·p_t`` zero frames before the clip, none after), so frame k never sees a later frame
  and the first frame is coded like a still image.
* **Frames 1 + 4k ↔ latent frames 1 + k.** A temporal downsampling keeps the first frame as it
  is and runs a stride-2 kernel-3 convolution over the clip (frames 0-2, 2-4, …); a temporal
  upsampling keeps the first latent frame and turns each later one into two (a causal
  convolution to 2C channels, split into two frames), ignoring frame 0.
* **Per-frame parts.** Spatial resampling (nearest-exact ×2 then a 3×3 conv, or a stride-2 conv
  after padding right and bottom), the mid-block attention (one head over the h·w positions of
  a frame) and RMS norms over channels (``F.normalize · √C · γ``).

**Bounded memory.** Nothing but the causal convolutions and the temporal resampling looks
across frames, so the clip can run in chunks along time, each causal convolution keeping the
last ``2·p_t`` frames it saw (in place of the zero padding) and each temporal resampling its
own: the same computation as the whole clip at once, with activations the size of a chunk.
As diffusers' ``AutoencoderKLWan``, :meth:`~AutoencoderKLWan.decode` runs one latent frame at
a time and :meth:`~AutoencoderKLWan.encode` the first frame, then 4 frames at a time
(``chunk=None``: the whole clip in one pass).

Diffusion-space latents are ``(z - latents_mean) / latents_std`` per channel
(:meth:`AutoencoderKLWan.latents_from_images`, :meth:`~AutoencoderKLWan.images_from_latents`,
as ``WanPipeline`` decodes). Parameter names are diffusers', so its weights load with
``load_state_dict(strict=True)``. Wan 2.2's residual variant (``is_residual``) and patchified
input (``patch_size``) are not implemented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.autoencoder import DiagonalGaussian
from destatic.models.config import JsonConfig, check_positive

__all__ = ["AutoencoderKLWan", "WanVAEConfig"]


def _check_chunk(chunk: int) -> int:
    if type(chunk) is not int or chunk < 1:
        raise ValueError(f"chunk must be a positive number of latent frames or None, got {chunk!r}")
    return chunk


# Wan 2.1's latent statistics (diffusers' defaults)
LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip
#: diffusers options this model implements at one value only (Wan 2.1's).
FIXED = {"is_residual": (False,), "patch_size": (None,), "dropout": (0.0, 0)}


@dataclass
class WanVAEConfig(JsonConfig):
    """Hyper-parameters; the names are those of diffusers' AutoencoderKLWan config."""

    base_dim: int = 96  # channels of the first level
    decoder_base_dim: int | None = None  # the decoder's; None: base_dim
    z_dim: int = 16  # latent channels
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # channels per level
    num_res_blocks: int = 2  # residual blocks per level (the decoder: one more)
    attn_scales: list[float] = field(default_factory=list)  # encoder scales with attention
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    latents_mean: list[float] = field(default_factory=lambda: list(LATENTS_MEAN))
    latents_std: list[float] = field(default_factory=lambda: list(LATENTS_STD))
    in_channels: int = 3
    out_channels: int = 3
    scale_factor_temporal: int = 4  # frames per latent frame (after the first)
    scale_factor_spatial: int = 8  # pixels per latent pixel

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """The encoder's channels per level (their count gives the spatial factor)."""
        return tuple(self.base_dim * m for m in self.dim_mult)

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working autoencoder."""
        check_positive(
            base_dim=self.base_dim,
            decoder_base_dim=self.decoder_base_dim,
            z_dim=self.z_dim,
            dim_mult=self.dim_mult,
            num_res_blocks=self.num_res_blocks,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
        )
        levels = len(self.dim_mult) - 1
        if len(self.temperal_downsample) != levels:
            raise ValueError(
                f"temperal_downsample needs {levels} entries (one per downsampling level), "
                f"got {len(self.temperal_downsample)}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} needs z_dim={self.z_dim} entries")
        if any(not s > 0 for s in self.latents_std):
            raise ValueError("latents_std entries must be positive")
        if self.scale_factor_spatial != 2**levels:
            raise ValueError(f"scale_factor_spatial must be 2^{levels} for {levels + 1} levels")
        if self.scale_factor_temporal != 2 ** sum(map(bool, self.temperal_downsample)):
            raise ValueError("scale_factor_temporal must be 2^(temporal downsamplings)")

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> WanVAEConfig:
        """Read a diffusers ``AutoencoderKLWan`` config; Wan 2.2's options raise a ValueError
        naming them."""
        fields_, _ = cls._read_diffusers(d, FIXED, "AutoencoderKLWan")
        return cls.from_dict(fields_)


class CausalConv3d(nn.Conv3d):
    """A Conv3d padded ``2·p_t`` frames on the past side only (and ``p_h``, ``p_w`` on both
    sides in space). While ``streaming``, the past is the last ``2·p_t`` input frames of the
    chunks before (zeros before the first)."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.causal_padding = (pw, pw, ph, ph, 2 * pt, 0)
        self.streaming = False
        self.past: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding, reach = self.causal_padding, self.causal_padding[4]
        if self.streaming and reach:
            seen = 0 if self.past is None else self.past.shape[2]
            x = x if self.past is None else torch.cat([self.past, x], dim=2)
            self.past = x[:, :, -reach:].clone()
            padding = (*padding[:4], reach - seen, 0)
        return super().forward(F.pad(x, padding))


class ChannelRMSNorm(nn.Module):
    """x / ‖x‖ over channels · √C · γ (γ broadcast over (t, h, w), or (h, w) per frame)."""

    def __init__(self, dim: int, frames: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1, 1) if frames else (1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16)
        normalized = F.normalize(x.float() if low else x, dim=1).to(x.dtype)
        return normalized * self.scale * self.gamma


def _per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` on each frame of x (B, C, T, H, W) as a batch of images."""
    b, t = x.shape[0], x.shape[2]
    y = module(x.transpose(1, 2).flatten(0, 1))  # (B·T, C', H', W')
    return y.unflatten(0, (b, t)).transpose(1, 2)


class ResidualBlock(nn.Module):
    """x + conv(SiLU(RMS(conv(SiLU(RMS(x)))))) with causal 3×3×3 convolutions."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = ChannelRMSNorm(cout)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.conv_shortcut(x) + h


class FrameAttention(nn.Module):
    """One-head self-attention over the h·w positions of each frame, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim, frames=False)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (N, H·W, 3C)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # (N, 1, H·W, C) each
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (N, H·W, C)
        return self.proj(out.transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _per_frame(self._attend, x)


class Resample(nn.Module):
    """×2 or ÷2 in space (per frame), and in time for the ``…3d`` modes (module doc)."""

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        out_dim = dim // 2 if out_dim is None else out_dim
        if mode.startswith("upsample"):
            up = nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
            self.resample = nn.Sequential(up, nn.Conv2d(dim, out_dim, 3, padding=1))
        else:
            pad = nn.ZeroPad2d((0, 1, 0, 1))
            self.resample = nn.Sequential(pad, nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        # streaming (CausalConv3d): whether frame 0 has passed; downsampling's last frame
        self.streaming, self.started = False, False
        self.past: torch.Tensor | None = None

    def _double_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Frame 0 of the clip stays one frame; every later frame becomes two."""
        first = 0 if self.started else 1
        self.started = self.streaming
        if x.shape[2] == first:
            return x
        later = self.time_conv(x[:, :, first:])  # (B, 2C, T', H, W)
        later = later.unflatten(1, (2, -1)).permute(0, 2, 3, 1, 4, 5).flatten(2, 3)
        return torch.cat([x[:, :, :first], later], dim=2)  # (B, C, first + 2T', H, W)

    def _halve_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Frame 0 of the clip, then a stride-2 convolution over frames 0-2, 2-4, …"""
        first = x[:, :, :1] if self.past is None else x[:, :, :0]
        frames = x if self.past is None else torch.cat([self.past, x], dim=2)
        if self.streaming:
            self.past = frames[:, :, -1:].clone()
        if frames.shape[2] < 3:
            return first
        return torch.cat([first, self.time_conv(frames)], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x)
        x = _per_frame(self.resample, x)
        return self._halve_frames(x) if self.mode == "downsample3d" else x


class MidBlock(nn.Module):
    """Residual block, frame attention, residual block."""

    def __init__(self, dim: int):
        super().__init__()
        self.attentions = nn.ModuleList([FrameAttention(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder3d(nn.Module):
    """Clip (B, 3, 1 + 4k, H, W) → moments (B, 2·z, 1 + k, H/8, W/8) before ``quant_conv``."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in [1, *cfg.dim_mult]]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        scale = 1.0
        for i, (cin, cout) in enumerate(pairwise(dims)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                if scale in cfg.attn_scales:
                    layers.append(FrameAttention(cout))
                cin = cout
            if i < len(cfg.dim_mult) - 1:
                layers.append(
                    Resample(cout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d")
                )
                scale /= 2
        self.down_blocks = nn.ModuleList(layers)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for layer in self.down_blocks:
            x = layer(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class UpBlock(nn.Module):
    """``num_res_blocks + 1`` residual blocks, then an optional upsampling."""

    def __init__(self, cin: int, cout: int, blocks: int, mode: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResidualBlock(cin if i == 0 else cout, cout) for i in range(blocks + 1)
        )
        self.upsamplers = None if mode is None else nn.ModuleList([Resample(cout, mode)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder3d(nn.Module):
    """Latents (B, z, 1 + k, h, w) after ``post_quant_conv`` → clip (B, 3, 1 + 4k, 8h, 8w)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in [cfg.dim_mult[-1], *cfg.dim_mult[::-1]]]
        temporal = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (cin, cout) in enumerate(pairwise(dims)):
            cin = cin // 2 if i > 0 else cin  # the upsampling before halved the channels
            last = i == len(cfg.dim_mult) - 1
            mode = None if last else ("upsample3d" if temporal[i] else "upsample2d")
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


@contextlib.contextmanager
def _streaming(module: nn.Module) -> Iterator[None]:
    """``module``'s causal parts carry their past from one call to the next inside the block
    (a clip in chunks along time); fresh state on entry and exit."""
    parts = [m for m in module.modules() if isinstance(m, (CausalConv3d, Resample))]

    def reset(on: bool) -> None:
        for m in parts:
            m.streaming, m.past = on, None
            if isinstance(m, Resample):
                m.started = False

    reset(True)
    try:
        yield
    finally:
        reset(False)


def _in_chunks(module: nn.Module, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``module`` over x (B, C, T, H, W) in consecutive chunks of ``sizes`` frames along time,
    streaming (:func:`_streaming`); the outputs joined along time."""
    out, start = [], 0
    with _streaming(module):
        for n in sizes:
            out.append(module(x[:, :, start : start + n]))
            start += n
    return torch.cat(out, dim=2)


def _chunk_sizes(total: int, first: int, chunk: int) -> list[int]:
    """``first``, then ``chunk`` at a time (the last chunk shorter) up to ``total``."""
    return [first] + [min(chunk, total - s) for s in range(first, total, chunk)]


class AutoencoderKLWan(nn.Module):
    """Wan's video VAE: clips in [-1, 1] ↔ Gaussian latents (module doc). A still image
    (B, C, H, W) is a one-frame clip."""

    def __init__(self, config: WanVAEConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = config = config or WanVAEConfig(**kwargs)
        self.encoder = Encoder3d(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    def _check_frames(self, frames: int) -> None:
        step = self.config.scale_factor_temporal
        if (frames - 1) % step:
            raise ValueError(f"a clip to encode needs 1 + {step}·k frames, got {frames}")

    def encode(self, x: torch.Tensor, *, chunk: int | None = 1) -> DiagonalGaussian:
        """The posterior of clips x (B, C, 1 + 4k, H, W) in [-1, 1], the first frame and then
        ``chunk`` latent frames' worth (4·chunk frames) at a time (None: all at once)."""
        frames = x.shape[2]
        self._check_frames(frames)
        if chunk is None or frames == 1:
            moments = self.encoder(x)
        else:
            step = self.config.scale_factor_temporal * _check_chunk(chunk)
            moments = _in_chunks(self.encoder, x, _chunk_sizes(frames, 1, step))
        return DiagonalGaussian(self.quant_conv(moments))

    def decode(self, z: torch.Tensor, *, chunk: int | None = 1) -> torch.Tensor:
        """Clips in [-1, 1] (clamped) from raw latents z (B, z_dim, 1 + k, h, w), ``chunk``
        latent frames at a time (None: all at once; module doc)."""
        z = self.post_quant_conv(z)
        if chunk is None or z.shape[2] == 1:
            return self.decoder(z).clamp(-1.0, 1.0)
        step = _check_chunk(chunk)
        sizes = _chunk_sizes(z.shape[2], min(step, z.shape[2]), step)
        return _in_chunks(self.decoder, z, sizes).clamp(-1.0, 1.0)

    def _statistics(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, device=z.device, dtype=z.dtype)
        std = torch.tensor(self.config.latents_std, device=z.device, dtype=z.dtype)
        return mean.view(shape), std.view(shape)

    def latents_from_images(
        self, x: torch.Tensor, generator: torch.Generator | None = None, *, sample: bool = True
    ) -> torch.Tensor:
        """Diffusion-space latents ``(z − latents_mean) / latents_std`` of clips (or images,
        as one-frame clips); ``sample=False`` takes the posterior mean."""
        still = x.ndim == 4
        posterior = self.encode(x.unsqueeze(2) if still else x)
        z = posterior.sample(generator) if sample else posterior.mode()
        mean, std = self._statistics(z)
        z = (z - mean) / std
        return z.squeeze(2) if still else z

    def images_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Clips from diffusion-space latents: ``decode(z · latents_std + latents_mean)``."""
        still = z.ndim == 4
        z = z.unsqueeze(2) if still else z
        mean, std = self._statistics(z)
        out = self.decode(z * std + mean)
        return out.squeeze(2) if still else out
