"""Captioned audio clips: the dataset type every audio loader returns, and what they share.

:class:`AudioClips` holds mono float32 waveforms ``(N, samples)`` in [-1, 1] at one
``sample_rate``, a caption each, and the fields the audio metrics score against (``label``: the
instrument / word / effect; ``pitch``: MIDI or -1; ``variant``: dynamics or voice; ``seconds``:
how long the sound lasts inside its clip, for timing conditioning).

Shared helpers: :func:`stable_hash` / :func:`split_of_key` (the train/held-out split as a pure
function of a string, as the emoji set's), :func:`fit_length` (pad with silence or cut),
:func:`resample` (soxr, band-limited), :func:`load_mono` (any audio file at one rate),
:func:`sounding_span` (where the sound is), and :func:`cached_clips` (built sets cached under
``$DESTATIC_CACHE/audio/{name}_{sha1 of the settings}.npz``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from destatic.data.base import SplitDataset, cache_root
from destatic.data.emoji import split_of
from destatic.io import read_audio, write_atomic

__all__ = [
    "AUDIO_DATASETS",
    "AudioClips",
    "cache_dir",
    "cached_clips",
    "fit_length",
    "load_audio_dataset",
    "load_mono",
    "resample",
    "sounding_span",
    "split_of_key",
    "stable_hash",
]

FORMAT_VERSION = 1
_TEXT_FIELDS = ("captions", "label", "variant", "split")
_ARRAY_FIELDS = ("audio", "pitch", "seconds")


@dataclass
class AudioClips(SplitDataset):
    """Mono clips ``audio`` ``(N, samples)`` float32 in [-1, 1], all at ``sample_rate`` Hz.

    ``captions``/``label``/``variant`` are lists of str, ``pitch`` int MIDI (-1: unpitched),
    ``seconds`` float32 (duration of the sound inside its clip), ``split`` "train"/"heldout".
    ``sample_rate`` is one int for the whole set and survives :meth:`train`/:meth:`heldout`.
    """

    audio: np.ndarray
    captions: list[str]
    split: np.ndarray
    label: list[str]
    pitch: np.ndarray
    variant: list[str]
    seconds: np.ndarray
    sample_rate: int

    def __post_init__(self) -> None:
        self.audio = np.asarray(self.audio, dtype=np.float32)
        if self.audio.ndim != 2:
            raise ValueError(f"audio must be (N, samples), got shape {self.audio.shape}")
        if int(self.sample_rate) < 1:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        self.sample_rate = int(self.sample_rate)
        self.pitch = np.asarray(self.pitch, dtype=np.int64)
        self.seconds = np.asarray(self.seconds, dtype=np.float32)
        self.split = np.asarray(self.split, dtype="<U7")
        n = len(self.audio)
        sizes = {name: len(getattr(self, name)) for name in (*_TEXT_FIELDS, *_ARRAY_FIELDS)}
        if any(size != n for size in sizes.values()):
            raise ValueError(f"AudioClips fields differ in length: {sizes}")

    @property
    def samples(self) -> int:
        """Samples per clip."""
        return self.audio.shape[1]

    def _subset(self, mask: np.ndarray) -> AudioClips:
        idx = np.flatnonzero(mask)
        values = {name: getattr(self, name) for name in (*_TEXT_FIELDS, *_ARRAY_FIELDS)}
        return dataclasses.replace(
            self,
            **{
                name: v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]
                for name, v in values.items()
            },
        )


def stable_hash(key: str) -> int:
    """The first 8 bytes of sha1(``key``) as an int: the same on every machine and run."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


def split_of_key(*parts: object) -> str:
    """``"heldout"`` for a fixed ~10% of compositions (``parts`` joined by ``" | "``, sha1), else
    ``"train"`` — the emoji set's :func:`~destatic.data.emoji.split_of` on the joined key, so
    every item of one composition (e.g. instrument × pitch, all velocities) lands on one side."""
    return split_of(" | ".join(str(p) for p in parts))


