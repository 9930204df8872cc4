"""Audio metrics (destatic.metrics.audio) and the audio evaluator (its network, training task,
saving, the bundled one, `destatic eval` on an audio model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from destatic.cli import app
from destatic.data.audio import AudioClips, resample
from destatic.io import CheckpointError
from destatic.metrics.audio import (
    DEFAULT_AUDIO_EVALUATOR,
    AudioEvaluator,
    audio_table,
    estimate_midi,
    evaluate_audio,
    is_audio_evaluator_folder,
    load_audio_classifier,
    load_audio_evaluator,
    pitch_scores,
    save_audio_evaluator,
    score_sounds,
    spectrogram_sheet,
    split_sets,
)
from destatic.models.audio_evaluator import (
    REFERENCE_DATASETS,
    AudioClassifier,
    AudioEvaluatorConfig,
    classifier_loss,
    load_reference_clips,
)
from destatic.training import ConfigError, load_config, train

RATE = 8000
SAMPLES = 4096  # 0.512 s
MEL = dict(sampling_rate=RATE, n_fft=256, hop_length=64, n_mels=32, f_max=4000.0)
SHAPES = ("sine", "square")


def harmonic_tone(midi: float, shape: str, amplitude: float = 0.5, samples: int = SAMPLES):
    """A note of MIDI pitch ``midi``: a sine, or a band-limited square (odd harmonics, 1/k),
    with 10 ms fades."""
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    t = np.arange(samples) / RATE
    ks = [1] if shape == "sine" else [k for k in range(1, 40, 2) if k * f0 < RATE / 2]
    wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in ks)
    fade = np.clip(np.minimum(t, t[-1] - t) / 0.01, 0, 1)
    return (amplitude * wave / np.abs(wave).max() * fade).astype(np.float32)


def load_tones(progress: bool = False) -> AudioClips:
    """48 captioned tones: sine / square × MIDI 57 … 68 × two levels; the (shape, pitch) pairs
    with pitch % 5 == shape index are held out."""
    rows = [
        (s, p, a) for i, s in enumerate(SHAPES) for p in range(57, 69) for a in ("soft", "loud")
    ]
    return AudioClips(
        audio=np.stack([harmonic_tone(p, s, 0.25 if a == "soft" else 0.6) for s, p, a in rows]),
        captions=[f"{s} wave, MIDI {p}, {a}" for s, p, a in rows],
        split=np.array(["heldout" if p % 5 == SHAPES.index(s) else "train" for s, p, _ in rows]),
        label=[s for s, _, _ in rows],
        pitch=np.array([p for _, p, _ in rows]),
        variant=[a for _, _, a in rows],
        seconds=np.full(len(rows), SAMPLES / RATE, np.float32),
        sample_rate=RATE,
    )


@pytest.fixture
def tones(monkeypatch):
    monkeypatch.setitem(REFERENCE_DATASETS, "tones", ("tests.test_audio_metrics", "load_tones"))
    return load_tones()


def tiny_config(**fields) -> AudioEvaluatorConfig:
    base = dict(
        labels=list(SHAPES),
        n_mels=32,
        block_out_channels=[8, 16],
        norm_num_groups=4,
        embed_dim=16,
        dataset="tones",
        mel=MEL,
    )
    return AudioEvaluatorConfig(**{**base, **fields})


# ---------------------------------------------------------------------------------------------
# pitch


def test_pitch_scores_tell_in_tune_octave_errors_and_unvoiced_apart():
    est = [60.4, 72.1, 47.8, np.nan, 61.0, 5.0]
    target = [60, 60, 60, 60, 60, -1]  # the last is unpitched: left out
    s = pitch_scores(est, target)
    assert s.n == 5
    assert s.accuracy == pytest.approx(1 / 5)
    assert s.octave_errors == pytest.approx(2 / 5)  # +12.1 and −12.2 semitones
    assert s.unvoiced == pytest.approx(1 / 5)  # 61.0 is a wrong note: none of the three
    assert math.isnan(pitch_scores([1.0], [-1]).accuracy)
    with pytest.raises(ValueError, match="targets"):
        pitch_scores([60.0, 61.0], [60])


def test_pyin_finds_the_note_of_harmonic_tones_and_nothing_in_silence():
    notes = [45.0, 57.0, 64.3, 76.0]
    x = np.stack([harmonic_tone(m, "square") for m in notes] + [np.zeros(SAMPLES, np.float32)])
    found = estimate_midi(torch.from_numpy(x)[:, None], RATE)  # (B, 1, S) tensors are taken too
    assert np.abs(found[:4] - notes).max() < 0.15
    assert np.isnan(found[4])
    with pytest.raises(ValueError, match="mono waveforms"):
        estimate_midi(np.zeros((2, 2, 100)), RATE)


# ---------------------------------------------------------------------------------------------
# the network


def test_classifier_reads_any_duration_and_checks_its_input():
    model = AudioClassifier(tiny_config())
    for frames in (7, 64):
        out = model(torch.randn(3, 32, frames))
        assert out.label.shape == (3, 2) and out.pitch_class.shape == (3, 12)
        assert out.octave.shape == (3, 11)
        assert model.embedding(torch.randn(3, 32, frames)).shape == (3, 16)
    with pytest.raises(ValueError, match=r"\(B, 32, frames\)"):
        model(torch.randn(3, 16, 20))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(labels=["one"]), "at least 2 distinct"),
        (dict(labels=["a", "a"]), "at least 2 distinct"),
        (dict(block_out_channels=[8, 10]), "multiple of norm_num_groups"),
        (dict(n_mels=2), "too small"),
        (dict(dropout=1.0), "dropout"),
        (dict(stem_stride=0), "stem_stride"),
    ],
)
def test_bad_evaluator_config_is_one_line(fields, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**fields)


def test_classifier_loss_adds_pitch_terms_only_for_pitched_sounds():
    g = torch.Generator().manual_seed(0)
    model = AudioClassifier(tiny_config()).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 32, 16, generator=g))
    label, midi = torch.tensor([0, 1]), torch.tensor([61, -1])  # C#4; unpitched
    loss = classifier_loss(logits, label, midi)
    ce = torch.nn.functional.cross_entropy
    expected0 = (
        ce(logits.label[:1], label[:1])
        + ce(logits.pitch_class[:1], torch.tensor([1]))
        + ce(logits.octave[:1], torch.tensor([5]))
    )
    assert float(loss[0]) == pytest.approx(float(expected0), rel=1e-5)
    assert float(loss[1]) == pytest.approx(float(ce(logits.label[1:], label[1:])), rel=1e-5)


def test_evaluator_saves_loads_and_refuses_other_folders(tmp_path):
    model = AudioClassifier(tiny_config())
    save_audio_evaluator(model, tmp_path / "ev", dtype=torch.float16)
    assert is_audio_evaluator_folder(tmp_path / "ev")
    back = load_audio_classifier(tmp_path / "ev")
    assert back.config == model.config
    assert next(back.parameters()).dtype == torch.float32
    x = torch.randn(2, 32, 20)
    assert torch.allclose(back.embedding(x), model.eval().embedding(x), atol=2e-2)
    assert not is_audio_evaluator_folder(tmp_path)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_audio_classifier(tmp_path / "none")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "UNet2DCondition"}')
    with pytest.raises(CheckpointError, match="not an AudioClassifier config"):
        load_audio_classifier(tmp_path / "other")


def test_unknown_reference_dataset_is_one_line():
    with pytest.raises(ValueError, match="unknown audio dataset 'nope'; choose from notes"):
        load_reference_clips("nope")


# ---------------------------------------------------------------------------------------------
# sets, scores and sheets


def test_split_sets_are_disjoint_and_at_most_half():
    a, b = split_sets(10, 64, seed=1)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    a2, _ = split_sets(10, 3, seed=1)
    assert len(a2) == 3 and list(a2) == list(a[:3])  # the same shuffle
    assert len(split_sets(9, 0)[0]) == 4
    with pytest.raises(ValueError, match="too few"):
        split_sets(3, 10)


def test_score_sounds_of_the_reference_itself_has_zero_fad(tones):
    ev = AudioEvaluator(AudioClassifier(tiny_config()))
    x = tones.audio[:12]
    reference = ev.embeddings(x, RATE)
    row = score_sounds("real", "train", x, RATE, tones.label[:12], tones.pitch[:12], reference, ev)
    assert row.n == 12 and row.fad == pytest.approx(0.0, abs=1e-6)
    assert row.pitch_accuracy == 1.0 and row.octave_errors == 0.0 and row.unvoiced == 0.0
    # sounds at another rate are resampled to the evaluator's first
    again = ev.embeddings(resample(x, RATE, 2 * RATE), 2 * RATE)
    assert (again - reference).norm() < 0.02 * reference.norm()
    assert "| train | real | 12 | 1.000 |" in audio_table([row])
    with pytest.raises(ValueError, match="12 sounds for 11 labels"):
        score_sounds("r", "train", x, RATE, tones.label[:11], tones.pitch[:12], reference, ev)


def test_spectrogram_sheet_pairs_real_and_generated():
    x = np.stack([harmonic_tone(60, "sine"), harmonic_tone(64, "square")])
    sheet = spectrogram_sheet(x, x[::-1], RATE, ["a", "b"], columns=2)
    # one wide tile a row: two 65-frame spectrograms side by side, 96 rows each
    assert sheet.width >= 2 * 65 and sheet.height >= 2 * 96
    same = spectrogram_sheet(x, x, RATE, ["a", "b"], columns=2)
    assert same.size == sheet.size and (np.asarray(same) != np.asarray(sheet)).any()
    with pytest.raises(ValueError, match="for 1"):
        spectrogram_sheet(x, x, RATE, ["a"])


# ---------------------------------------------------------------------------------------------
# training, evaluation end to end


def write_config(tmp_path, extra: str = "") -> object:
    path = tmp_path / "ev.toml"
    path.write_text(
        f"""
