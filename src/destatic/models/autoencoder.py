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

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from destatic.models.config import (
    JsonConfig,
    check_divides,
    check_positive,
    check_positive_float,
    check_sample_size,
)
from destatic.models.layers import Downsample, GroupNorm, ResnetBlock, Upsample
from destatic.models.sdpa import scaled_dot_product_attention

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
    force_upcast: bool = True  # fp16 weights decode in fp32 (SDXL's VAE overflows fp16 and bf16)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # diffusers' "_..." keys

    def __post_init__(self) -> None:
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        check_vae_blocks(self)

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working autoencoder:
        positive channel counts, ``norm_num_groups`` dividing every block's channels, a finite
        positive ``scaling_factor`` and ``sample_size`` within
        :data:`~destatic.models.config.MAX_SAMPLE_SIZE`."""
        check_positive(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            latent_channels=self.latent_channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
        )
        check_positive_float(scaling_factor=self.scaling_factor)
        check_sample_size(self.sample_size)
        check_divides(
            "norm_num_groups", self.norm_num_groups, "block_out_channels", self.block_out_channels
        )

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> AutoencoderConfig:
        """Read a diffusers ``AutoencoderKL`` config.json dict.

        Options outside the SD 1.x/2.x VAE (other activations, ``latents_mean``/``latents_std``,
        other block types, ...) must be absent or at their diffusers default, otherwise a
        ValueError names the option.
        """
        cfg, private = cls._read_diffusers(cfg, _UNSUPPORTED_DEFAULTS, "AutoencoderKL")
        config = cls(**cfg, extra=private)
        config.validate()
        return config


def check_vae_blocks(config: Any) -> None:
    """A ValueError unless ``config`` (an :class:`AutoencoderConfig` or another config with its
    block fields, e.g. the VQ tokenizer's) has one ``DownEncoderBlock2D`` and one
    ``UpDecoderBlock2D`` per ``block_out_channels`` entry and a single int ``layers_per_block``."""
    n = len(config.block_out_channels)
    if len(config.down_block_types) != n or len(config.up_block_types) != n:
        raise ValueError("down_block_types / up_block_types must match block_out_channels")
    for t in config.down_block_types:
        if t != "DownEncoderBlock2D":
            raise ValueError(f"unsupported down block type {t!r} (only DownEncoderBlock2D)")
    for t in config.up_block_types:
        if t != "UpDecoderBlock2D":
            raise ValueError(f"unsupported up block type {t!r} (only UpDecoderBlock2D)")
    if not isinstance(config.layers_per_block, int):
        raise ValueError("unsupported option layers_per_block: must be a single int")


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
        self.group_norm = GroupNorm(groups, channels, eps=eps, affine=True)
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
        y = scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
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
    """Image (B, C_in, H, W) → posterior moments (B, 2·latent, H/f, W/f), f = 2^(levels-1).

    ``double_z=False`` (the VQ tokenizer, diffusers' ``Encoder(double_z=False)``) outputs the
    latent itself, (B, latent, H/f, W/f), instead of a mean and a log-variance.
    """

    def __init__(self, config: AutoencoderConfig, double_z: bool = True) -> None:
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
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=1e-6)
        out = (2 if double_z else 1) * config.latent_channels
        self.conv_out = nn.Conv2d(ch[-1], out, 3, padding=1)

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
        self.conv_norm_out = GroupNorm(g, rev[-1], eps=1e-6)
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


def _tile_starts(n: int, tile: int, overlap: float) -> tuple[list[int], int]:
    """Start offsets of length-``tile`` windows covering ``range(n)``, and the nominal overlap.

    Windows advance by ``tile − round(tile·overlap)``; the last one is placed flush with the end
    (so it may overlap its neighbour by more than the nominal amount) rather than hanging over.
    """
    if tile >= n:
        return [0], 0
    ov = min(max(round(tile * overlap), 0), tile - 1)
    starts = list(range(0, n - tile, tile - ov))
    starts.append(n - tile)
    return starts, ov


def _ramp(length: int, ramp: int, left: bool, right: bool, like: torch.Tensor) -> torch.Tensor:
    """1-D blend weight: 1 inside, linear ramps (strictly positive) over ``ramp`` samples at the
    sides that border another tile (``left`` / ``right``)."""
    w = torch.ones(length, dtype=torch.float32, device=like.device)
    r = min(ramp, length)
    if r > 0:
        up = (torch.arange(r, dtype=torch.float32, device=like.device) + 0.5) / r
        if left:
            w[:r] = torch.minimum(w[:r], up)
        if right:
            w[length - r :] = torch.minimum(w[length - r :], up.flip(0))
    return w


def _tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grid: tuple[int, int],
    tile: int,
    overlap: float,
    in_scale: int,
    out_scale: int,
) -> torch.Tensor:
    """Apply a (roughly) translation-equivariant map ``fn`` tile by tile; blend the results.

    Tiling happens on a (gh, gw) ``grid`` (latent pixels). Grid cell (i, j) is input pixels
    ``[i·in_scale, (i+1)·in_scale)`` (the last row/column also takes any remainder) and output
    pixels ``[i·out_scale, (i+1)·out_scale)``. Each output pixel is the weighted mean of the tiles
    covering it, with weights ramping linearly across the overlaps (seam-free blending).
    """
    gh, gw = grid
    ys, ov_y = _tile_starts(gh, tile, overlap)
    xs, ov_x = _tile_starts(gw, tile, overlap)
    th, tw = min(tile, gh), min(tile, gw)
    acc: torch.Tensor | None = None
    wsum = torch.zeros(gh * out_scale, gw * out_scale, dtype=torch.float32, device=x.device)
    for y0 in ys:
        iy1 = (y0 + th) * in_scale if y0 + th < gh else x.shape[-2]
        wy = _ramp(th * out_scale, ov_y * out_scale, y0 > 0, y0 + th < gh, x)
        for x0 in xs:
            ix1 = (x0 + tw) * in_scale if x0 + tw < gw else x.shape[-1]
            out = fn(x[..., y0 * in_scale : iy1, x0 * in_scale : ix1])
            wx = _ramp(tw * out_scale, ov_x * out_scale, x0 > 0, x0 + tw < gw, x)
            w = wy[:, None] * wx[None, :]  # (th·s, tw·s)
            if acc is None:
                acc = out.new_zeros(
                    (*out.shape[:-2], gh * out_scale, gw * out_scale),
                    dtype=torch.promote_types(out.dtype, torch.float32),  # fp32 or wider
                )
            oy, ox = y0 * out_scale, x0 * out_scale
            sl = (..., slice(oy, oy + w.shape[0]), slice(ox, ox + w.shape[1]))
            acc[sl] += out.to(acc.dtype) * w
            wsum[oy : oy + w.shape[0], ox : ox + w.shape[1]] += w
            out_dtype = out.dtype
    assert acc is not None
    return (acc / wsum.to(acc.dtype)).to(out_dtype)


def _safe_decode_dtype(param_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp16 weights → bf16 on CUDA devices with bf16 support, else fp32; other dtypes unchanged."""
    if param_dtype != torch.float16:
        return param_dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name (the mapping ``functional_call`` substitutes)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (Rombach et al. 2022; Kingma & Welling 2014), diffusers keys.

    Large images can be encoded/decoded in overlapping tiles (``tile=`` on :meth:`encode` /
    :meth:`decode`, or :meth:`enable_tiling` for every call, ``forward`` included); see
    :meth:`decode` for how it avoids the SD decoder's fp16 overflow.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        lat = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if config.use_post_quant_conv else None
        # Default tiling (plain attributes, not in the state_dict); see enable_tiling().
        self.tile_pixels: int | None = None
        self.tile_overlap: float = 0.25

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each side: 2^(levels − 1) (8 for SD)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def enable_tiling(self, tile_pixels: int = 512, overlap: float = 0.25) -> None:
        """Tile every later encode/decode (``forward`` included) whose ``tile`` is None.

        ``tile_pixels`` is the tile side in image pixels (decode uses ``tile_pixels // f``
        latent pixels); ``overlap`` is the fraction of a tile shared with its neighbour.
        """
        f = self.downsample_factor
        if tile_pixels < f or tile_pixels % f:
            raise ValueError(f"tile_pixels must be a positive multiple of {f}")
        self.tile_pixels = int(tile_pixels)
        self.tile_overlap = float(overlap)

    def disable_tiling(self) -> None:
        self.tile_pixels = None

    def _resolve_tile(
        self, tile: int | None, overlap: float | None, latent: bool
    ) -> tuple[int | None, float]:
        overlap = self.tile_overlap if overlap is None else float(overlap)
        if not 0.0 <= overlap < 1.0:
            raise ValueError("overlap must be in [0, 1)")
        if tile is None:
            if self.tile_pixels is None:
                return None, overlap
            tile = self.tile_pixels // self.downsample_factor if latent else self.tile_pixels
        if tile <= 0:
            raise ValueError("tile must be positive")
        return int(tile), overlap

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    def encode(
        self, x: torch.Tensor, tile: int | None = None, overlap: float | None = None
    ) -> DiagonalGaussian:
        """Image (B, C_in, H, W) in [-1, 1] → posterior over latents (B, latent, H/f, W/f).

        ``tile`` (image pixels, a multiple of f) encodes overlapping ``tile``×``tile`` crops
        separately and blends their posterior mean/log-variance maps with linear ramps over the
        overlap (``overlap``, a fraction of the tile, default 0.25); this bounds memory (the mid
        block's attention is quadratic in H·W) at the price of an approximation: each tile's
        GroupNorm statistics and attention see only that tile. ``tile=None`` uses the setting of
        :meth:`enable_tiling` (off by default); a tile covering the whole image is exact.
        """
        tile, overlap = self._resolve_tile(tile, overlap, latent=False)
        f = self.downsample_factor
        gh, gw = x.shape[-2] // f, x.shape[-1] // f
        if tile is None or (tile >= x.shape[-2] and tile >= x.shape[-1]):
            return DiagonalGaussian(self._encode_moments(x))
        if tile % f:
            raise ValueError(f"encode tile must be a multiple of the downsample factor {f}")
        moments = _tiled(self._encode_moments, x, (gh, gw), tile // f, overlap, f, 1)
        return DiagonalGaussian(moments)

    def _decode_plain(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(
        self,
        z: torch.Tensor,
        tile: int | None = None,
        overlap: float | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Latent (B, latent, h, w) (unscaled) → image (B, C_out, h·f, w·f), in ``z.dtype``.

        Precision: the SD VAE decoder's activations overflow fp16 (black or NaN images), so when
        the module's parameters are fp16 and ``dtype`` is None the decoder runs in bf16 on CUDA
        devices that support it and in fp32 otherwise (CPU included). The weights are cast on the
        fly for this call only (``torch.func.functional_call``; the module itself stays fp16)
        with autocast disabled, and the image is returned in the input's dtype. An explicit
        ``dtype`` forces the compute dtype the same way (e.g. ``torch.float32`` everywhere, or
        ``torch.float16`` to opt back into plain fp16). With ``config.force_upcast`` (diffusers'
        flag, set in SDXL's VAE config) fp16 weights decode in fp32 everywhere, as diffusers' SDXL
        pipelines do. For any other parameter dtype and ``dtype=None`` the decoder runs as is.

        Tiling: ``tile`` (latent pixels) decodes overlapping ``tile``×``tile`` latent crops and
        blends the images with linear ramps over the overlap (``overlap``, a fraction of the
        tile, default 0.25); an approximation for the reasons given in :meth:`encode`, exact
        when the tile covers the whole latent. ``tile=None`` uses :meth:`enable_tiling`'s
        setting (off by default).
        """
        tile, overlap = self._resolve_tile(tile, overlap, latent=True)
        param_dtype = next(self.decoder.parameters()).dtype
        run_dtype = _safe_decode_dtype(param_dtype, z.device) if dtype is None else dtype
        if dtype is None and param_dtype == torch.float16 and self.config.force_upcast:
            run_dtype = torch.float32
        if run_dtype == param_dtype:
            fn: Callable[[torch.Tensor], torch.Tensor] = self._decode_plain
            in_dtype = z.dtype
            z = z.to(run_dtype)
            ctx: Any = contextlib.nullcontext()
        else:
            names = ["decoder"] + (["post_quant_conv"] if self.post_quant_conv is not None else [])
            cast = {
                n: {k: v.to(run_dtype) for k, v in _tensors(getattr(self, n)).items()}
                for n in names
            }

            def fn(t: torch.Tensor) -> torch.Tensor:
                if self.post_quant_conv is not None:
                    t = functional_call(self.post_quant_conv, cast["post_quant_conv"], (t,))
                return functional_call(self.decoder, cast["decoder"], (t,))

            in_dtype = z.dtype
            z = z.to(run_dtype)
            ctx = torch.autocast(device_type=z.device.type, enabled=False)
        with ctx:
            h, w = z.shape[-2:]
            if tile is None or (tile >= h and tile >= w):
                out = fn(z)
            else:
                f = self.downsample_factor
                out = _tiled(fn, z, (h, w), tile, overlap, 1, f)
        return out.to(in_dtype)

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
        self, x: torch.Tensor, generator: torch.Generator | None = None, *, sample: bool = True
    ) -> torch.Tensor:
        """Diffusion-space latents: (posterior sample − shift_factor) · scaling_factor; with
        ``sample=False`` the posterior mean instead of a sample."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        shift = self.config.shift_factor or 0.0
        return (z - shift) * self.config.scaling_factor

    def images_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Images from diffusion-space latents: decode(z / scaling_factor + shift_factor)."""
        shift = self.config.shift_factor or 0.0
        return self.decode(z / self.config.scaling_factor + shift)
