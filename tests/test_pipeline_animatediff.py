"""AnimateDiff: a tiny diffusers ``AnimateDiffPipeline`` (SD U-Net + MotionAdapter, CLIP, SD VAE)
loads as the ``animatediff`` family and draws diffusers' frames from the same latents with DDIM
and Euler, guidance 7.5 and the empty negative prompt; an SD folder plus the MotionAdapter folder
(``load(sd, motion_adapter=…)``, ``--motion-adapter``) draws the same frames."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import destatic
from destatic.cli import app
from destatic.io import CheckpointError
from destatic.io.video import read_video
from destatic.models.animatediff import UNetMotion
from destatic.pipelines import GenerationRequest, save
from destatic.pipelines.families import family_of
from tests import tiny_sd
from tests.test_pipeline import SCHEDULERS, SD, scheduler_sigmas
from tests.test_single_file import ldm_state

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

# motion modules for the tiny U-Net's blocks (32, 64), one resnet each
ADAPTER = dict(
    block_out_channels=(32, 64),
    motion_layers_per_block=1,
    motion_transformer_layers_per_block=1,
    motion_num_attention_heads=2,
    motion_norm_num_groups=8,
    motion_max_seq_length=32,
)
FRAMES, SIZE, STEPS = 4, 16, 4  # 4 frames of 16 × 16 px: latents (1, 4, 4, 8, 8)
PROMPT = "a red apple"


def _reference(components: dict, sampler: str):
    name, config, _ = SCHEDULERS[sampler]
    scheduler = getattr(diffusers, name)(**SD, **config)
    pipe = diffusers.AnimateDiffPipeline(**components, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_animatediff(tmp: Path) -> tuple[Path, Path, Path, dict]:
    """(AnimateDiffPipeline folder, SD folder, MotionAdapter folder, the diffusers components
    but the scheduler): the same tiny random weights saved by diffusers three ways under
    ``tmp`` (the AnimateDiff folder with DDIM; benchmarks/video.py builds it too)."""
    unet, vae, text, tokenizer = tiny_sd.components(tmp)
    adapter = tiny_sd.perturb(diffusers.MotionAdapter(**ADAPTER)).eval()  # proj_out ≠ 0
    sd = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet)
    reference = _reference({**sd, "motion_adapter": adapter}, "ddim")
    reference.save_pretrained(tmp / "animatediff", safe_serialization=True)
    image = diffusers.StableDiffusionPipeline(
        **sd,
        scheduler=reference.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    image.save_pretrained(tmp / "sd", safe_serialization=True)
    save_file(ldm_state(image), str(tmp / "sd.safetensors"))  # an SD 1.x single file
    adapter.save_pretrained(tmp / "adapter", safe_serialization=True)
    components = {k: v for k, v in reference.components.items() if k != "scheduler"}
    return tmp / "animatediff", tmp / "sd", tmp / "adapter", components


@pytest.fixture(scope="module")
def animatediff(tmp_path_factory):
    return build_animatediff(tmp_path_factory.mktemp("animatediff"))


def _diffusers_frames(components: dict, sampler: str, z: torch.Tensor):
    """diffusers' frames (B, F, H, W, C) from unit latents ``z`` and the σ grid it stepped."""
    pipe = _reference(components, sampler)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)  # as the call will: read its grid and start scale
    sigmas = scheduler_sigmas(scheduler)
    start = float(sigmas[0])
    k_style = SCHEDULERS[sampler][2]  # see tests/test_pipeline.py: σ-space vs VP latents
    scale = start / scheduler.init_noise_sigma if k_style else start / math.sqrt(1 + start**2)
    frames = pipe(
        PROMPT,
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        latents=z * scale,
        output_type="np",
    ).frames
    return np.asarray(frames), sigmas


def _ours(pipe, sampler: str, sigmas: torch.Tensor, z: torch.Tensor) -> np.ndarray:
    frames = {"num_frames": z.shape[2]} if z.ndim == 5 else {}  # an image model: none
    out = pipe.generate(
        PROMPT, sampler=sampler, sigmas=sigmas, guidance=7.5, noise=z, width=SIZE, height=SIZE,
        **frames,
    )  # fmt: skip
    return out.movedim(1, -1).numpy()  # (B, C, [F,] H, W) → (B, [F,] H, W, C)


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(
        1, 4, FRAMES, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed)
    )


def test_loads_as_animatediff(animatediff):
    folder = animatediff[0]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNetMotionModel"] and "motion_adapter" in index
    pipe = destatic.load(folder)
    assert pipe.family.name == "animatediff" and pipe.family.media == "video"
    assert isinstance(pipe.network, UNetMotion)
    assert pipe.sampling_defaults["guidance"] == 7.5
    assert pipe.latent_shape(1, SIZE, SIZE) == (1, 4, 16, 8, 8)  # diffusers' 16 frames
    assert pipe.latent_shape(2, SIZE, SIZE, FRAMES) == (2, 4, FRAMES, 8, 8)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@torch.no_grad()
