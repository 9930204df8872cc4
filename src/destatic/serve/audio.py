"""Sounds out of the server: an audio model's waveforms as WAV files
(:func:`destatic.io.audio.write_audio`, float samples in [-1, 1] stored as 16-bit PCM), with the
request that makes each sound as JSON in the file's metadata, as ``destatic generate`` writes
it, so ``destatic generate --from sound.wav`` makes it again.

Files are written only under the server's own folder (``folder``: its private upload folder,
:func:`destatic.serve.security.private_upload_dir`); the API's are removed once read.

    path = write_wav(waveform, 44100, request, folder=upload_dir)   # for the UI's gr.Audio
    data = wav_bytes(waveform, 44100, request, folder=upload_dir)   # for the HTTP API
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from destatic.pipelines import GenerationRequest

__all__ = ["wav_bytes", "write_wav"]


def write_wav(
    waveform: Any, sample_rate: int, request: GenerationRequest, folder: str | os.PathLike
) -> Path:
    """One sound (``waveform``: (channels, samples) floats in [-1, 1]) as a new WAV in a fresh
    folder under ``folder``, with ``request`` in its metadata; returns its path."""
    from destatic.io.audio import write_audio

    path = Path(tempfile.mkdtemp(prefix="sound-", dir=folder)) / "sound.wav"
    write_audio(path, waveform, sample_rate, request.to_dict())
    return path


def wav_bytes(
    waveform: Any, sample_rate: int, request: GenerationRequest, folder: str | os.PathLike
) -> bytes:
    """:func:`write_wav` as bytes, the file removed; blocking work, so run it off the event
    loop."""
    with tempfile.TemporaryDirectory(prefix="api-", dir=folder) as where:
        return write_wav(waveform, sample_rate, request, where).read_bytes()
