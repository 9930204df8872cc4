"""Any folder of audio files with captions, as captioned clips.

The layouts are the image folder's (:mod:`destatic.data.folder`; the first one found wins):

* ``metadata.jsonl`` files (at the root or in any sub-folder), one JSON object a line with
  ``"file_name"`` (relative to that metadata file's folder) and a caption under
  ``caption_field`` (``"text"`` by default; ``"text"`` and ``"caption"`` as fallbacks);
* otherwise a ``name.txt`` caption beside each ``name.wav`` / ``.flac`` / ``.ogg`` (and the
  other suffixes of :data:`destatic.io.audio.READ_SUFFIXES`), searched recursively.

Hidden files and folders are skipped. Each file is decoded with libsndfile, averaged to mono,
resampled (soxr) to ``sample_rate`` and padded with silence or cut to ``samples``. ``label`` is
the caption, ``variant`` the file name relative to ``root``, ``pitch`` -1, ``seconds`` the file's
duration (at most the clip). Files that are missing, empty (0 bytes or 0 samples), unreadable or
corrupt, or without a (non-empty) caption are skipped, counted per reason and reported, by name,
in one warning; a folder with nothing left is one ValueError saying what was found. Nothing is
cached. The split is :func:`destatic.data.emoji.split_of` of the relative file name, as for
image and video folders.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from destatic.data.audio import AudioClips, fit_length, load_mono
from destatic.data.emoji import split_of
from destatic.data.folder import (
    IMAGE_SUFFIXES,
    METADATA_NAME,
    SHOWN_NAMES,
    _from_metadata,
    _from_sidecars,
    _visible,
)
from destatic.io.audio import READ_SUFFIXES, AudioFileError, EmptyAudioError

__all__ = ["AUDIO_SUFFIXES", "load_audio_folder"]

AUDIO_SUFFIXES = READ_SUFFIXES


def _entries(
    root: Path, caption_field: str, skipped: dict[str, list[str]]
) -> tuple[str, list[tuple[Path, str, str]]]:
    """``(layout, [(path, name, caption)])`` of the captioned audio files under ``root``."""
    metadata_files = sorted(p for p in root.rglob(METADATA_NAME) if _visible(p, root))
    if not metadata_files:
        return "audio + .txt caption pairs", _from_sidecars(root, skipped, AUDIO_SUFFIXES)
    found = _from_metadata(root, metadata_files, caption_field, skipped)
    # _from_metadata reports the folder's uncaptioned *images*; report uncaptioned audio instead
    named = {name for _, name, _ in found} | set(skipped["without caption"])
    skipped["without caption"] = [
        n for n in skipped["without caption"] if Path(n).suffix.lower() not in IMAGE_SUFFIXES
    ]
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.suffix.lower() in AUDIO_SUFFIXES and _visible(path, root) and name not in named:
            skipped["without caption"].append(name)
    return f"{len(metadata_files)} {METADATA_NAME}", found


def _summary(skipped: dict[str, list[str]]) -> str:
    return ", ".join(
        f"{len(v)} {reason} ({', '.join(v[:SHOWN_NAMES])}{', …' if len(v) > SHOWN_NAMES else ''})"
        for reason, v in skipped.items()
        if v
    )


def load_audio_folder(
    root: str | Path,
    sample_rate: int = 16000,
    samples: int = 16384,
    *,
    caption_field: str = "text",
    progress: bool = True,
) -> AudioClips:
    """Every captioned, readable audio file under ``root`` (module docstring)."""
    if sample_rate < 1 or samples < 1:
        raise ValueError(f"sample_rate and samples must be positive, got {sample_rate}, {samples}")
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    skipped: dict[str, list[str]] = {
        "missing": [],
        "empty": [],
        "unreadable": [],
        "without caption": [],
        "bad metadata line": [],
    }
    layout, entries = _entries(root, caption_field, skipped)
    clips, seconds, captions, names = [], [], [], []
    for path, name, caption in tqdm(entries, desc="audio", unit="file", disable=not progress):
        try:
            x = load_mono(path, sample_rate)
        except FileNotFoundError:
            skipped["missing"].append(name)
            continue
        except EmptyAudioError:
            skipped["empty"].append(name)
            continue
        except AudioFileError:
            skipped["unreadable"].append(name)
            continue
        clips.append(np.clip(fit_length(x, samples), -1.0, 1.0))
        seconds.append(min(len(x), samples) / sample_rate)
        captions.append(caption)
        names.append(name)
    summary = _summary(skipped)
    if not clips:
        raise ValueError(
            f"no captioned, readable audio in {root} (layout: {layout}; {len(entries)} captioned "
            f"entries; skipped: {summary or 'nothing'}; audio suffixes: "
            f"{', '.join(sorted(AUDIO_SUFFIXES))})"
        )
    if summary:
        warnings.warn(f"{root}: skipped {sum(map(len, skipped.values()))}: {summary}", stacklevel=2)
    return AudioClips(
        audio=np.stack(clips),
        captions=captions,
        split=np.array([split_of(n) for n in names], dtype="<U7"),
        label=list(captions),
        pitch=np.full(len(clips), -1, np.int64),
        variant=names,
        seconds=np.array(seconds, np.float32),
        sample_rate=sample_rate,
    )
