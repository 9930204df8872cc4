"""Oobleck, Stable Audio's waveform autoencoder: audio (B, channels, S) ↔ latents (B, C, S/hop).

Evans et al. 2024, "Stable Audio Open" (the "Oobleck" VAE of stable-audio-tools), built from the
DAC codec's blocks (Kumar et al. 2023, "High-Fidelity Audio Compression with Improved RVQGAN"):
every convolution is weight-normalised (Salimans & Kingma 2016), W = g · V / ‖V‖ with the norm
over all axes but the output one (the input one for a transposed convolution), and every
activation is a *snake* (Ziyin et al. 2020), periodic with a learnt per-channel frequency α and
scale β (stored as logarithms):

    snake(x) = x + sin²(α x) / (β + 10⁻⁹)

A residual unit is x + Conv₁(snake(Conv₇,dilated(snake(x)))); an encoder block is three units
(dilations 1, 3, 9), a snake and a strided convolution (kernel 2s, stride s) that multiplies the
channels; a decoder block mirrors it with a transposed convolution first. The encoder ends in
2·C channels: the posterior's mean and a scale whose softplus (+10⁻⁴) is the standard deviation.
Stable Audio diffuses these latents unscaled. The weight norm is kept as diffusers' ``weight_g``
and ``weight_v`` parameters rather than folded at load, so diffusers' ``AutoencoderOobleck``
folders load with ``load_state_dict(strict=True)``, save back unchanged, and train as trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.autoencoder import DiagonalGaussian
from destatic.models.config import JsonConfig, check_positive

__all__ = ["AutoencoderOobleck", "OobleckConfig", "OobleckPosterior", "Snake1d"]

#: Dilations of the three residual units of each block.
DILATIONS = (1, 3, 9)


@dataclass
class OobleckConfig(JsonConfig):
    """Hyper-parameters; the names are those of diffusers' AutoencoderOobleck config (defaults:
    Stable Audio Open 1.0's, 2048 samples of 44.1 kHz stereo per latent frame)."""

    encoder_hidden_size: int = 128  # encoder width; also its output: 2 × latent channels
    downsampling_ratios: list[int] = field(default_factory=lambda: [2, 4, 4, 8, 8])
    channel_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    decoder_channels: int = 128  # decoder width
    decoder_input_channels: int = 64  # latent channels
    audio_channels: int = 2  # 1: mono, 2: stereo
    sampling_rate: int = 44100  # Hz

    def __post_init__(self) -> None:
        self.downsampling_ratios = list(self.downsampling_ratios)
        self.channel_multiples = list(self.channel_multiples)

    @property
    def latent_channels(self) -> int:
        return self.decoder_input_channels

    @property
    def hop_length(self) -> int:
        """Waveform samples per latent frame: the product of the downsampling ratios."""
        return math.prod(self.downsampling_ratios)

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working autoencoder."""
        check_positive(
            encoder_hidden_size=self.encoder_hidden_size,
            downsampling_ratios=self.downsampling_ratios,
            channel_multiples=self.channel_multiples,
            decoder_channels=self.decoder_channels,
            decoder_input_channels=self.decoder_input_channels,
            audio_channels=self.audio_channels,
            sampling_rate=self.sampling_rate,
        )
        if len(self.channel_multiples) != len(self.downsampling_ratios):
            raise ValueError(
                f"channel_multiples needs one entry per downsampling ratio "
                f"({len(self.downsampling_ratios)}), got {len(self.channel_multiples)}"
            )
        if self.encoder_hidden_size != 2 * self.decoder_input_channels:
            raise ValueError(
                f"encoder_hidden_size={self.encoder_hidden_size} must be twice "
                f"decoder_input_channels={self.decoder_input_channels} (the encoder gives the "
                "mean and scale of each latent channel)"
            )

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> OobleckConfig:
        """Read a diffusers ``AutoencoderOobleck`` config; an unknown option raises a
        ValueError naming it."""
        fields_, _ = cls._read_diffusers(d, {}, "AutoencoderOobleck")
        return cls.from_dict(fields_)


class WeightNormConv1d(nn.Module):
    """A 1-D convolution (``transposed``: its transpose) whose kernel is g · V / ‖V‖, the norm
    over all axes but the first; parameters ``weight_g``, ``weight_v`` and ``bias``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = True,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        conv = (nn.ConvTranspose1d if transposed else nn.Conv1d)(
            in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, bias=bias
        )
        v = conv.weight.detach()
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1)[:, None, None])
        self.weight_v = nn.Parameter(v.clone())
        self.bias = conv.bias
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.transposed = transposed

    @property
    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return v * (self.weight_g / v.flatten(1).norm(dim=1)[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return F.conv_transpose1d(
                x, self.weight, self.bias, self.stride, self.padding, dilation=self.dilation
            )
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class Snake1d(nn.Module):
    """x + sin²(αx)/(β + 10⁻⁹) per channel, α = exp(``alpha``), β = exp(``beta``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.beta.exp() + 1e-9).reciprocal() * torch.sin(self.alpha.exp() * x) ** 2


class ResidualUnit(nn.Module):
    """x + Conv₁(snake(Conv₇(snake(x)))), the kernel-7 convolution dilated and length-keeping."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.snake1 = Snake1d(channels)
        self.conv1 = WeightNormConv1d(
            channels, channels, 7, dilation=dilation, padding=3 * dilation
        )
        self.snake2 = Snake1d(channels)
        self.conv2 = WeightNormConv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.snake2(self.conv1(self.snake1(x))))


def _resampling_conv(cin: int, cout: int, stride: int, transposed: bool) -> WeightNormConv1d:
    """Kernel 2s, stride s, padding ⌈s/2⌉: divides (or multiplies) an even-stride length by s."""
    return WeightNormConv1d(
        cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2), transposed=transposed
    )


