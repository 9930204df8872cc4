"""Audio evaluator training (``[train] task = "audio_evaluator"``): the log-mel CNN that scores
generated sounds' label and pitch (:mod:`destatic.models.audio_evaluator`; its scores:
:mod:`destatic.metrics.audio`), on the train split of real sounds (``[audio_evaluator]
dataset``: ``"notes"``, ``"speech"``).

Features are the normalised log-mel of :class:`~destatic.models.mel.MelCodec` (``[audio_evaluator]
mel``, default: the codec the ``notes`` generator diffuses in), computed once. Each step sees them
augmented: shifted in time by up to ``shift`` frames (the sound starts earlier or later, the gap
filled with the codec's floor) and scaled by a random gain of up to ±``gain_db`` dB (an additive
shift of the log-mel: ``z + ln(A) / log_scale``, clamped at the floor). With ``round_trip`` > 0,
that share of draws reads the sound after a codec round trip (encode → Griffin–Lim decode →
encode), the artefacts a generator's decoded sounds carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from destatic.models.audio_evaluator import (
    AUDIO_CLASS_NAME,
    REFERENCE_DATASETS,
    AudioClassifier,
    AudioEvaluatorConfig,
    classifier_loss,
    load_reference_clips,
)
from destatic.models.mel import MelCodec, MelCodecConfig
from destatic.models.registry import save_component
from destatic.training.config import Config, ConfigError, choice, require
from destatic.training.tasks.base import Batch, Task, evaluating, network_config, register

__all__ = ["AudioEvaluatorTask", "AudioEvaluatorTrainConfig", "note_label"]


@dataclass
class AudioEvaluatorTrainConfig:
    """The ``[audio_evaluator]`` table."""

    dataset: str = "notes"  # a destatic.models.audio_evaluator.REFERENCE_DATASETS name
    options: dict[str, Any] = field(default_factory=dict)  # the dataset loader's keywords
    config: dict[str, Any] = field(default_factory=dict)  # AudioEvaluatorConfig fields
    mel: dict[str, Any] = field(default_factory=dict)  # MelCodecConfig fields (features)
    shift: int = 4  # augmentation: random time shift by up to this many frames
    gain_db: float = 6.0  # augmentation: random gain within ± this many dB
    round_trip: float = 0.0  # share of draws that read the codec's round trip of the sound

    def check(self) -> None:
        choice("audio_evaluator.dataset", self.dataset, tuple(REFERENCE_DATASETS))
        require(0 <= self.shift <= 64, f"audio_evaluator.shift = {self.shift}: use 0 … 64 frames")
        require(0 <= self.gain_db <= 40, f"audio_evaluator.gain_db = {self.gain_db}: use 0 … 40 dB")
        require(
            0 <= self.round_trip <= 1,
            f"audio_evaluator.round_trip = {self.round_trip}: use a share in [0, 1]",
        )
        reserved = {"labels", "n_mels", "dataset", "mel"} & set(self.config)
        require(
            not reserved,
            f"audio_evaluator.config sets {sorted(reserved)}: these come from the data and "
            "[audio_evaluator] mel",
        )


def note_label(label: str, midi: int) -> str:
    """``"violin C4"``; the label alone for an unpitched sound."""
    from destatic.data.notes import note_name

    return label if midi < 0 else f"{label} {note_name(midi)}"


@register
class AudioEvaluatorTask(Task):
    """Label + pitch-class + octave classifier on real sounds' log-mel (module doc)."""

    name = "audio_evaluator"
    section = AudioEvaluatorTrainConfig

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.cfg = cfg
        section = cfg.audio_evaluator
        try:
            codec_config = MelCodecConfig.from_dict(dict(section.mel))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[audio_evaluator.mel]: {e}") from e
        self.codec = MelCodec(codec_config)
        clips = load_reference_clips(section.dataset, **section.options)
        train, self.heldout = clips.train(), clips.heldout()
        if len(train) == 0:
            raise ConfigError(f"the {section.dataset!r} dataset has no train sounds")
        labels = sorted(set(clips.label))
        fields = {
            **section.config,
            "labels": labels,
            "n_mels": codec_config.n_mels,
            "dataset": section.dataset,
            "mel": codec_config.to_dict(),
        }
        config = network_config(AudioEvaluatorConfig, fields, "audio_evaluator.config")
        self.index = {name: i for i, name in enumerate(labels)}
        self.labels = torch.tensor([self.index[name] for name in train.label])
        self.midi = torch.from_numpy(train.pitch)
        self.mels = self._features(train.audio, clips.sample_rate, round_trip=False)
        self.round_trips = (
            self._features(train.audio, clips.sample_rate, round_trip=True)
            if section.round_trip > 0
            else None
        )
        self.floor = (math.log(codec_config.floor) - codec_config.log_offset) / (
            codec_config.log_scale
        )
        self.trainable = AudioClassifier(config)

    @torch.no_grad()
    def _features(self, audio: np.ndarray, rate: int, round_trip: bool) -> torch.Tensor:
        """Log-mel ``(N, n_mels, frames)`` of the clips, optionally after a codec round trip."""
        from destatic.data.audio import resample

        x = resample(audio, rate, self.codec.config.sampling_rate)
        out = []
        for i in range(0, len(x), 64):
            z = self.codec.latents_from_waveforms(torch.from_numpy(x[i : i + 64]))
            if round_trip:
                z = self.codec.latents_from_waveforms(self.codec.waveforms_from_latents(z))
            out.append(z)
        return torch.cat(out)

    @property
    def num_items(self) -> int:
        return len(self.mels)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        section = self.cfg.audio_evaluator
        b = len(index)
        mel = self.mels[index]
        if self.round_trips is not None:
            use = torch.rand(b, generator=generator) < section.round_trip
            mel = torch.where(use[:, None, None], self.round_trips[index], mel)
        shifts = torch.randint(-section.shift, section.shift + 1, (b,), generator=generator)
        gain_db = (torch.rand(b, generator=generator) * 2 - 1) * section.gain_db
        gain = gain_db * math.log(10) / 20 / self.codec.config.log_scale
        mel = (_shifted(mel, shifts, self.floor) + gain[:, None, None]).clamp(min=self.floor)
        return {"mel": mel, "label": self.labels[index], "midi": self.midi[index]}

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        logits = model(batch["mel"].to(device))
        return classifier_loss(logits, batch["label"].to(device), batch["midi"].to(device))

    def export(self, trainable: nn.Module, folder: Path) -> None:
        config = trainable.config.to_dict()
        save_component(trainable, folder, class_name=AUDIO_CLASS_NAME, config=config)

    @torch.no_grad()
    def sample_grid(self, trainable: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """Held-out sounds' spectrograms labelled with the predicted label and note ("ok" when
        both are right)."""
        from destatic.io.audio import spectrogram_image

        n = min(16, len(self.heldout))
        if n == 0:
            return torch.zeros(0, 3, 32, 32), []
        held = self.heldout
        mel = self._features(held.audio[:n], held.sample_rate, round_trip=False)
        with evaluating(trainable):
            logits = trainable(mel.to(next(trainable.parameters()).device))
        names = trainable.config.labels
        midi = (logits.pitch_class.argmax(1) + 12 * logits.octave.argmax(1)).tolist()
        best = [
            note_label(names[int(k)], m if p >= 0 else -1)
            for k, m, p in zip(logits.label.argmax(1), midi, held.pitch[:n], strict=True)
        ]
        own = [note_label(held.label[i], int(held.pitch[i])) for i in range(n)]
        labels = [f"ok: {b}" if b == o else f"{b} (is {o})" for b, o in zip(best, own, strict=True)]
        images = [
            torch.from_numpy(np.array(spectrogram_image(w, held.sample_rate, height=64)))
            for w in held.audio[:n]
        ]
        return torch.stack(images).permute(0, 3, 1, 2).float() / 255, labels


def _shifted(mel: torch.Tensor, shifts: torch.Tensor, floor: float) -> torch.Tensor:
    """Each log-mel ``(n_mels, frames)`` delayed by ``shifts[i]`` frames (advanced when
    negative), the uncovered frames at ``floor`` (silence)."""
    out = torch.full_like(mel, floor)
    t = mel.shape[-1]
    for i, s in enumerate(shifts.tolist()):
        if abs(s) >= t:
            continue
        if s >= 0:
            out[i, :, s:] = mel[i, :, : t - s]
        else:
            out[i, :, :s] = mel[i, :, -s:]
    return out
