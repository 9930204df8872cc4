"""Audio files (destatic.io.audio): WAV/FLAC round trips with the request, errors, spectrograms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from destatic.io.audio import (
    AudioFileError,
    read_audio,
    read_audio_request,
    spectrogram_image,
    write_audio,
)

RATE = 16000


def _tone(freq: float = 440.0, seconds: float = 0.5, channels: int = 2) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x * (0.5 + 0.5 * c) for c in range(channels)])


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_round_trip_with_request(tmp_path, suffix):
    x = _tone()
    # longer than libsndfile's 2 KB WAV string limit, and not ASCII
    request = {"prompt": "acoustic grand piano, C4 — forte", "seed": 7, "pad": "x" * 5000}
    path = write_audio(tmp_path / f"out{suffix}", x, RATE, request)
    y, rate = read_audio(path)
    assert rate == RATE and y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() < 2 / 32768  # 16-bit quantisation
    assert read_audio_request(path) == request
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]  # no temporary left


def test_wav_comment_is_standard_riff_info(tmp_path):
    import av

    path = write_audio(tmp_path / "a.wav", _tone(channels=1)[0], RATE, {"seed": 1})
    with av.open(str(path)) as container:
        assert json.loads(container.metadata["comment"]) == {"seed": 1}
        assert abs(float(container.duration) / 1e6 - 0.5) < 1e-3


def test_without_request_and_clipping(tmp_path):
    path = write_audio(tmp_path / "a.flac", np.array([0.0, 2.0, -3.0, 0.25]), 8000)
    assert read_audio_request(path) is None
    y, rate = read_audio(path)
    assert rate == 8000 and y.shape == (1, 4)
    assert np.allclose(y[0], [0.0, 1.0, -1.0, 0.25], atol=1e-4)


def test_bad_writes_are_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"a\.mp3: write audio as one of \.flac, \.wav"):
        write_audio(tmp_path / "a.mp3", _tone(), RATE)
    with pytest.raises(ValueError, match="NaN"):
        write_audio(tmp_path / "a.wav", np.full(10, np.nan), RATE)
    with pytest.raises(ValueError, match="channels, samples"):
        write_audio(tmp_path / "a.wav", np.zeros((1, 2, 3)), RATE)
    with pytest.raises(ValueError, match="sample_rate"):
        write_audio(tmp_path / "a.wav", _tone(), 0)
    assert not list(tmp_path.iterdir())


def test_bad_reads_are_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 8)
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    for path, error, words in [
        (corrupt, AudioFileError, "corrupt.wav: not a readable audio file"),
        (empty, AudioFileError, "empty.flac: the audio file is empty"),
        (tmp_path / "missing.wav", FileNotFoundError, "missing.wav: no such audio file"),
    ]:
        with pytest.raises(error, match=words) as info:
            read_audio(path)
        assert "\n" not in str(info.value)
        with pytest.raises(error):
            read_audio_request(path)


def test_spectrogram_image_orientation_and_colours():
    low = _tone(300.0, 0.5, 1)[0]
    high = _tone(5000.0, 0.5, 1)[0]
    x = np.concatenate([low, np.zeros(RATE // 2, np.float32), high])
    image = spectrogram_image(x, RATE, n_fft=512, n_mels=64)
    assert image.mode == "RGB" and image.height == 64
    assert abs(image.width - len(x) // 128) <= 1
    brightness = np.asarray(image, dtype=np.float64).sum(axis=2)  # (rows, columns)
    cols = image.width
    first, middle, last = (
        brightness[:, : cols // 4],
        brightness[:, cols // 2],
        brightness[:, -cols // 4 :],
    )
    # the 300 Hz tone is brightest near the bottom rows, the 5 kHz one higher up
    assert first.mean(axis=1).argmax() > 40 > last.mean(axis=1).argmax()
    assert middle.max() < brightness.max() / 4  # silence is dark
    lin = spectrogram_image(x, RATE, n_fft=512, n_mels=None, height=100)
    assert lin.size == (image.width, 100)