class EncoderBlock(nn.Module):
    """Three residual units, a snake, then a strided convolution to ``cout`` channels."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.res_unit1, self.res_unit2, self.res_unit3 = (ResidualUnit(cin, d) for d in DILATIONS)
        self.snake1 = Snake1d(cin)
        self.conv1 = _resampling_conv(cin, cout, stride, transposed=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_unit3(self.res_unit2(self.res_unit1(x)))
        return self.conv1(self.snake1(x))


class DecoderBlock(nn.Module):
    """A snake, a transposed strided convolution to ``cout`` channels, three residual units."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.snake1 = Snake1d(cin)
        self.conv_t1 = _resampling_conv(cin, cout, stride, transposed=True)
        self.res_unit1, self.res_unit2, self.res_unit3 = (ResidualUnit(cout, d) for d in DILATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_t1(self.snake1(x))
        return self.res_unit3(self.res_unit2(self.res_unit1(x)))


class OobleckEncoder(nn.Module):
    """Waveform → 2·C channels at 1/hop the rate: Conv₇, encoder blocks, snake, Conv₃."""

    def __init__(self, config: OobleckConfig) -> None:
        super().__init__()
        width, mult = config.encoder_hidden_size, [1, *config.channel_multiples]
        self.conv1 = WeightNormConv1d(config.audio_channels, width, 7, padding=3)
        self.block = nn.ModuleList(
            EncoderBlock(width * mult[i], width * mult[i + 1], s)
            for i, s in enumerate(config.downsampling_ratios)
        )
        self.snake1 = Snake1d(width * mult[-1])
        self.conv2 = WeightNormConv1d(width * mult[-1], width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))


class OobleckDecoder(nn.Module):
    """Latents → waveform: Conv₇, decoder blocks (the ratios reversed), snake, bias-free Conv₇."""

    def __init__(self, config: OobleckConfig) -> None:
        super().__init__()
        width, mult = config.decoder_channels, [1, *config.channel_multiples]
        n = len(config.downsampling_ratios)
        self.conv1 = WeightNormConv1d(config.decoder_input_channels, width * mult[-1], 7, padding=3)
        self.block = nn.ModuleList(
            DecoderBlock(width * mult[n - i], width * mult[n - i - 1], s)
            for i, s in enumerate(reversed(config.downsampling_ratios))
        )
        self.snake1 = Snake1d(width)
        self.conv2 = WeightNormConv1d(width, config.audio_channels, 7, padding=3, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))


class OobleckPosterior(DiagonalGaussian):
    """N(mean, std²) from the encoder's (B, 2·C, T) output: [mean, s] with std = softplus(s) +
    10⁻⁴; ``sample`` and ``mode`` as :class:`DiagonalGaussian`, ``kl`` summed over all axes
    but the batch."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, scale = moments.chunk(2, dim=1)  # (B, C, T) each
        self.std = F.softplus(scale) + 1e-4
        self.var = self.std**2
        self.logvar = self.var.log()

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self ‖ other) per sample; ``other=None`` is N(0, I)."""
        mean, var, logvar = (
            (0.0, 1.0, 0.0) if other is None else (other.mean, other.var, other.logvar)
        )
        terms = (self.mean - mean) ** 2 / var + self.var / var - 1.0 - self.logvar + logvar
        return 0.5 * terms.flatten(1).sum(1)


class AutoencoderOobleck(nn.Module):
    """Stable Audio's waveform VAE (the module doc), with destatic's audio-autoencoder API:
    :meth:`waveforms_from_latents`, :meth:`latents_from_waveforms`, :attr:`hop_length`,
    ``config.sampling_rate`` and ``config.audio_channels``."""

    def __init__(self, config: OobleckConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = OobleckEncoder(config)
        self.decoder = OobleckDecoder(config)

    @property
    def hop_length(self) -> int:
        """Waveform samples per latent frame."""
        return self.config.hop_length

    def _input(self, x: torch.Tensor, name: str, channels: int, what: str) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != channels:
            raise ValueError(f"{name} must be (B, {channels}, {what}), got shape {tuple(x.shape)}")
        return x.to(self.decoder.conv2.weight_v.dtype)

    def encode(self, waveforms: torch.Tensor) -> OobleckPosterior:
        """Waveforms (B, audio_channels, S) → posterior over latents (B, C, S/hop) (for an
        even-ratio model and S a multiple of hop)."""
        x = self._input(waveforms, "waveforms", self.config.audio_channels, "samples")
        return OobleckPosterior(self.encoder(x))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, T) → waveforms (B, audio_channels, T·hop), in the module's dtype."""
        return self.decoder(self._input(latents, "latents", self.config.latent_channels, "T"))

    def waveforms_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents (unscaled, as Stable Audio's) → float32 waveforms, not clipped
        (diffusers' StableAudioPipeline returns them unclipped too)."""
        return self.decode(latents).float()

    def latents_from_waveforms(
        self,
        waveforms: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        sample: bool = False,
    ) -> torch.Tensor:
        """Diffusion latents of ``waveforms``: the posterior mean, or with ``sample`` a draw."""
        posterior = self.encode(waveforms)
        return posterior.sample(generator) if sample else posterior.mode()
