"""Audio datasets (destatic.data.audio and its loaders): fields, splits, pitch, caching."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from destatic.data.audio import AudioClips, fit_length, resample, split_of_key
from destatic.data.audio_folder import load_audio_folder
from destatic.data.emoji import split_of
from destatic.data.notes import SOUNDFONT_PATH, load_notes, note_name, program_number
from destatic.data.sound_effects import effect_files, load_sound_effects
from destatic.data.speech import load_speech
from destatic.io.audio import write_audio

needs_soundfont = pytest.mark.skipif(
    not SOUNDFONT_PATH.is_file() or importlib.util.find_spec("tinysoundfont") is None,
    reason="apt-get install fluid-soundfont-gm; pip install --no-deps tinysoundfont",
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path / "cache"))


def f0_by_fft(x: np.ndarray, sample_rate: int) -> float:
    """The strongest spectral peak (Hz) of ``x`` (Hann window, zero-padded 8×, parabolic)."""
    n = len(x) * 8
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    k = int(np.argmax(mag[1:])) + 1
    a, b, c = np.log(mag[k - 1 : k + 2] + 1e-12)
    k = k + 0.5 * (a - c) / (a - 2 * b + c)
    return k * sample_rate / n


def _clips(n: int = 4, sample_rate: int = 8000) -> AudioClips:
    return AudioClips(
        audio=np.zeros((n, 32), np.float32),
        captions=[f"c{i}" for i in range(n)],
        split=np.array(["train", "heldout"] * (n // 2)),
        label=[f"l{i}" for i in range(n)],
        pitch=np.arange(n),
        variant=["v"] * n,
        seconds=np.full(n, 0.5),
        sample_rate=sample_rate,
    )


def test_audio_clips_subsets_keep_sample_rate_and_fields():
    clips = _clips()
    train, held = clips.train(), clips.heldout()
    assert (train.sample_rate, held.sample_rate) == (8000, 8000)
    assert train.captions == ["c0", "c2"] and held.pitch.tolist() == [1, 3]
    assert train.audio.shape == (2, 32) and train.seconds.dtype == np.float32


def test_audio_clips_rejects_mismatched_fields():
    with pytest.raises(ValueError, match="differ in length"):
        AudioClips(**{**_clips().__dict__, "captions": ["only one"]})


def test_fit_length_and_resample():
    x = np.ones((2, 10), np.float32)
    assert fit_length(x, 4).shape == (2, 4)
    padded = fit_length(x, 12)
    assert padded.shape == (2, 12) and padded[:, 10:].sum() == 0
    t = np.arange(22050) / 22050
    y = resample(np.sin(2 * np.pi * 440 * t), 22050, 16000)
    assert y.dtype == np.float32 and abs(len(y) - 16000) <= 1
    assert abs(f0_by_fft(y, 16000) - 440) < 1


def test_split_of_key_is_stable_and_about_ten_percent():
    keys = [(f"instrument {i}", p) for i in range(40) for p in range(25)]
    splits = [split_of_key(*k) for k in keys]
    assert splits == [split_of_key(*k) for k in keys]
    assert 0.05 < splits.count("heldout") / len(splits) < 0.15


def test_note_names_and_programs():
    assert [note_name(p) for p in (60, 61, 66, 21, 48)] == ["C4", "C#4", "F#4", "A0", "C3"]
    assert program_number("Acoustic Grand Piano") == 0 and program_number(73) == 73
    with pytest.raises(ValueError, match="unknown General MIDI program"):
        program_number("kazoo")


@needs_soundfont
def test_notes_small_set_fields_pitch_and_dynamics():
    clips = load_notes(programs=["acoustic grand piano", 73], pitches=[59, 60, 61], progress=False)
    assert len(clips) == 2 * 3 * 2 and clips.audio.shape == (12, 16384)
    assert clips.sample_rate == 16000 and clips.audio.dtype == np.float32
    assert np.abs(clips.audio).max() <= 1.0
    assert "acoustic grand piano, C4, forte" in clips.captions
    assert "flute, C#4, piano" in clips.captions
    assert set(clips.seconds.tolist()) <= {0.25, 0.5, 0.75}
    for name in ("acoustic grand piano", "flute"):
        i = clips.captions.index(f"{name}, C4, forte")
        assert clips.label[i] == name and clips.pitch[i] == 60 and clips.variant[i] == "forte"
        f0 = f0_by_fft(clips.audio[i][:4096], clips.sample_rate)
        assert abs(f0 / 261.63 - 1) < 0.02, (name, f0)
        # dynamics stay audible: the forte note is louder than the piano one (no per-clip norm)
        j = clips.captions.index(f"{name}, C4, piano")
        assert np.abs(clips.audio[i]).max() > 1.5 * np.abs(clips.audio[j]).max()
        # the note sounds while it is held
        hold = int(clips.seconds[i] * clips.sample_rate)
        assert np.sqrt(np.mean(clips.audio[i][:hold] ** 2)) > 0.02


@needs_soundfont
def test_notes_heldout_pairs_never_in_train_and_cache_is_identical():
    pitches = range(55, 67)
    clips = load_notes(programs=[0, 40, 56], pitches=pitches, progress=False)
    pair = [(lab, int(p)) for lab, p in zip(clips.label, clips.pitch, strict=True)]
    held = {pair[i] for i in np.flatnonzero(clips.split == "heldout")}
    train = {pair[i] for i in np.flatnonzero(clips.split == "train")}
    assert held and not held & train
    assert all(split_of_key(lab, note_name(p)) == "heldout" for lab, p in held)
    again = load_notes(programs=[0, 40, 56], pitches=pitches, progress=False)
    assert np.array_equal(again.audio, clips.audio) and again.captions == clips.captions
    assert again.split.tolist() == clips.split.tolist()


def test_notes_bad_settings_are_one_line():
    with pytest.raises(ValueError, match="MIDI pitch must be 0–127"):
        load_notes(pitches=[200], progress=False)
    with pytest.raises(ValueError, match="velocity for 'loud'"):
        load_notes(velocities={"loud": 300}, progress=False)


needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="apt-get install espeak-ng"
)
needs_sound_theme = pytest.mark.skipif(
    not effect_files(), reason="apt-get install sound-theme-freedesktop"
)


@needs_espeak
def test_speech_small_set_fields_and_heldout_pairs():
    voices = {"en+m3": "male voice 3", "en+f3": "female voice 3"}
    words = ["seven", "zero", "yes", "no", "left", "stop"]
    clips = load_speech(sample_rate=8000, samples=8192, words=words, voices=voices, progress=False)
    assert len(clips) == 12 and clips.audio.shape == (12, 8192) and clips.sample_rate == 8000
    i = clips.captions.index("the word seven, female voice 3")
    assert clips.label[i] == "seven" and clips.variant[i] == "female voice 3"
    assert clips.pitch[i] == -1 and 0.2 < clips.seconds[i] < 1.0
    # the word starts at once (leading silence cut) and the clip is silent after it
    spoken = int(clips.seconds[i] * 8000)
    assert np.abs(clips.audio[i][:800]).max() > 0.01
    assert np.abs(clips.audio[i][spoken + 80 :]).max() == 0
    for k, (word, voice) in enumerate(zip(clips.label, clips.variant, strict=True)):
        espeak_voice = {v: k for k, v in voices.items()}[voice]
        assert clips.split[k] == split_of_key(word, espeak_voice)
    with pytest.raises(ValueError, match="voice 'xx\\+zz'"):
        load_speech(words=["one"], voices={"xx+zz": "nobody"}, cache=False, progress=False)


@needs_sound_theme
def test_sound_effects_captions_from_file_names():
    clips = load_sound_effects(sample_rate=8000, samples=4000, progress=False)
    assert clips.sample_rate == 8000 and clips.audio.shape[1] == 4000
    assert {"bell", "camera shutter", "dialog warning"} <= set(clips.captions)
    i = clips.captions.index("camera shutter")
    assert clips.variant[i] == "freedesktop" and clips.label[i] == "camera shutter"
    assert 0 < clips.seconds[i] <= 0.5 and np.abs(clips.audio[i]).max() > 0.05
    assert set(clips.split.tolist()) <= {"train", "heldout"}


def test_sound_effects_without_themes_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="sound-theme-freedesktop"):
        load_sound_effects(root=tmp_path, progress=False)


def _tone_file(path, rate: int = 22050, seconds: float = 0.5, caption: str | None = "a tone"):
    t = np.arange(int(rate * seconds)) / rate
    write_audio(path, 0.3 * np.sin(2 * np.pi * 440 * t), rate)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_audio_folder_sidecars_resampled_and_bad_files_named(tmp_path):
    _tone_file(tmp_path / "tone.wav")
    _tone_file(tmp_path / "sub" / "long.flac", rate=8000, seconds=3.0, caption="a long tone")
    (tmp_path / "broken.ogg").write_bytes(b"OggS" + bytes(100))
    (tmp_path / "broken.txt").write_text("broken")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("empty")
    _tone_file(tmp_path / "nocaption.wav", caption=None)
    with pytest.warns(UserWarning) as record:
        clips = load_audio_folder(tmp_path, sample_rate=16000, samples=16384, progress=False)
    (message,) = [str(w.message) for w in record]
    assert "\n" not in message
    for words in ("1 empty (empty.wav)", "1 unreadable (broken.ogg)", "without caption"):
        assert words in message
    assert clips.captions == ["a long tone", "a tone"]
    assert clips.variant == ["sub/long.flac", "tone.wav"] and clips.sample_rate == 16000
    assert clips.seconds.tolist() == pytest.approx([16384 / 16000, 0.5])
    assert abs(f0_by_fft(clips.audio[1][:8000], 16000) - 440) < 2


def test_audio_folder_metadata_jsonl(tmp_path):
    _tone_file(tmp_path / "clips" / "x.wav", caption=None)
    _tone_file(tmp_path / "clips" / "y.wav", caption=None)
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "clips/x.wav", "caption": "x tone"}) + "\n"
    )
    with pytest.warns(UserWarning, match=r"1 without caption \(clips/y\.wav\)"):
        clips = load_audio_folder(tmp_path, progress=False)
    assert clips.captions == ["x tone"] and clips.split.tolist() == [split_of("clips/x.wav")]


def test_audio_folder_nothing_usable_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="no captioned, readable audio") as info:
        load_audio_folder(tmp_path, progress=False)
    assert "\n" not in str(info.value)
    (tmp_path / "only.wav").write_bytes(b"RIFF\x04\x00\x00\x00WAVE")
    (tmp_path / "only.txt").write_text("only")
    with pytest.raises(ValueError, match=r"1 unreadable \(only\.wav\)"):
        load_audio_folder(tmp_path, progress=False)
