"""The audio evaluator's network: a small CNN on log-mel spectrograms, trained here on real sounds.

It reads a normalised log-mel spectrogram ``(B, n_mels, frames)`` (the features of
:class:`destatic.models.mel.MelCodec`, the same the ``notes`` generator diffuses) as a
one-channel image and predicts

* the sound's **label** (instrument, word or effect: ``config.labels``),
* for pitched sounds, its **pitch class** (C, C♯, …, B) and **octave** (⌊MIDI / 12⌋), two
  heads instead of 128 MIDI classes so that an octave error and a wrong note are told apart.

Architecture: a strided 3×3 stem, residual GroupNorm–SiLU–conv stages (the U-Net's
:class:`~destatic.models.layers.ResnetBlock`) with stride-2 downsampling between them, a mean
over time (so any duration is read), the frequency rows flattened (pitch lives in *where*
along the mel axis the energy is, so that axis is not pooled away), then
``embed = SiLU(Linear(·))`` — the penultimate features, the embedding of the Fréchet audio
distance (Kilgour et al. 2019, "Fréchet Audio Distance", with this network in place of VGGish)
— and three linear heads on it.

Training loss (:func:`classifier_loss`), per sample: cross-entropy of the label, plus, when the
sound has a pitch, cross-entropy of its pitch class and of its octave.

Its uses (label and pitch accuracy, FAD) are :mod:`destatic.metrics.audio`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from destatic.data.audio import AUDIO_DATASETS, load_audio_dataset
from destatic.models.config import JsonConfig, check_positive
from destatic.models.layers import Downsample, ResnetBlock

__all__ = [
    "AUDIO_CLASS_NAME",
    "OCTAVES",
    "REFERENCE_DATASETS",
    "AudioClassifier",
    "AudioEvaluatorConfig",
    "AudioLogits",
    "classifier_loss",
    "load_reference_clips",
    "pitch_targets",
]

#: ``_class_name`` of a saved audio evaluator's ``config.json``.
AUDIO_CLASS_NAME = "AudioClassifier"
#: The real sounds an evaluator can be trained on and scored against (the data layer's table).
REFERENCE_DATASETS = AUDIO_DATASETS
#: Octave classes ⌊MIDI / 12⌋ for MIDI 0 … 131 (MIDI 60, C4, is octave class 5).
OCTAVES = 11


@dataclass
class AudioEvaluatorConfig(JsonConfig):
    labels: list[str] = field(default_factory=list)  # the label classes, in head order
    n_mels: int = 64  # mel bands of the input features
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    stem_stride: int = 2  # the first convolution's stride (both axes): 2 quarters the cost
    layers_per_block: int = 1
    norm_num_groups: int = 8
    embed_dim: int = 256
    dropout: float = 0.1  # on the embedding, before the heads (training only)
    dataset: str = ""  # the dataset it was trained on (its held-out split is the reference)
    mel: dict[str, Any] = field(default_factory=dict)  # the MelCodec fields of its features

    def __post_init__(self) -> None:
        check_positive(
            n_mels=self.n_mels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            embed_dim=self.embed_dim,
            stem_stride=self.stem_stride,
        )
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be at least 2 distinct names, got {self.labels!r}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block_out_channels entry must be a multiple of norm_num_groups "
                f"({self.norm_num_groups}), got {self.block_out_channels}"
            )
        if self.n_mels < self.stem_stride * 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"n_mels {self.n_mels} is too small for the stages")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def mel_rows(self) -> int:
        """Frequency rows left after the downsampling stages."""
        rows = (self.n_mels - 1) // self.stem_stride + 1  # a padding-1 3×3 convolution
        for _ in self.block_out_channels[1:]:
            rows = (rows + 1) // 2  # a stride-2, padding-1, 3×3 convolution
        return rows


class AudioLogits(NamedTuple):
    label: torch.Tensor  # (B, len(labels))
    pitch_class: torch.Tensor  # (B, 12)
    octave: torch.Tensor  # (B, OCTAVES)


class AudioClassifier(nn.Module):
    """Log-mel ``(B, n_mels, frames)`` → embedding ``(B, embed_dim)`` → :class:`AudioLogits`."""

    def __init__(self, config: AudioEvaluatorConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        g = config.norm_num_groups
        self.conv_in = nn.Conv2d(1, ch[0], 3, stride=config.stem_stride, padding=1)
        blocks: list[nn.Module] = []
        prev = ch[0]
        for i, c in enumerate(ch):
            if i > 0:
                blocks.append(Downsample(prev))
            for _ in range(config.layers_per_block):
                blocks.append(ResnetBlock(prev, c, temb_channels=None, groups=g))
                prev = c
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(g, prev)
        self.embed = nn.Linear(prev * config.mel_rows, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.label_head = nn.Linear(config.embed_dim, len(config.labels))
        self.pitch_class_head = nn.Linear(config.embed_dim, 12)
        self.octave_head = nn.Linear(config.embed_dim, OCTAVES)

    def embedding(self, mel: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``(B, embed_dim)`` of log-mel ``(B, n_mels, frames)``."""
        if mel.ndim != 3 or mel.shape[1] != self.config.n_mels:
            raise ValueError(
                f"expected log-mel (B, {self.config.n_mels}, frames), got {tuple(mel.shape)}"
            )
        h = self.blocks(self.conv_in(mel[:, None]))  # (B, C, rows, T')
        h = F.silu(self.norm_out(h)).mean(dim=3)  # (B, C, rows): any duration
        return F.silu(self.embed(h.flatten(1)))

    def heads(self, embedding: torch.Tensor) -> AudioLogits:
        e = self.dropout(embedding)
        return AudioLogits(self.label_head(e), self.pitch_class_head(e), self.octave_head(e))

    def forward(self, mel: torch.Tensor) -> AudioLogits:
        return self.heads(self.embedding(mel))


def pitch_targets(midi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pitch class, octave class) of integer MIDI notes (−1 where there is none)."""
    return midi.remainder(12), midi.div(12, rounding_mode="floor").clamp(max=OCTAVES - 1)


def classifier_loss(logits: AudioLogits, label: torch.Tensor, midi: torch.Tensor) -> torch.Tensor:
    """Per-sample loss [B]: CE(label) + [pitched] · (CE(pitch class) + CE(octave)); ``midi`` is
    −1 for sounds without a pitch."""
    loss = F.cross_entropy(logits.label.float(), label, reduction="none")
    pitched = midi >= 0
    pc, octave = pitch_targets(midi.clamp(min=0))
    pitch = F.cross_entropy(logits.pitch_class.float(), pc, reduction="none")
    pitch = pitch + F.cross_entropy(logits.octave.float(), octave, reduction="none")
    return loss + torch.where(pitched, pitch, torch.zeros_like(pitch))


def load_reference_clips(dataset: str, **options: Any) -> Any:
    """The :class:`~destatic.data.audio.AudioClips` of a :data:`REFERENCE_DATASETS` name
    (``options``: the loader's keywords), without a progress bar."""
    return load_audio_dataset(dataset, **{"progress": False, **options})
