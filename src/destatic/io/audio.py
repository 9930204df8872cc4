"""Audio files in and out (``soundfile``/libsndfile), and spectrogram pictures of waveforms.

:func:`write_audio` writes ``.wav`` (16-bit PCM) or ``.flac`` (16-bit), atomically
(:func:`destatic.io.files.atomic_file`), with the generation request as JSON in the file's comment
metadata (the FLAC Vorbis ``COMMENT``; the WAV ``LIST/INFO`` ``ICMT`` chunk, written and read
here because libsndfile drops WAV strings over 2 KB);
:func:`read_audio_request` reads it back, so ``--from song.wav`` regenerates it.
:func:`read_audio` reads any format libsndfile knows (:data:`READ_SUFFIXES`) as float32
``(channels, samples)``; a missing, corrupt or empty file is one line that names it.

:func:`spectrogram_image`: the magnitude STFT (Hann window) of a waveform, optionally on a mel
scale (Slaney, as librosa), in dB relative to its maximum and clipped to ``db_range`` dB below,
coloured with the perceptually uniform "magma" map (interpolated in numpy from 17 control points
of matplotlib's table); time runs left to right, low frequencies at the bottom.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from destatic.io.files import atomic_file, write_error_reason

__all__ = [
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "AudioFileError",
    "EmptyAudioError",
    "read_audio",
    "read_audio_request",
    "spectrogram_image",
    "write_audio",
]

#: suffix → (libsndfile format, subtype) of the files :func:`write_audio` makes
WRITE_SUFFIXES: dict[str, tuple[str, str]] = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
}
MAX_COMMENT_BYTES = 1 << 24  # a longer RIFF LIST chunk is not read for its comment
READ_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif"})

# matplotlib's "magma" at 0, 1/16, …, 1 (sRGB 0–255)
_MAGMA = np.array(
    [
        (0, 0, 4), (10, 8, 34), (29, 17, 71), (54, 16, 107), (81, 18, 124), (106, 28, 129),
        (131, 38, 129), (156, 46, 127), (183, 55, 121), (208, 65, 111), (231, 82, 99),
        (245, 107, 92), (252, 137, 97), (254, 167, 114), (254, 196, 136), (253, 226, 163),
        (252, 253, 191),
    ],
    dtype=np.float64,
)  # fmt: skip


class AudioFileError(ValueError):
    """An audio file that cannot be read: corrupt, empty, or not audio (one line, names it)."""


class EmptyAudioError(AudioFileError):
    """An audio file of 0 bytes or 0 samples."""


def _as_channels(waveform: Any) -> np.ndarray:
    """``waveform`` (samples,) or (channels, samples), numpy or torch, as float32 (C, S)."""
    if hasattr(waveform, "detach"):  # a torch tensor, without importing torch here
        waveform = waveform.detach().float().cpu().numpy()
    x = np.asarray(waveform, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] < 1 or not 1 <= x.shape[0] <= 64:
        raise ValueError(
            f"waveform must be (samples,) or (channels, samples) with 1–64 channels and at least "
            f"one sample, got shape {tuple(x.shape)}"
        )
    if not np.isfinite(x).all():
        raise ValueError("waveform has NaN or infinite samples")
    return x


def write_audio(
    path: str | os.PathLike,
    waveform: Any,
    sample_rate: int,
    request: dict | None = None,
) -> Path:
    """Write ``waveform`` (C, S) or (S,) float in [-1, 1] (clipped) at ``sample_rate`` Hz to
    ``path`` (``.wav`` or ``.flac``, 16-bit), atomically, with ``request`` as JSON in its comment;
    returns the path."""
    import soundfile as sf

    path = Path(path)
    kind = WRITE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{path}: write audio as one of {', '.join(sorted(WRITE_SUFFIXES))} (by the suffix)"
        )
    if int(sample_rate) != sample_rate or not 1 <= sample_rate <= 655350:
        raise ValueError(f"sample_rate must be a positive integer of Hz, got {sample_rate}")
    x = np.clip(_as_channels(waveform), -1.0, 1.0)
    comment = None if request is None else json.dumps(request, ensure_ascii=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        with sf.SoundFile(
            tmp, "w", int(sample_rate), x.shape[0], subtype=kind[1], format=kind[0]
        ) as f:
            if comment is not None and kind[0] == "FLAC":
                f.comment = comment
            f.write(x.T)
        if comment is not None and kind[0] == "WAV":
            _append_wav_comment(tmp, comment)
    return path


def _append_wav_comment(path: Path, text: str) -> None:
    """Append a ``LIST/INFO`` chunk holding ``ICMT`` = ``text`` to the RIFF/WAVE file at
    ``path`` and fix the RIFF size (chunks are word-aligned; the string is NUL-terminated)."""
    data = text.encode("utf-8") + b"\0"
    data += b"\0" * (len(data) % 2)
    icmt = b"ICMT" + struct.pack("<I", len(data)) + data
    chunk = b"LIST" + struct.pack("<I", 4 + len(icmt)) + b"INFO" + icmt
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size % 2:
            f.write(b"\0")
            size += 1
        f.write(chunk)
        f.seek(4)
        f.write(struct.pack("<I", size - 8 + len(chunk)))


def _wav_comment(path: Path) -> str | None:
    """The ``ICMT`` string of the first ``LIST/INFO`` chunk of a RIFF/WAVE file, or None."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while len(header := f.read(8)) == 8:
            kind, size = header[:4], struct.unpack("<I", header[4:])[0]
            if kind != b"LIST" or size > MAX_COMMENT_BYTES:
                f.seek(size + size % 2, os.SEEK_CUR)
                continue
            body = f.read(size + size % 2)
            pos = 4
            while body[:4] == b"INFO" and pos + 8 <= len(body):
                sub, sub_size = body[pos : pos + 4], struct.unpack("<I", body[pos + 4 : pos + 8])[0]
                if sub == b"ICMT":
                    text = body[pos + 8 : pos + 8 + sub_size].split(b"\0", 1)[0]
                    return text.decode("utf-8", errors="replace")
                pos += 8 + sub_size + sub_size % 2
    return None


