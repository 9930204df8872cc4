"""A fixed mel-spectrogram "autoencoder" for audio diffusion: waveform ↔ normalised log-mel.

Encoding (no weights): the short-time Fourier transform of a mono waveform (Hann window of
``n_fft`` samples, ``hop_length`` apart), its magnitude ``|S|`` projected on ``n_mels`` Slaney
mel filters ``M`` (transformers' ``mel_filter_bank``), then

    z = (ln max(M|S|, floor) − log_offset) / log_scale            (B, n_mels, frames)

so a model diffuses over ``frames`` tokens of ``n_mels`` channels — the 1-D latents ``(B, C, T)``
of an audio family. ``frames = samples // hop_length`` (the STFT's last, half-outside frame is
dropped).

Decoding inverts the two lossy steps: the linear magnitude from the mel by non-negative least
squares (projected gradient on ``‖M a − m‖²``, started from the pseudo-inverse), then a phase by
the fast Griffin–Lim algorithm (Griffin & Lim 1984; the momentum variant of Perraudin, Balazs &
Søndergaard 2013, as librosa and torchaudio implement it), started from a fixed-seed random phase
so decoding is deterministic. It is a vocoder with nothing to train, chosen for the bundled model
because a learned waveform autoencoder (Stable Audio's Oobleck) needs adversarial training far
beyond an hour of CPU; its cost — what the round trip does to real notes' pitch and timbre — is
measured in BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from destatic.models.config import JsonConfig, check_positive, check_positive_float

__all__ = ["MelCodec", "MelCodecConfig"]


@dataclasses.dataclass
class MelCodecConfig(JsonConfig):
    """The STFT, mel and normalisation settings, and the Griffin–Lim decode's."""

    sampling_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 128
    f_min: float = 0.0
    f_max: float = 8000.0
    floor: float = 1e-5  # magnitudes below this are clamped before the log
    log_offset: float = -7.5  # z = (ln mel − log_offset) / log_scale: the floor at -1,
    log_scale: float = 4.0  # General MIDI notes at mean ≈ 0, standard deviation ≈ 0.75
    griffin_lim_iters: int = 64
    griffin_lim_momentum: float = 0.99
    audio_channels: int = 1

    def validate(self) -> None:
        check_positive(
            sampling_rate=self.sampling_rate,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            n_mels=self.n_mels,
            griffin_lim_iters=self.griffin_lim_iters,
        )
        check_positive_float(floor=self.floor, log_scale=self.log_scale)
        if self.audio_channels != 1:
            raise ValueError(f"audio_channels={self.audio_channels}: the mel codec is mono (1)")
        if not 0 <= self.f_min < self.f_max <= self.sampling_rate / 2:
            raise ValueError(
                f"need 0 ≤ f_min < f_max ≤ sampling_rate/2, got {self.f_min}, {self.f_max}"
            )
        if self.hop_length > self.n_fft:
            raise ValueError(f"hop_length={self.hop_length} exceeds n_fft={self.n_fft}")

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> MelCodecConfig:
        return cls.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")})

    @property
    def latent_channels(self) -> int:
        return self.n_mels


