"""Spoken words from espeak-ng (Debian ``espeak-ng``), a captioned speech set.

Each word of ``words`` (by default the digits "zero" … "nine" and ten short command words, as
Google's Speech Commands) is spoken by each voice of ``voices`` (espeak-ng voice + variant, e.g.
``en+f3``: English, female variant 3) at espeak-ng's default rate and pitch: ``espeak-ng -v VOICE
-w out.wav WORD`` (22 050 Hz), resampled with soxr to ``sample_rate``. The silence espeak-ng
puts before the word is cut (from the first 10 ms frame within 40 dB of the loudest,
:func:`destatic.data.audio.sounding_span`), then the clip is padded with silence or cut to
``samples``. Levels are espeak-ng's own (no normalisation; peaks ~0.5–0.75).

Captions: ``"the word seven, female voice 3"``; ``label`` is the word, ``variant`` the voice's
description (``"female voice 3"``), ``pitch`` -1, ``seconds`` the spoken length (to the last
sounding frame, at most the clip). About 10% of the word × voice pairs are ``"heldout"``
(:func:`destatic.data.audio.split_of_key`). The set is cached
(:func:`destatic.data.audio.cached_clips`).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from destatic.data.audio import (
    AudioClips,
    cached_clips,
    fit_length,
    load_mono,
    sounding_span,
    split_of_key,
)

__all__ = ["DEFAULT_VOICES", "DEFAULT_WORDS", "build_speech", "espeak_version", "load_speech"]

INSTALL_HINT = "apt-get install espeak-ng"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
DEFAULT_WORDS: tuple[str, ...] = DIGITS + COMMANDS
#: espeak-ng voice (language + variant) → its description in captions
DEFAULT_VOICES: Mapping[str, str] = {
    **{f"en+m{i}": f"male voice {i}" for i in (1, 2, 3, 4)},
    **{f"en+f{i}": f"female voice {i}" for i in (1, 2, 3, 4)},
}
RENDER_VERSION = 1  # bump when the rendering changes: the cache key includes it


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError(f"espeak-ng not found on PATH: {INSTALL_HINT}")
    return exe


def espeak_version() -> str:
    """``espeak-ng --version``'s line (part of the cache key: a new espeak-ng speaks anew)."""
    out = subprocess.run([_espeak(), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _speak(exe: str, voice: str, word: str, out: Path, sample_rate: int) -> np.ndarray:
    """``word`` spoken by ``voice`` as mono float32 at ``sample_rate`` (leading silence cut)."""
    done = subprocess.run(
        [exe, "-v", voice, "-w", str(out), "--", word], capture_output=True, text=True
    )
    if done.returncode != 0 or not out.is_file():
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
        raise ValueError(f"espeak-ng could not speak {word!r} with voice {voice!r}: {why}")
    x = load_mono(out, sample_rate)
    start, end = sounding_span(x, sample_rate)
    if end <= start:
        raise ValueError(f"espeak-ng spoke silence for {word!r} with voice {voice!r}")
    return x[start:end]


def build_speech(
    sample_rate: int = 16000,
    samples: int = 16384,
    words: Sequence[str] = DEFAULT_WORDS,
    voices: Mapping[str, str] = DEFAULT_VOICES,
    progress: bool = True,
) -> AudioClips:
    """Speak the set (no cache; see the module docstring)."""
    from tqdm import tqdm

    exe = _espeak()
    jobs = [(word, voice) for word in words for voice in voices]
    audio = np.zeros((len(jobs), samples), np.float32)
    seconds = np.zeros(len(jobs), np.float32)
    captions, variants, splits = [], [], []
    with tempfile.TemporaryDirectory(prefix="destatic-speech-") as tmp:
        for i, (word, voice) in enumerate(
            tqdm(jobs, desc="speech", unit="word", disable=not progress)
        ):
            spoken = _speak(exe, voice, word, Path(tmp) / "word.wav", sample_rate)
            audio[i] = np.clip(fit_length(spoken, samples), -1.0, 1.0)
            seconds[i] = min(len(spoken), samples) / sample_rate
            captions.append(f"the word {word}, {voices[voice]}")
            variants.append(voices[voice])
            splits.append(split_of_key(word, voice))
    return AudioClips(
        audio=audio,
        captions=captions,
        split=np.array(splits, dtype="<U7"),
        label=[word for word, _ in jobs],
        pitch=np.full(len(jobs), -1, np.int64),
        variant=variants,
        seconds=seconds,
        sample_rate=sample_rate,
    )


def load_speech(
    sample_rate: int = 16000,
    samples: int = 16384,
    words: Sequence[str] = DEFAULT_WORDS,
    voices: Mapping[str, str] = DEFAULT_VOICES,
    progress: bool = True,
    cache: bool = True,
) -> AudioClips:
    """The speech set (module docstring), from the cache when built before with these settings.
    ``voices`` maps espeak-ng voice names (``espeak-ng --voices``) to caption descriptions."""
    if sample_rate < 1 or samples < 1:
        raise ValueError(f"sample_rate and samples must be positive, got {sample_rate}, {samples}")
    words = [w.strip() for w in words]
    if not words or not voices or not all(words):
        raise ValueError("words and voices must each name at least one (no empty words)")
    settings = {
        "render": RENDER_VERSION,
        "espeak": espeak_version(),
        "sample_rate": int(sample_rate),
        "samples": int(samples),
        "words": words,
        "voices": dict(voices),
    }
    return cached_clips(
        "speech",
        settings,
        lambda: build_speech(sample_rate, samples, words, voices, progress),
        cache=cache,
    )