[audio_evaluator]
dataset = "tones"
mel = {{ sampling_rate = {RATE}, n_fft = 256, hop_length = 64, n_mels = 32, f_max = 4000.0 }}
{extra}

[audio_evaluator.config]
block_out_channels = [8, 16]
norm_num_groups = 4
embed_dim = 32
dropout = 0.0

[optim]
lr = 5e-3
warmup_steps = 0
ema_decay = 0.0

[train]
task = "audio_evaluator"
steps = 60
batch_size = 16
checkpoint_every = 60
log_every = 10
sample_every = 0
threads = 1
progress = false
tensorboard = false

[output]
dir = "{tmp_path / "run"}"
"""
    )
    return path


class PassThrough:
    """A stand-in audio pipeline that 'generates' the real tone of each caption (its
    autoencoder is the mel codec), to test the evaluation path without a trained model."""

    def __init__(self, clips: AudioClips):
        from destatic.models.mel import MelCodec, MelCodecConfig

        self.sound = dict(zip(clips.captions, clips.audio, strict=True))
        self.sample_rate = RATE
        self.autoencoder = MelCodec(MelCodecConfig(**MEL, griffin_lim_iters=8))

    def run(self, request):
        return torch.stack([torch.from_numpy(self.sound[p])[None] for p in request.prompt])


def test_trained_evaluator_scores_real_tones_and_the_eval_path_runs(tmp_path, tones):
    folder = train(load_config(write_config(tmp_path)))
    ev = load_audio_evaluator(folder)
    assert ev.config.labels == list(SHAPES) and ev.config.dataset == "tones"
    rows, sheet = evaluate_audio(PassThrough(tones), ev, n=0, seed=0, batch_size=8)
    by = {(r.split, r.name): r for r in rows}
    for split in ("heldout", "train"):
        real, fake = by[split, "real"], by[split, "generated"]
        assert real.label_accuracy == 1.0 and real.pitch_accuracy == 1.0
        assert fake.as_dict() | {"name": "real"} == real.as_dict()  # the same sounds
        assert by[split, "real, autoencoder round trip"].label_accuracy >= 0.75
    assert by["train", "real"].note_accuracy >= 0.9
    assert sheet.width > 0
    bad = write_config(tmp_path, "round_trip = 2.0")
    with pytest.raises(ConfigError, match="round_trip"):
        load_config(bad)


def test_eval_cli_on_an_audio_model_writes_the_table_and_the_sheet(tmp_path, tones):
    from destatic.pipelines import save
    from tests.audio_fixtures import tiny_audio_pipeline

    save(tiny_audio_pipeline(), tmp_path / "model")
    ev = tmp_path / "ev"
    save_audio_evaluator(AudioClassifier(tiny_config()), ev)
    out = tmp_path / "eval"
    args = ["eval", str(tmp_path / "model"), "--evaluator", str(ev), "--n", "4", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "| heldout | generated | 4 |" in result.output
    assert (out / "results.md").is_file() and (out / "results.json").is_file()
    assert (out / "spectrograms.png").stat().st_size > 0
    result = CliRunner().invoke(app, [*args[:2], "--evaluator", str(tmp_path), "-o", str(out)])
    assert result.exit_code != 0 and "not an audio evaluator folder" in result.output


@pytest.mark.skipif(
    not (DEFAULT_AUDIO_EVALUATOR / "config.json").is_file(), reason="no bundled audio evaluator"
)
def test_bundled_notes_evaluator_is_small_and_knows_real_heldout_notes():
    files = [f for f in DEFAULT_AUDIO_EVALUATOR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 3e6
    ev = load_audio_evaluator()
    try:
        held = load_reference_clips(ev.config.dataset).heldout()
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(f"notes unavailable: {err}")
    seen = ev.predict(held.audio, held.sample_rate)
    assert np.mean([a == b for a, b in zip(seen.label, held.label, strict=True)]) >= 0.8
    assert np.mean(seen.midi == held.pitch) >= 0.8
