"""`destatic generate` on an audio model: one WAV or FLAC per sound (name-0.wav, … for several;
NNN-prompt-seedS.wav in a folder), the request in the file's metadata so --from makes the same
sound again, --seconds/--seconds-start as the request's span, --spectrogram PNGs that --from
reads too; options that do nothing for the model's media are one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from destatic.cli import app
from destatic.io.audio import read_audio, read_audio_request
from destatic.pipelines import save
from tests.audio_fixtures import RATE, tiny_audio_pipeline


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def tiny_audio_model(tmp_path_factory) -> Path:
    """The tiny random audio pipeline (0.256 s at 8 kHz), saved."""
    folder = tmp_path_factory.mktemp("audio") / "model"
    save(tiny_audio_pipeline(), folder)
    return folder


def generate(*args: str):
    return CliRunner().invoke(app, ["generate", *args])


def one_line_error(result, *fragments: str) -> None:
    """Exit status 2 and one ``error: …`` line, the last on stderr, holding every fragment
    (after transformers' progress bar, if any)."""
    assert result.exit_code == 2, result.output
    text = result.stderr
    assert text.count("error: ") == 1, text
    line = text[text.index("error: ") :].strip()
    assert "\n" not in line, text
    for fragment in fragments:
        assert fragment in line, line


def test_a_wav_holds_its_request_and_from_makes_the_same_sound(tiny_audio_model, tmp_path):
    model = ["--model", str(tiny_audio_model), "--steps", "2", "--no-progress"]
    first = tmp_path / "c4.wav"
    span = ["--seconds", "0.1", "--seconds-start", "0.05", "--seed", "7"]
    result = generate("acoustic grand piano, C4", *model, *span, "-o", str(first))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {first}"
    wave, rate = read_audio(first)
    assert rate == RATE and wave.shape == (1, 800)  # 0.1 s at 8 kHz
    assert np.abs(wave).max() > 0.01  # not silence
    stored = read_audio_request(first)
    assert stored["prompt"] == "acoustic grand piano, C4"
    assert (stored["seconds"], stored["seconds_start"], stored["seed"]) == (0.1, 0.05, 7)
    assert (stored["model"], stored["steps"], stored["sampler"]) == (
        str(tiny_audio_model),
        2,
        "dpmpp_2m",
    )

    again = tmp_path / "again.wav"
    result = generate("--from", str(first), "-o", str(again), "--no-progress")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_audio(again)[0], wave)  # the same sound, sample for sample
    assert read_audio_request(again) == stored
    one_line_error(generate("--from", str(first), "--seconds", "0.2"), "--seconds would be ignored")


def test_several_sounds_are_numbered_with_their_spectrograms(tiny_audio_model, tmp_path):
    model = ["--model", str(tiny_audio_model), "--steps", "2", "--no-progress"]
    out, spectrogram = tmp_path / "tones.flac", tmp_path / "spec.png"
    args = ["a low tone", "a high tone", *model, "-o", str(out), "--spectrogram", str(spectrogram)]
    result = generate(*args)
    assert result.exit_code == 0, result.output
    sounds = [tmp_path / f"tones-{i}.flac" for i in range(2)]
    pictures = [tmp_path / f"spec-{i}.png" for i in range(2)]
    assert result.stdout.split() == [w for p in [*sounds, *pictures] for w in ("wrote", str(p))]
    waves = [read_audio(p)[0] for p in sounds]
    assert all(w.shape == (1, 2048) for w in waves)  # the model's whole 0.256 s
    assert [read_audio_request(p)["prompt"] for p in sounds] == ["a low tone", "a high tone"]
    assert [read_audio_request(p)["seed"] for p in sounds] == [0, 1]
    picture = Image.open(pictures[1])
    assert picture.mode == "RGB" and picture.width > 1 and picture.height > 1
    # a spectrogram holds its sound's request: --from on it makes the sound again
    back = tmp_path / "back.flac"
    result = generate("--from", str(pictures[1]), "-o", str(back), "--no-progress")
    assert result.exit_code == 0, result.output
    # sound 1 of a batch of two, made alone: the same up to batched float arithmetic
    np.testing.assert_allclose(read_audio(back)[0], waves[1], atol=2e-3)


def test_without_o_sounds_go_to_out_as_wav(tiny_audio_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = generate(
        "a high tone", "--model", str(tiny_audio_model), "--steps", "1", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000-a-high-tone-seed0.wav"]


def test_options_that_do_nothing_for_the_media_are_one_line(tiny_audio_model, tmp_path):
    model = ["--model", str(tiny_audio_model), "--steps", "1", "--no-progress"]
    one_line_error(
        generate("x", *model, "-o", str(tmp_path / "x.png")),
        "this is an audio model; name a .wav or .flac file",
        "--spectrogram x.png",
    )
    one_line_error(generate("x", *model, "-o", str(tmp_path / "x.mp4")), "audio model")
    one_line_error(
        generate("x", *model, "--size", "32", "-o", str(tmp_path / "x.wav")),
        "--size is for image and video models; this is an audio model",
    )
    one_line_error(generate("x", *model, "--sheet", str(tmp_path / "s.png")), "--sheet is for")
    one_line_error(
        generate("x", *model, "--seconds", "5", "-o", str(tmp_path / "x.wav")),
        "at most 0.256 s",
    )
    one_line_error(
        generate("x", *model, "--seconds-start", "0.3", "-o", str(tmp_path / "x.wav")),
        "seconds_start",
    )
    one_line_error(
        generate("x", *model, "--spectrogram", str(tmp_path / "s.jpg")), "name a .png file"
    )
    # the bundled image model
    one_line_error(
        generate("x", "--steps", "1", "-o", str(tmp_path / "x.wav")), "this model draws images"
    )
    one_line_error(
        generate("x", "--steps", "1", "--seconds", "1", "-o", str(tmp_path / "x.png")),
        "--seconds needs an audio model",
    )
    assert not list(tmp_path.glob("x*"))  # nothing written


def test_bad_seconds_and_missing_files_are_refused_before_loading(tmp_path):
    for seconds in ("0", "-1", "nan", "inf"):
        result = generate("x", "--seconds", seconds)
        assert result.exit_code == 2 and "--seconds" in result.output, result.output
    one_line_error(generate("--from", str(tmp_path / "gone.wav")), "gone.wav: no such audio file")
    plain = tmp_path / "plain.wav"
    import soundfile as sf

    sf.write(plain, np.zeros(800, np.float32), RATE)
    one_line_error(generate("--from", str(plain)), "carries no destatic generation parameters")


def test_serve_passes_max_seconds_to_the_server_limits(monkeypatch):
    import destatic.serve

    seen = {}

    def create_app(model, limits, **kwargs):
        seen["limits"] = limits
        raise ValueError("stop here")

    monkeypatch.setattr(destatic.serve, "create_app", create_app)
    result = CliRunner().invoke(app, ["serve", "--max-seconds", "2.5"])
    assert result.exit_code == 2 and "stop here" in result.stderr
    assert seen["limits"].max_seconds == 2.5
    for bad in ("0", "-1", "inf"):
        result = CliRunner().invoke(app, ["serve", "--max-seconds", bad])
        assert result.exit_code == 2 and "--max-seconds" in result.output, result.output
