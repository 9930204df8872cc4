"""Sound effects from the Debian sound themes, captioned from their file names.

Every ``.oga`` / ``.ogg`` / ``.wav`` / ``.flac`` under ``/usr/share/sounds/<theme>/`` (Debian
``sound-theme-freedesktop``; any other installed theme, e.g. ``ubuntu-sounds``, is read too) is
decoded with libsndfile, averaged to mono, resampled (soxr) to ``sample_rate`` and padded or cut
to ``samples``. The caption is the file name without its suffix, dashes and underscores as spaces
(``camera-shutter.oga`` → ``"camera shutter"``); ``label`` is the same, ``variant`` the theme
(its folder name, e.g. ``"freedesktop"``), ``pitch`` -1 and ``seconds`` the file's duration (at
most the clip). The split is :func:`destatic.data.audio.split_of_key` of the caption (a theme's
sound and another theme's sound of the same name land on the same side). Few items (35 in
freedesktop), so nothing is cached.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from destatic.data.audio import AudioClips, fit_length, load_mono, split_of_key

__all__ = ["EFFECT_SUFFIXES", "SOUNDS_ROOT", "effect_files", "load_sound_effects"]

SOUNDS_ROOT = Path("/usr/share/sounds")
EFFECT_SUFFIXES = frozenset({".oga", ".ogg", ".wav", ".flac"})
INSTALL_HINT = "apt-get install sound-theme-freedesktop"


def caption_of(path: Path) -> str:
    """``camera-shutter.oga`` → ``"camera shutter"``."""
    return " ".join(re.split(r"[-_\s]+", path.stem.lower())).strip()


def effect_files(root: Path = SOUNDS_ROOT) -> list[tuple[str, Path]]:
    """``(theme, path)`` of every sound file under ``root/<theme>/``, sorted."""
    if not root.is_dir():
        return []
    return [
        (path.relative_to(root).parts[0], path)
        for path in sorted(root.rglob("*"))
        if path.suffix.lower() in EFFECT_SUFFIXES
        and path.is_file()
        and len(path.relative_to(root).parts) > 1
    ]


def load_sound_effects(
    sample_rate: int = 16000,
    samples: int = 32768,
    root: Path = SOUNDS_ROOT,
    progress: bool = True,
) -> AudioClips:
    """The sound theme effects (module docstring); a FileNotFoundError naming the package when
    ``root`` holds none."""
    from tqdm import tqdm

    if sample_rate < 1 or samples < 1:
        raise ValueError(f"sample_rate and samples must be positive, got {sample_rate}, {samples}")
    files = effect_files(Path(root))
    if not files:
        raise FileNotFoundError(f"no sound theme files under {root}: {INSTALL_HINT}")
    audio = np.zeros((len(files), samples), np.float32)
    seconds = np.zeros(len(files), np.float32)
    for i, (_, path) in enumerate(tqdm(files, desc="effects", unit="file", disable=not progress)):
        x = load_mono(path, sample_rate)
        audio[i] = np.clip(fit_length(x, samples), -1.0, 1.0)
        seconds[i] = min(len(x), samples) / sample_rate
    captions = [caption_of(path) for _, path in files]
    return AudioClips(
        audio=audio,
        captions=captions,
        split=np.array([split_of_key(c) for c in captions], dtype="<U7"),
        label=list(captions),
        pitch=np.full(len(files), -1, np.int64),
        variant=[theme for theme, _ in files],
        seconds=seconds,
        sample_rate=sample_rate,
    )