class MelCodec(nn.Module):
    """Waveforms (B, 1, S) in [-1, 1] ↔ normalised log-mel (B, n_mels, S // hop) (module doc)."""

    def __init__(self, config: MelCodecConfig | None = None):
        super().__init__()
        config = config or MelCodecConfig()
        config.validate()
        self.config = config
        from transformers.audio_utils import mel_filter_bank

        bank = mel_filter_bank(
            num_frequency_bins=config.n_fft // 2 + 1,
            num_mel_filters=config.n_mels,
            min_frequency=config.f_min,
            max_frequency=config.f_max,
            sampling_rate=config.sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )  # (freqs, mels)
        # not persistent: the codec is its config; nothing in its weights file
        self.register_buffer("mel_basis", torch.from_numpy(bank.T).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """``.to(device, dtype)`` moves the codec but keeps it in fp32: a pseudo-inverse and an
        STFT are signal processing that bf16/fp16 cannot do (a half-precision pipeline rounds
        only its network)."""
        super()._apply(fn, recurse)
        self.mel_basis, self.window = self.mel_basis.float(), self.window.float()
        return self

    @property
    def hop_length(self) -> int:
        """Samples per latent frame."""
        return self.config.hop_length

    def _stft(self, waveforms: torch.Tensor) -> torch.Tensor:
        c = self.config
        return torch.stft(
            waveforms, c.n_fft, c.hop_length, window=self.window, center=True, return_complex=True
        )

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        c = self.config
        return torch.istft(spec, c.n_fft, c.hop_length, window=self.window, length=length)

    def latents_from_waveforms(self, waveforms: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """(B, 1, S) or (B, S) waveforms → (B, n_mels, S // hop) normalised log-mel (float32;
        ``sample`` is accepted for the autoencoder interface: the codec is deterministic)."""
        c = self.config
        x = waveforms.float()
        if x.ndim == 3:
            if x.shape[1] != 1:
                raise ValueError(f"the mel codec is mono; got {x.shape[1]} channels")
            x = x[:, 0]
        frames = x.shape[-1] // c.hop_length
        if frames < 1:
            raise ValueError(f"{x.shape[-1]} samples is shorter than one hop ({c.hop_length})")
        magnitude = self._stft(x[..., : frames * c.hop_length]).abs()[..., :frames]
        mel = self.mel_basis.to(magnitude.device) @ magnitude
        return (mel.clamp_min(c.floor).log() - c.log_offset) / c.log_scale

    def mel_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel → mel magnitudes (the encoder's floor is the least value)."""
        c = self.config
        return (latents.float() * c.log_scale + c.log_offset).exp()

    def magnitude_from_mel(self, mel: torch.Tensor, iters: int = 32) -> torch.Tensor:
        """Linear STFT magnitudes ``a ≥ 0`` with ``M a ≈ mel``: the clamped pseudo-inverse,
        refined by projected gradient steps on ``½‖M a − mel‖²`` (step 1/‖M‖²)."""
        basis = self.mel_basis.to(mel.device)
        a = (torch.linalg.pinv(basis) @ mel).clamp_min(0)
        step = 1.0 / float(torch.linalg.matrix_norm(basis, ord=2) ** 2)
        for _ in range(iters):
            a = (a - step * (basis.T @ (basis @ a - mel))).clamp_min(0)
        return a

    def griffin_lim(self, magnitude: torch.Tensor, length: int) -> torch.Tensor:
        """A waveform whose STFT magnitude is ``magnitude`` (B, freqs, frames): fast
        Griffin–Lim from a fixed-seed random phase (the same for every item of the batch)."""
        c = self.config
        gen = torch.Generator().manual_seed(0)
        # one phase for every item: a sound decodes the same alone or in any batch
        phase = torch.rand(magnitude.shape[1:], generator=gen, dtype=torch.float32) * 2 * math.pi
        angles = torch.polar(
            torch.ones_like(magnitude), phase.to(magnitude.device).expand_as(magnitude)
        )
        previous = torch.zeros_like(angles)
        frames = magnitude.shape[-1]
        for _ in range(c.griffin_lim_iters):
            wave = self._istft(magnitude * angles, length)
            rebuilt = self._stft(wave)[..., :frames]
            accelerated = (
                rebuilt - (c.griffin_lim_momentum / (1 + c.griffin_lim_momentum)) * previous
            )
            previous = rebuilt
            angles = accelerated / accelerated.abs().clamp_min(1e-16)
        return self._istft(magnitude * angles, length)

    def waveforms_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, frames) → waveforms (B, 1, frames · hop) in [-1, 1] (float32)."""
        c = self.config
        if latents.ndim != 3 or latents.shape[1] != c.n_mels:
            raise ValueError(
                f"mel latents must be (batch, {c.n_mels}, frames), got {tuple(latents.shape)}"
            )
        magnitude = self.magnitude_from_mel(self.mel_from_latents(latents))
        # the STFT has frames + 1 columns over frames · hop samples: repeat the last
        magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)
        length = latents.shape[-1] * c.hop_length
        return self.griffin_lim(magnitude, length).clamp(-1, 1).unsqueeze(1)
