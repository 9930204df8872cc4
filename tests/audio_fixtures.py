"""A tiny audio pipeline (destatic's own family: a Stable Audio DiT on mel frames, MiniLM text)
with random weights, and a folder of captioned tones, for the audio tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from destatic.models.mel import MelCodec, MelCodecConfig
from destatic.models.stable_audio import (
    StableAudioDiT,
    StableAudioDiTConfig,
    StableAudioProjection,
    StableAudioProjectionConfig,
)
from destatic.models.text import MiniLMTextEncoder
from destatic.pipelines import Pipeline
from destatic.pipelines.families import AUDIO
from destatic.process import RectifiedFlow

RATE = 8000
CODEC = dict(sampling_rate=RATE, n_fft=256, hop_length=64, n_mels=16, f_max=4000.0)
TINY_DIT = dict(
    sample_size=32,  # 32 frames × 64 samples: 0.256 s at 8 kHz
    in_channels=16,
    out_channels=16,
    num_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    num_key_value_attention_heads=1,
    cross_attention_dim=16,
    time_proj_dim=16,
    global_states_input_dim=32,
    cross_attention_input_dim=16,
)
TONES = {"low": 220.0, "middle": 440.0, "high": 880.0}


def tiny_audio_pipeline(seed: int = 0) -> Pipeline:
    """A randomly initialised audio pipeline that draws 0.256 s at 8 kHz."""
    torch.manual_seed(seed)
    codec = MelCodec(MelCodecConfig(**CODEC, griffin_lim_iters=4))
    encoder = MiniLMTextEncoder.from_package(max_length=8)
    projection = StableAudioProjection(
        StableAudioProjectionConfig(
            text_encoder_dim=encoder.dim, conditioning_dim=16, min_value=0, max_value=0.256
        )
    )
    dit = StableAudioDiT(StableAudioDiTConfig(**TINY_DIT))
    extras = {"projection_model": projection}
    pipe = Pipeline(dit, codec, encoder, RectifiedFlow(), "flow", {}, AUDIO, extras)
    return pipe.to(dtype=torch.float32)


def tone(freq: float, seconds: float, total: float = 0.3, rate: int = RATE) -> np.ndarray:
    """A sine of ``freq`` Hz lasting ``seconds`` (10 ms fades), then silence to ``total``."""
    t = np.arange(int(total * rate)) / rate
    envelope = np.clip(np.minimum(t, seconds - t) / 0.01, 0, 1)
    return (0.5 * np.sin(2 * np.pi * freq * t) * envelope).astype(np.float32)


def write_tones(root: Path) -> Path:
    """Six captioned WAVs ("a high tone" …, two lengths each) under ``root``."""
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    for name, freq in TONES.items():
        for seconds in (0.1, 0.2):
            stem = root / f"{name}-{int(seconds * 1000)}"
            sf.write(stem.with_suffix(".wav"), tone(freq, seconds), RATE)
            stem.with_suffix(".txt").write_text(f"a {name} tone")
    return root
