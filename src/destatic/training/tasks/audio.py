"""The text → audio denoiser task (``[train] task = "audio"``): a timing-conditioned
:class:`~destatic.models.stable_audio.StableAudioDiT` over the log-mel frames of a
:class:`~destatic.models.mel.MelCodec`, trained with the objective of ``[objective]``.

Data (``[audio] dataset``; mono clips of ``samples`` at ``sample_rate``;
:mod:`destatic.data.audio`):

* ``"notes"``: General MIDI instrument notes rendered from Debian's FluidR3 SoundFont
  ("acoustic grand piano, C4, forte"); instrument × pitch pairs held out;
* ``"speech"``: espeak-ng saying words in several voices; word × voice pairs held out;
* ``"effects"``: the sound themes' event sounds, captioned from their names;
* ``"folder"``: a user's folder of wav/flac/ogg with captions (``[data] path``).

Each clip is encoded once (the codec has no weights), so a step costs only the network. The
timing conditioning (Stable Audio's, :mod:`destatic.pipelines.families.audio`) is the span
``[0, audible seconds]``: the time after which the clip stays 40 dB under its peak. A dropped
caption (``[data] caption_dropout``) zeroes the whole context, the unconditional branch that
inference uses for an empty negative prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from destatic.data.audio import AUDIO_DATASETS, load_audio_dataset
from destatic.models.mel import MelCodec, MelCodecConfig
from destatic.models.stable_audio import (
    StableAudioDiT,
    StableAudioDiTConfig,
    StableAudioProjection,
    StableAudioProjectionConfig,
)
from destatic.models.text import MiniLMTextEncoder
from destatic.pipelines import Pipeline, save
from destatic.pipelines.families.audio import AUDIO, timing_context
from destatic.training.config import Config, ConfigError, choice, require
from destatic.training.data import CaptionBank, draw_captions
from destatic.training.objectives import OBJECTIVES
from destatic.training.tasks.base import Batch, Task, evaluating, network_config, register

__all__ = ["AudioDenoiser", "AudioTask", "AudioTrainConfig", "audible_seconds"]

DATASETS = (*AUDIO_DATASETS, "folder")


@dataclass
class AudioTrainConfig:
    """The ``[audio]`` table."""

    dataset: str = "notes"  # notes | speech | effects | folder (the sounds of [data] path)
    sample_rate: int = 16000
    samples: int = 16384  # per clip: the model's length (samples / codec hop latent frames)
    codec: dict[str, Any] = field(default_factory=dict)  # MelCodecConfig fields
    network: dict[str, Any] = field(default_factory=dict)  # StableAudioDiTConfig fields
    conditioning_dim: int = 256  # width of the projected text and timing tokens

    def check(self) -> None:
        choice("audio.dataset", self.dataset, DATASETS)
        require(
            8000 <= self.sample_rate <= 96000,
            f"audio.sample_rate = {self.sample_rate}: use 8000 … 96000 Hz",
        )
        require(
            1024 <= self.samples <= 30 * self.sample_rate,
            f"audio.samples = {self.samples}: use 1024 … 30 s of samples",
        )
        require(self.conditioning_dim >= 8, "audio.conditioning_dim must be at least 8")


def audible_seconds(audio: np.ndarray, sample_rate: int, floor_db: float = -40.0) -> np.ndarray:
    """Per clip of ``audio`` (N, S): the end of its last 10 ms frame whose RMS is within
    ``floor_db`` of the clip's loudest frame (how long the sound lasts); 0 for silence."""
    hop = max(1, sample_rate // 100)
    n = audio.shape[1] // hop
    rms = np.sqrt((audio[:, : n * hop].reshape(len(audio), n, hop) ** 2).mean(-1) + 1e-20)
    loud = rms >= rms.max(1, keepdims=True) * 10 ** (floor_db / 20)
    last = n - np.argmax(loud[:, ::-1], axis=1)
    return np.where(rms.max(1) > 1e-6, last * hop / sample_rate, 0.0).astype(np.float32)


class AudioDenoiser(nn.Module):
    """What trains: the DiT and its text/timing projection, called as the objective calls a
    network — ``(x, t, tokens=, mask=, start=, end=, null=)``."""

    def __init__(self, dit: StableAudioDiT, projection: StableAudioProjection):
        super().__init__()
        self.dit, self.projection = dit, projection
        self.config = dit.config

    def forward(self, x, timestep, *, tokens, mask, start, end, null) -> torch.Tensor:
        cond = timing_context(self.projection, tokens, mask, start, end, null)
        return self.dit(x, timestep, **cond)


def _clips(cfg: Config, progress: bool):
    a: AudioTrainConfig = cfg.audio
    options = {"sample_rate": a.sample_rate, "samples": a.samples, "progress": progress}
    if a.dataset != "folder":
        return load_audio_dataset(a.dataset, **options)
    require(bool(cfg.data.path), 'audio.dataset = "folder" needs [data] path')
    from destatic.data.audio_folder import load_audio_folder

    return load_audio_folder(cfg.data.path, **options)


@register
class AudioTask(Task):
    """Text → audio denoiser on log-mel frames (see the module docstring)."""

    name = "audio"
    section = AudioTrainConfig

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.cfg = cfg
        a: AudioTrainConfig = cfg.audio
        try:
            self.objective = OBJECTIVES[cfg.objective.kind](**cfg.objective.options)
            self.codec = MelCodec(
                MelCodecConfig.from_dict({**a.codec, "sampling_rate": a.sample_rate})
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[objective] or [audio.codec]: {e}") from e
        clips = _clips(cfg, progress)
        clips = clips.train() if len(clips.train()) else clips
        chunks = np.array_split(clips.audio, max(1, len(clips) // 256))
        self.latents = torch.cat(  # (N, n_mels, frames)
            [self.codec.latents_from_waveforms(torch.from_numpy(c)) for c in chunks]
        )
        self.seconds = torch.from_numpy(audible_seconds(clips.audio, a.sample_rate))
        self.text_encoder = MiniLMTextEncoder.from_package(max_length=cfg.model.text_max_length)
        self.trainable = self._network(a).to(device)
        self.bank = CaptionBank(self.text_encoder, clips.captions, progress=progress)
        self.caption_ids = [self.bank.ids([c]) for c in clips.captions]

    def _network(self, a: AudioTrainConfig) -> AudioDenoiser:
        frames = a.samples // self.codec.hop_length
        fields = {
            "num_layers": 6,
            "attention_head_dim": 32,
            "num_attention_heads": 8,
            "num_key_value_attention_heads": 4,
            "cross_attention_dim": a.conditioning_dim,
            "time_proj_dim": 256,
            **a.network,
            "sample_size": frames,
            "in_channels": self.codec.config.n_mels,
            "out_channels": self.codec.config.n_mels,
            "global_states_input_dim": 2 * a.conditioning_dim,
            "cross_attention_input_dim": a.conditioning_dim,
        }
        dit = StableAudioDiT(network_config(StableAudioDiTConfig, fields, "audio.network"))
        projection = StableAudioProjection(
            StableAudioProjectionConfig(
                text_encoder_dim=self.text_encoder.dim,
                conditioning_dim=a.conditioning_dim,
                min_value=0.0,
                max_value=frames * self.codec.hop_length / a.sample_rate,
            )
        )
        return AudioDenoiser(dit, projection)

    @property
    def num_items(self) -> int:
        return len(self.caption_ids)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        ids = [self.caption_ids[int(i)] for i in index]
        captions = draw_captions(ids, generator, self.cfg.data.caption_dropout)
        sigma = self.objective.sample_sigma(len(index), generator)
        x0 = self.latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        seconds = self.seconds[index]
        return {"x0": x0, "caption": captions, "sigma": sigma, "noise": noise, "seconds": seconds}

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        caption = batch["caption"]
        cond = {
            "tokens": self.bank.tokens[caption].to(device),
            "mask": self.bank.mask[caption].to(device),
            "start": torch.zeros_like(batch["seconds"]).to(device),
            "end": batch["seconds"].to(device),
            "null": (caption == 0).to(device),
        }
        return self.objective.loss(
            model, batch["x0"].to(device), cond, sigma=batch["sigma"], noise=batch["noise"]
        )

    def pipeline(self, trainable: nn.Module) -> Pipeline:
        """The inference pipeline of ``trainable`` (the sample grids' guidance its default)."""
        o = self.objective
        defaults = {"guidance": self.cfg.sample.guidance}
        model: AudioDenoiser = getattr(trainable, "module", trainable)
        return Pipeline(
            model.dit,
            self.codec.to(next(model.parameters()).device),
            self.text_encoder,
            o.process,
            o.target,
            defaults,
            AUDIO,
            {"projection_model": model.projection},
        )

    def export(self, trainable: nn.Module, folder: Path) -> None:
        save(self.pipeline(trainable), folder)

    def sample_grid(self, trainable: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """Log-mel spectrograms of the sample prompts (low frequencies at the bottom)."""
        with evaluating(trainable):
            waves = self.pipeline(trainable).run(cfg.sample.request())
        mel = self.codec.latents_from_waveforms(waves.cpu())
        images = ((mel + 1) / 3.5).clamp(0, 1).flip(1).unsqueeze(1).repeat(1, 3, 1, 1)
        return images, list(cfg.sample.prompts)
