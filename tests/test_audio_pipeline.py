"""destatic's own audio family end to end: the mel codec, the timing-conditioned pipeline (span,
cut, errors, save/load), and the audio task (training from a folder, exact resume after kill -9,
the exported model generating)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import destatic
from destatic.models.mel import MelCodec, MelCodecConfig
from destatic.pipelines import save
from destatic.pipelines.families import ConditioningContext
from destatic.pipelines.families.audio import timing_conditioning
from destatic.training import load_config, train
from destatic.training.tasks.audio import audible_seconds
from tests.audio_fixtures import RATE, TINY_DIT, tiny_audio_pipeline, tone, write_tones
from tests.training_fixtures import assert_same, final_weights, kill_after_checkpoint


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


# -- the codec ---------------------------------------------------------------------------------


def test_mel_codec_round_trip_keeps_the_pitch_and_is_deterministic():
    codec = MelCodec(MelCodecConfig())
    wave = torch.from_numpy(tone(440.0, 0.8, total=1.024, rate=16000))[None, None]
    z = codec.latents_from_waveforms(wave)
    assert z.shape == (1, 128, 64)
    back = codec.waveforms_from_latents(z)
    assert back.shape == (1, 1, 16384) and back.abs().max() <= 1
    assert abs(peak_hz(back[0, 0].numpy(), 16000) - 440.0) < 440 * 0.02
    assert torch.equal(back, codec.waveforms_from_latents(z))
    assert (codec.latents_from_waveforms(back) - z).abs().mean() < 0.05  # of a range of ~3


def test_mel_codec_bad_input_is_one_line():
    with pytest.raises(ValueError, match="f_max"):
        MelCodecConfig(f_max=9000.0, sampling_rate=16000).validate()
    codec = MelCodec(MelCodecConfig())
    with pytest.raises(ValueError, match="mono"):
        codec.latents_from_waveforms(torch.zeros(1, 2, 4096))
    with pytest.raises(ValueError, match=r"\(batch, 128, frames\)"):
        codec.waveforms_from_latents(torch.zeros(1, 64, 8))


# -- the pipeline --------------------------------------------------------------------------------


def test_audio_pipeline_cuts_to_the_span_and_refuses_what_it_cannot_make():
    pipe = tiny_audio_pipeline()
    assert pipe.family.name == "destatic-audio" and pipe.media == "audio"
    assert pipe.sample_rate == RATE and pipe.max_seconds == pytest.approx(0.256)
    full = pipe.generate(["a high tone", "a low tone"], steps=2)
    assert full.shape == (2, 1, 2048) and full.abs().max() <= 1
    part = pipe.generate("a high tone", steps=2, seconds=0.1, seconds_start=0.05)
    assert part.shape == (1, 1, 800)
    with pytest.raises(ValueError, match=r"at most 0\.256 s"):
        pipe.generate("a high tone", steps=2, seconds=1.0)
    with pytest.raises(ValueError, match="seconds > 0"):
        pipe.generate("a high tone", steps=2, seconds=-1.0)
    with pytest.raises(ValueError, match="hires"):
        pipe.generate("a high tone", steps=2, hires_scale=2.0)
    waves = pipe("a high tone", steps=2, seconds=0.1)  # numpy (channels, samples) per prompt
    assert isinstance(waves[0], np.ndarray) and waves[0].shape == (1, 800)


def test_the_timing_tokens_change_the_audio_and_the_null_branch_is_zero():
    pipe = tiny_audio_pipeline()
    embedding = pipe.text_encoder.encode(["a high tone", ""])
    context = ConditioningContext(
        ("a high tone", ""), 0, 0, True, pipe.text_encoder, (0.0, 0.2), pipe.extras
    )
    cond = timing_conditioning(pipe.network, embedding, context)
    assert cond["context"].shape == (2, 8 + 2, 16) and cond["global_context"].shape == (2, 1, 32)
    assert cond["context"][1].abs().max() == 0 and cond["context"][0].abs().max() > 0
    assert torch.allclose(cond["global_context"][0], cond["global_context"][1], atol=1e-6)
    noise = torch.randn(1, 16, TINY_DIT["sample_size"])
    short = pipe.generate("a high tone", steps=2, seconds=0.05, noise=noise)
    long = pipe.generate("a high tone", steps=2, seconds=0.25, noise=noise)
    assert not torch.allclose(short, long[..., : short.shape[-1]])


def test_saved_audio_model_reloads_and_draws_the_same(tmp_path):
    pipe = tiny_audio_pipeline()
    save(pipe, tmp_path / "model")
    again = destatic.load(tmp_path / "model")
    assert again.family.name == "destatic-audio" and set(again.extras) == {"projection_model"}
    a = pipe.generate("a middle tone", steps=3, seed=5, guidance=2.0)
    b = again.generate("a middle tone", steps=3, seed=5, guidance=2.0)
    assert torch.equal(a, b)


# -- training ------------------------------------------------------------------------------------


def test_audible_seconds_finds_where_the_sound_ends():
    clips = np.stack([tone(440.0, 0.1), tone(440.0, 0.25), np.zeros(2400, np.float32)])
    found = audible_seconds(clips, RATE)
    assert found[0] == pytest.approx(0.1, abs=0.015) and found[1] == pytest.approx(0.25, abs=0.015)
    assert found[2] == 0


def write_audio_config(path: Path, folder: Path, out: Path) -> Path:
    path.write_text(
        f"""
[data]
path = "{folder}"
caption_dropout = 0.2

[model]
text_max_length = 8

[audio]
dataset = "folder"
sample_rate = {RATE}
samples = 2048
conditioning_dim = 16

[audio.codec]
n_fft = 256
hop_length = 64
n_mels = 16
f_max = 4000.0
griffin_lim_iters = 4

[audio.network]
num_layers = 1
attention_head_dim = 8
num_attention_heads = 2
num_key_value_attention_heads = 1
cross_attention_dim = 16
time_proj_dim = 16

[optim]
lr = 1e-3
warmup_steps = 2

[train]
task = "audio"
steps = 5
batch_size = 4
checkpoint_every = 1
log_every = 1
sample_every = 0
threads = 1
progress = false
tensorboard = false

[sample]
prompts = ["a high tone", "a low tone"]
steps = 2

[output]
dir = "{out}"
"""
    )
    return path


def test_audio_training_resumes_exactly_after_kill_9_and_exports_a_model(tmp_path):
    tones = write_tones(tmp_path / "tones")
    train(load_config(write_audio_config(tmp_path / "a.toml", tones, tmp_path / "straight")))
    cfg_path = write_audio_config(tmp_path / "b.toml", tones, tmp_path / "killed")
    stopped = kill_after_checkpoint(cfg_path, tmp_path / "killed", 2)
    assert 2 <= stopped < 5
    train(load_config(cfg_path))
    assert_same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed"))
    pipe = destatic.load(tmp_path / "straight" / "model")
    assert pipe.family.name == "destatic-audio"
    assert pipe.generate("a high tone", steps=2, seconds=0.1).shape == (1, 1, 800)
