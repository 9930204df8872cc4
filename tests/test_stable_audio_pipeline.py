"""diffusers' ``StableAudioPipeline`` folder runs in destatic with the same waveform: a tiny random
pipeline (T5, Stable Audio DiT with grouped-query attention, Oobleck, the seconds projection,
``CosineDPMSolverMultistepScheduler``) is saved, then drawn by diffusers and by
``destatic.load`` from the same prompt, seed, steps and duration — the SDE noise included."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("torchsde")

import destatic  # noqa: E402
from destatic.pipelines.families.stable_audio import STABLE_AUDIO  # noqa: E402
from tests import tiny_sd  # noqa: E402

SAMPLE_RATE, HOP, FRAMES = 32, 2, 16  # the model makes 16 · 2 / 32 = 1 s of audio
PROMPT = "a dog barking twice"
# diffusers' scheduler asks its Brownian tree for σ's just outside [σ_min, σ_max] (torchsde clamps)
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")


def _tiny_pipeline():
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
        StableAudioProjectionModel,
    )

    torch.manual_seed(0)
    t5, tokenizer = tiny_sd.t5_encoder_and_tokenizer(d_model=32)
    tokenizer.model_max_length = 24
    conditioning = 16
    transformer = StableAudioDiTModel(
        sample_size=FRAMES,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        num_key_value_attention_heads=2,  # grouped-query cross-attention
        out_channels=4,
        cross_attention_dim=16,
        time_proj_dim=16,
        global_states_input_dim=2 * conditioning,
        cross_attention_input_dim=conditioning,
    )
    projection = StableAudioProjectionModel(
        text_encoder_dim=32, conditioning_dim=conditioning, min_value=0, max_value=8
    )
    vae = AutoencoderOobleck(
        encoder_hidden_size=8,  # the mean and scale of the 4 latent channels
        downsampling_ratios=[1, HOP],
        channel_multiples=[2, 4],
        decoder_channels=6,
        decoder_input_channels=4,
        audio_channels=2,
        sampling_rate=SAMPLE_RATE,
    )
    pipe = StableAudioPipeline(
        vae=vae,
        text_encoder=t5,
        projection_model=projection,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=CosineDPMSolverMultistepScheduler(),  # Stable Audio Open's settings
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The diffusers pipeline and its saved folder, loaded by destatic."""
    folder = tmp_path_factory.mktemp("stable_audio")
    reference = _tiny_pipeline()
    reference.save_pretrained(folder)
    return reference, destatic.load(folder)


def _relative_rms(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).pow(2).mean().sqrt() / theirs.pow(2).mean().sqrt())


@pytest.mark.parametrize("negative", [None, "rain on a window"])
def test_same_waveform_as_diffusers(folders, negative):
    reference, pipe = folders
    assert pipe.family is STABLE_AUDIO and pipe.sample_rate == SAMPLE_RATE
    assert pipe.sampling_defaults == {
        "steps": 100,
        "sampler": "dpmpp_2m_sde",
        "grid": "exponential",
        "guidance": 7.0,
    }
    seconds, steps, seed = 0.5, 8, 11
    theirs = reference(
        PROMPT,
        negative_prompt=negative,
        num_inference_steps=steps,
        audio_end_in_s=seconds,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).audios
    ours = pipe.generate(
        PROMPT, negative_prompt=negative or "", steps=steps, seconds=seconds, seed=seed
    )
    assert ours.shape == theirs.shape == (1, 2, int(seconds * SAMPLE_RATE))
    assert _relative_rms(ours, theirs) <= 1e-5
    # the noise matters: Gaussian draws instead of the Brownian tree give another waveform
    other = pipe.generate(
        PROMPT, negative_prompt=negative or "", steps=steps, seconds=seconds, seed=seed,
        sampler_options={"noise": "gaussian"},
    )  # fmt: skip
    assert _relative_rms(other, theirs) > 1e-3


def test_start_and_duration_cut_the_waveform_as_diffusers(folders):
    reference, pipe = folders
    theirs = reference(
        PROMPT,
        num_inference_steps=4,
        audio_start_in_s=0.25,
        audio_end_in_s=0.75,
        generator=torch.Generator().manual_seed(2),
        output_type="pt",
    ).audios
    ours = pipe.generate(PROMPT, steps=4, seconds_start=0.25, seconds=0.5, seed=2)
    assert ours.shape == theirs.shape
    assert _relative_rms(ours, theirs) <= 1e-5


def test_a_duration_beyond_the_model_is_one_line(folders):
    _, pipe = folders
    assert pipe.max_seconds == pytest.approx(FRAMES * HOP / SAMPLE_RATE)
    with pytest.raises(ValueError, match="at most 1 s of audio") as e:
        pipe.generate(PROMPT, steps=2, seconds=3.0)
    assert "\n" not in str(e.value)


def test_saved_folder_is_a_stable_audio_pipeline_again(folders, tmp_path):
    """destatic saves the folder back as diffusers' StableAudioPipeline: the same weights in
    every component (the projection model too) and the cosine scheduler's settings."""
    from destatic.pipelines import save

    reference, pipe = folders
    save(pipe, tmp_path / "saved")
    again = diffusers.StableAudioPipeline.from_pretrained(tmp_path / "saved")
    for name in ("transformer", "vae", "projection_model", "text_encoder"):
        ours, theirs = getattr(again, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert isinstance(again.scheduler, diffusers.CosineDPMSolverMultistepScheduler)
    for key in ("sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "prediction_type"):
        assert again.scheduler.config[key] == reference.scheduler.config[key], key
    assert again.tokenizer.model_max_length == reference.tokenizer.model_max_length