def _open(path: Path):
    """The file as an open ``soundfile.SoundFile``; one-line errors for missing or corrupt."""
    import soundfile as sf

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    if path.stat().st_size == 0:
        raise EmptyAudioError(f"{path}: the audio file is empty (0 bytes)")
    try:
        return sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as e:
        reason = " ".join(write_error_reason(e).split())
        raise AudioFileError(f"{path}: not a readable audio file ({reason})") from e


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """``(waveform, sample_rate)``: float32 ``(channels, samples)`` in [-1, 1] and Hz."""
    import soundfile as sf

    path = Path(path)
    with _open(path) as f:
        try:
            data = f.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            reason = " ".join(write_error_reason(e).split())
            raise AudioFileError(f"{path}: not a readable audio file ({reason})") from e
        rate = int(f.samplerate)
    if data.shape[0] == 0:
        raise EmptyAudioError(f"{path}: the audio file has no samples")
    return np.ascontiguousarray(data.T), rate


def read_audio_request(path: str | os.PathLike) -> dict | None:
    """The request :func:`write_audio` stored in ``path``'s comment, or None if there is none
    (or the comment is not a JSON object)."""
    path = Path(path)
    with _open(path) as f:
        wav = f.format == "WAV"
        comment = None if wav else f.comment
    if wav:
        comment = _wav_comment(path)
    try:
        request = json.loads(comment) if comment else None
    except json.JSONDecodeError:
        return None
    return request if isinstance(request, dict) else None


def _stft_magnitude(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|STFT| ``(n_fft // 2 + 1, frames)`` of mono ``x``: Hann window, centred frames
    (``n_fft // 2`` zeros of padding at each end)."""
    x = np.pad(x.astype(np.float64), n_fft // 2)
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * np.hanning(n_fft + 1)[:-1], axis=-1)).T


def _magma(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → uint8 RGB by linear interpolation of :data:`_MAGMA`."""
    pos = np.clip(v, 0.0, 1.0) * (len(_MAGMA) - 1)
    lo = np.minimum(pos.astype(np.int64), len(_MAGMA) - 2)
    t = (pos - lo)[..., None]
    rgb = _MAGMA[lo] * (1 - t) + _MAGMA[lo + 1] * t
    return np.round(rgb).astype(np.uint8)


def spectrogram_image(
    waveform: Any,
    sample_rate: int,
    *,
    n_fft: int = 1024,
    hop_length: int | None = None,
    n_mels: int | None = 128,
    db_range: float = 80.0,
    height: int | None = None,
):
    """A PIL RGB image of the spectrogram of ``waveform`` ((S,) or (C, S); channels averaged):
    one column per STFT frame (``hop_length`` default ``n_fft // 4``), one row per mel band
    (``n_mels``; None: per linear-frequency bin), low frequencies at the bottom; dB relative to
    the loudest cell, ``db_range`` dB of range, magma colours. ``height`` resizes the rows."""
    from PIL import Image

    x = _as_channels(waveform).mean(axis=0)
    if n_fft < 2 or not db_range > 0:
        raise ValueError(f"n_fft must be ≥ 2 and db_range > 0, got {n_fft}, {db_range}")
    hop = hop_length or max(1, n_fft // 4)
    power = _stft_magnitude(x, n_fft, hop) ** 2
    if n_mels:
        from transformers.audio_utils import mel_filter_bank

        bank = mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=sample_rate / 2,
            sampling_rate=int(sample_rate),
            norm="slaney",
            mel_scale="slaney",
        )  # (bins, mels)
        power = bank.T @ power
    db = 10 * np.log10(np.maximum(power, 1e-20))
    level = (db - (db.max() - db_range)) / db_range  # 0: db_range below the peak, 1: the peak
    image = Image.fromarray(_magma(level[::-1]), "RGB")  # row 0 = the highest frequency
    if height and height != image.height:
        image = image.resize((image.width, int(height)), Image.Resampling.BILINEAR)
    return image