def test_same_frames_as_diffusers_animatediff_pipeline(animatediff, sampler):
    """The AnimateDiffPipeline folder, and the SD folder with the MotionAdapter folder, draw
    diffusers' frames from the same latents (guidance 7.5, negative prompt "")."""
    folder, sd, adapter, components = animatediff
    z = _noise(0)
    expected, sigmas = _diffusers_frames(components, sampler, z)
    assert expected.shape == (1, FRAMES, SIZE, SIZE, 3)
    got = _ours(destatic.load(folder), sampler, sigmas, z)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    animated = destatic.load(sd, motion_adapter=adapter)
    assert animated.family.name == "animatediff"
    np.testing.assert_allclose(_ours(animated, sampler, sigmas, z), expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.01  # the frames are not flat
    assert np.abs(expected[0, 1:] - expected[0, :1]).max() > 1e-2  # nor all the same


@torch.no_grad()
def test_motion_modules_matter(animatediff):
    """Without the adapter the SD folder draws other frames: the parity above is not the image
    model's."""
    _, sd, _, components = animatediff
    z = _noise(1)
    expected, sigmas = _diffusers_frames(components, "ddim", z)
    still = _ours(destatic.load(sd), "ddim", sigmas, z[:, :, 0])  # frame 0 as an image
    assert np.abs(still[:, None] - expected[:, :1]).max() > 1e-2


@torch.no_grad()
def test_single_file_with_adapter_draws_the_folders_clip(animatediff):
    """An SD 1.x single file (LDM names) plus the adapter folder: the AnimateDiff folder's clip."""
    folder, sd, adapter, _ = animatediff
    single = destatic.load(sd.with_suffix(".safetensors"), config=sd, motion_adapter=adapter)
    assert single.family.name == "animatediff"
    kwargs = dict(steps=3, sampler="euler", num_frames=FRAMES, width=SIZE, height=SIZE, seed=2)
    expected = destatic.load(folder).generate(PROMPT, **kwargs)
    torch.testing.assert_close(single.generate(PROMPT, **kwargs), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_save_load_round_trip(animatediff, tmp_path):
    """``save`` writes a destatic folder (the U-Net with its motion modules, CLIP, the VAE)
    that loads back as AnimateDiff and draws the same clip."""
    pipe = destatic.load(animatediff[0])
    save(pipe, tmp_path / "saved")
    again = destatic.load(tmp_path / "saved")
    assert again.family.name == "animatediff" and again.process == pipe.process
    kwargs = dict(steps=2, num_frames=2, width=SIZE, height=SIZE, seed=3)
    assert torch.equal(again.generate(PROMPT, **kwargs), pipe.generate(PROMPT, **kwargs))


def test_sdxl_animatediff_is_refused_in_one_line(tmp_path):
    index = {
        "_class_name": "AnimateDiffSDXLPipeline",
        **{k: ["transformers", "CLIPTextModel"] for k in ("text_encoder", "text_encoder_2")},
        **{k: ["diffusers", "x"] for k in ("vae", "scheduler", "motion_adapter")},
        "unet": ["diffusers", "UNetMotionModel"],
    }
    family = family_of(tmp_path, index)
    assert family.name == "animatediff"
    with pytest.raises(CheckpointError, match=r"only AnimateDiff for SD 1\.x .*AnimateDiffSDXL"):
        family.text_encoder(tmp_path, index, None)


def test_bad_adapters_are_one_line(animatediff, tmp_path):
    folder, sd, adapter, _ = animatediff
    wrong = diffusers.MotionAdapter(**{**ADAPTER, "block_out_channels": (32, 128)})
    wrong.save_pretrained(tmp_path / "wrong", safe_serialization=True)
    with pytest.raises(ValueError, match=r"motion adapter .*wrong: .*\[32, 128\].*\[32, 64\]"):
        destatic.load(sd, motion_adapter=tmp_path / "wrong")
    with pytest.raises(CheckpointError, match="expected a MotionAdapter"):
        destatic.load(sd, motion_adapter=sd / "unet")
    with pytest.raises(CheckpointError, match="no MotionAdapter folder"):
        destatic.load(sd, motion_adapter=tmp_path)
    with pytest.raises(ValueError, match="already has motion modules"):
        destatic.load(folder, motion_adapter=adapter)


def test_cli_motion_adapter_writes_a_clip_that_from_replays(animatediff, tmp_path):
    _, sd, adapter, _ = animatediff
    runner = CliRunner()
    first = tmp_path / "clip.webp"  # lossless: --from must give the same pixels
    args = ["generate", PROMPT, "--model", str(sd), "--motion-adapter", str(adapter)]
    args += ["--frames", "3", "--size", "16", "--steps", "2", "--no-progress", "-o", str(first)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_video(first).shape[:3] == (3, 16, 16)
    request = GenerationRequest.from_file(first)
    assert request.motion_adapter == str(adapter) and request.num_frames == 3
    again = tmp_path / "again.webp"
    result = runner.invoke(app, ["generate", "--from", str(first), "-o", str(again)])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_video(first), read_video(again))
    (tmp_path / "gone").mkdir()
    moved = dict(request.to_dict(), motion_adapter=str(tmp_path / "gone" / "x"))
    with pytest.raises(ValueError, match=r"--motion-adapter .* is not there any more"):
        GenerationRequest.from_dict(moved).check_sources(first)