def fit_length(x: np.ndarray, samples: int) -> np.ndarray:
    """``x`` (last axis: time) cut to, or padded at the end with zeros to, ``samples``."""
    if x.shape[-1] >= samples:
        return x[..., :samples]
    pad = [(0, 0)] * (x.ndim - 1) + [(0, samples - x.shape[-1])]
    return np.pad(x, pad)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """``x`` (time on the last axis) from ``rate_in`` to ``rate_out`` Hz with soxr's
    band-limited (VHQ) resampler; float32 out."""
    x = np.asarray(x, dtype=np.float32)
    if rate_in == rate_out:
        return x
    import soxr

    if x.ndim == 1:
        return soxr.resample(x, rate_in, rate_out, quality="VHQ").astype(np.float32)
    flat = x.reshape(-1, x.shape[-1])
    out = soxr.resample(np.ascontiguousarray(flat.T), rate_in, rate_out, quality="VHQ").T
    return np.ascontiguousarray(out, dtype=np.float32).reshape(*x.shape[:-1], -1)


def load_mono(path: str | Path, sample_rate: int) -> np.ndarray:
    """The audio file at ``path`` as mono float32 ``(samples,)`` at ``sample_rate`` Hz (channels
    averaged, then :func:`resample`); :func:`destatic.io.audio.read_audio`'s one-line errors."""
    waveform, rate = read_audio(path)
    return resample(waveform.mean(axis=0), rate, sample_rate)


def sounding_span(x: np.ndarray, sample_rate: int, floor_db: float = -40.0) -> tuple[int, int]:
    """``(start, end)`` sample indices of the part of mono ``x`` that sounds: the first and last
    10 ms frame whose RMS is within ``-floor_db`` dB of the loudest frame's; ``(0, 0)`` for
    silence."""
    hop = max(1, sample_rate // 100)
    n = -(-len(x) // hop)
    frames = np.pad(x, (0, n * hop - len(x))).reshape(n, hop)
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    if n == 0 or rms.max() <= 0:
        return 0, 0
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (floor_db / 20))
    return int(loud[0] * hop), int(min(len(x), (loud[-1] + 1) * hop))


def cache_dir() -> Path:
    """``$DESTATIC_CACHE/audio``, else ``~/.cache/destatic/audio``."""
    return cache_root() / "audio"


def _cache_path(name: str, settings: Mapping) -> Path:
    key = json.dumps({"version": FORMAT_VERSION, **settings}, sort_keys=True, default=str)
    return cache_dir() / f"{name}_{hashlib.sha1(key.encode('utf-8')).hexdigest()[:16]}.npz"


def _save(path: Path, clips: AudioClips) -> None:
    arrays = {k: getattr(clips, k) for k in _ARRAY_FIELDS}
    arrays.update({k: np.array(getattr(clips, k), dtype=str) for k in _TEXT_FIELDS})
    arrays["sample_rate"] = np.array(clips.sample_rate)

    write_atomic(path, lambda f: np.savez_compressed(f, **arrays))


def _load(path: Path) -> AudioClips | None:
    try:
        with np.load(path) as z:
            values = {k: z[k] for k in _ARRAY_FIELDS}
            values.update({k: z[k].tolist() for k in _TEXT_FIELDS})
            return AudioClips(**values, sample_rate=int(z["sample_rate"]))
    except (OSError, KeyError, ValueError):  # unreadable or stale: the caller rebuilds
        return None


def cached_clips(
    name: str, settings: Mapping, build: Callable[[], AudioClips], *, cache: bool = True
) -> AudioClips:
    """The set ``build()`` makes for ``settings`` (JSON-able), read from
    ``cache_dir()/{name}_{hash}.npz`` when there, else built and written there atomically."""
    if not cache:
        return build()
    path = _cache_path(name, settings)
    if path.is_file() and (clips := _load(path)) is not None:
        return clips
    clips = build()
    _save(path, clips)
    return clips


#: The built-in captioned sound sets: name → (module, loader), each loader returning
#: :class:`AudioClips` and taking ``sample_rate``, ``samples`` and ``progress``.
AUDIO_DATASETS: dict[str, tuple[str, str]] = {
    "notes": ("destatic.data.notes", "load_notes"),
    "speech": ("destatic.data.speech", "load_speech"),
    "effects": ("destatic.data.sound_effects", "load_sound_effects"),
}


def load_audio_dataset(name: str, **options: object) -> AudioClips:
    """The :data:`AUDIO_DATASETS` set ``name`` (``options``: its loader's keywords); one line
    for an unknown name."""
    import importlib

    if name not in AUDIO_DATASETS:
        raise ValueError(f"unknown audio dataset {name!r}; choose from {', '.join(AUDIO_DATASETS)}")
    module, loader = AUDIO_DATASETS[name]
    return getattr(importlib.import_module(module), loader)(**options)
