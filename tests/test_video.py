"""Video end to end: the video task trains on a folder of captioned clips and resumes exactly
after kill -9; the exported model loads as the video family, generates (B, 3, F, H, W), and the
CLI writes videos whose stored request regenerates them (--from)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import destatic
from destatic.cli import app
from destatic.io.video import read_video, write_video
from destatic.models.text import MiniLMTextEncoder
from destatic.models.video_dit import VideoDiT, VideoDiTConfig
from destatic.pipelines import Pipeline, save
from destatic.process import RectifiedFlow
from destatic.training import load_config, train
from tests.training_fixtures import COLOURS, assert_same, final_weights, kill_after_checkpoint

TINY = dict(
    in_channels=3,
    sample_size=16,
    num_frames=4,
    patch_size=4,
    patch_size_t=2,
    dim=32,
    num_layers=1,
    num_heads=2,
    mlp_ratio=2,
    attention="full",
)


def moving_square(colour: tuple[int, int, int], direction: int, frames: int = 6) -> np.ndarray:
    """A 16² white clip with a 6² square crossing it left → right (1) or right → left (-1)."""
    clip = np.full((frames, 16, 16, 3), 255, np.uint8)
    for f in range(frames):
        x = 1 + 9 * f // (frames - 1)
        x = x if direction > 0 else 10 - x
        clip[f, 5:11, x : x + 6] = colour
    return clip


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for d, word in ((1, "right"), (-1, "left")):
            path = write_video(root / f"{name}-{word}-{i}.gif", moving_square(rgb, d))
            path.with_suffix(".txt").write_text(f"a {name} square moves {word}")
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def write_config(path: Path, folder: Path, out: Path) -> Path:
    network = "\n".join(
        f"{k} = {v!r}".replace("'", '"') for k, v in TINY.items() if k not in _SET_BY_TASK
    )
    path.write_text(
        f"""
[data]
path = "{folder}"
size = 16

[model]
text_max_length = 8

[video]
dataset = "folder"
frames = 4

[video.network]
{network}

[optim]
lr = 1e-3
warmup_steps = 1

[train]
task = "video"
steps = 5
batch_size = 4
checkpoint_every = 1
log_every = 1
sample_every = 0
threads = 1
progress = false
tensorboard = false

[sample]
prompts = ["a red square moves right", "a blue square moves left"]
steps = 2

[output]
dir = "{out}"
"""
    )
    return path


_SET_BY_TASK = {"in_channels", "sample_size", "num_frames"}


def test_the_video_task_trains_exports_and_generates(clips, tmp_path):
    model = train(load_config(write_config(tmp_path / "c.toml", clips, tmp_path / "run")))
    assert (tmp_path / "run" / "samples" / "step-00000005.png").is_file()  # film strips
    pipe = destatic.load(model)
    assert pipe.family.name == "destatic-video" and pipe.family.media == "video"
    videos = pipe.generate("a red square moves right", steps=2, seed=3)
    assert videos.shape == (1, 3, 4, 16, 16) and torch.isfinite(videos).all()
    assert pipe.generate("a red square moves right", steps=2, num_frames=2).shape[2] == 2
    clip = pipe("a red square moves right", steps=2)[0]  # a list of PIL frames per clip
    assert len(clip) == 4 and clip[0].size == (16, 16)


def test_kill_9_and_resume_gives_the_same_weights(clips, tmp_path):
    train(load_config(write_config(tmp_path / "a.toml", clips, tmp_path / "straight")))
    cfg_path = write_config(tmp_path / "b.toml", clips, tmp_path / "killed")
    stopped = kill_after_checkpoint(cfg_path, tmp_path / "killed", 2)
    assert 2 <= stopped < 5
    train(load_config(cfg_path))
    assert_same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed"))


@pytest.fixture(scope="module")
def tiny_video_model(tmp_path_factory) -> Path:
    """A randomly initialised tiny video pipeline, saved (non-zero output layers)."""
    torch.manual_seed(0)
    net = VideoDiT(VideoDiTConfig(**TINY))
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    encoder = MiniLMTextEncoder.from_package(max_length=8)
    pipe = Pipeline(net, None, encoder, RectifiedFlow(), "flow")
    assert pipe.family.name == "destatic-video"  # told from the network
    folder = tmp_path_factory.mktemp("video") / "model"
    save(pipe, folder)
    return folder


def test_cli_writes_videos_and_from_replays_them(tiny_video_model, tmp_path):
    runner = CliRunner()
    model = str(tiny_video_model)
    common = ["--model", model, "--steps", "2", "--no-progress"]
    result = runner.invoke(
        app, ["generate", "a red square moves right", *common, "-o", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    (mp4,) = tmp_path.glob("*.mp4")
    assert read_video(mp4).shape[0] == 4
    sheet = tmp_path / "sheets" / "grid.gif"  # an animated, labelled grid of the clips
    args = ["generate", "a red square", "a blue square", *common, "-o", str(tmp_path / "two")]
    assert runner.invoke(app, [*args, "--sheet", str(sheet)]).exit_code == 0
    grid = read_video(sheet)
    assert grid.shape[0] == 4 and grid.shape[2] > grid.shape[1]  # 4 frames, two cells a row
    assert not np.array_equal(grid[0], grid[-1])
    first = tmp_path / "clip.webp"
    args = ["generate", "a blue square", *common, "--seed", "7", "-o", str(first)]
    assert runner.invoke(app, args).exit_code == 0
    again = tmp_path / "again.webp"
    result = runner.invoke(app, ["generate", "--from", str(first), "-o", str(again)])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_video(first), read_video(again))
    # a video model names video files, or a .png for one PNG a frame; an image model PNGs
    result = runner.invoke(app, ["generate", "x", *common, "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 0, result.output
    frames = sorted(tmp_path.glob("x-*.png"))
    assert [f.name for f in frames] == [f"x-{t:03d}.png" for t in range(4)]
    assert not (tmp_path / "x.png").exists()
    result = runner.invoke(app, ["generate", "x", "--steps", "1", "-o", str(tmp_path / "x.mp4")])
    assert result.exit_code == 2 and "draws images" in result.output


def test_image_models_refuse_frames():
    with pytest.raises(ValueError, match="video model"):
        destatic.load().generate("red heart", steps=1, num_frames=4)


def test_image_to_video_keeps_the_given_first_frame(tiny_video_model):
    from PIL import Image

    pipe = destatic.load(tiny_video_model)
    first = moving_square(COLOURS["green"], 1)[0]
    image = Image.fromarray(first)
    clip = pipe.generate("a green square moves right", image=image, steps=3, seed=1)
    assert clip.shape == (1, 3, 4, 16, 16)
    given = torch.from_numpy(first).permute(2, 0, 1).float() / 255
    assert torch.allclose(clip[0, :, 0], given, atol=1e-5)  # frame 0 is the image
    assert not torch.allclose(clip[0, :, 1], given, atol=1e-2)  # the others are drawn
    # strength < 1 starts every frame from the image (SDEdit over time)
    partial = pipe.generate("a green square", image=image, strength=0.5, steps=4, seed=1)
    assert torch.allclose(partial[0, :, 0], given, atol=1e-5)


def test_the_per_frame_baseline_draws_each_frame_from_its_noise_slice():
    from destatic.metrics.video import draw_frames_independently
    from destatic.pipelines import GenerationRequest
    from destatic.sampling import generators, randn

    image_pipe = destatic.load()  # the bundled 32² emoji model
    net = VideoDiT(VideoDiTConfig(**{**TINY, "sample_size": 32}))
    video_pipe = Pipeline(net, None, image_pipe.text_encoder, RectifiedFlow(), "flow")
    fields = {"steps": 2, "guidance": 3.0}
    clips = draw_frames_independently(
        image_pipe, video_pipe, ["red heart", "cat face"], 5, 1, **fields
    )
    assert clips.shape == (2, 3, 4, 32, 32)
    noise = randn((1, 3, 4, 32, 32), generators([6]))[0, :, 2][None]  # clip 1 (seed 6), frame 2
    alone = image_pipe.run(GenerationRequest(prompt=["cat face"], **fields), noise=noise)
    assert torch.allclose(clips[1, :, 2], alone[0], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_image_model(tmp_path_factory) -> Path:
    """A 16² pixel U-Net image model on MiniLM (flow), saved as a folder: an AnimateDiff base."""
    from destatic.models.unet import UNet2DCondition, UNetConfig
    from destatic.pipelines import save

    torch.manual_seed(0)
    net = UNet2DCondition(
        UNetConfig(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=384,
            attention_head_dim=2,
            norm_num_groups=8,
        )
    )
    for p in net.parameters():  # not the zero-initialised start: a base that draws something
        p.data.normal_(0, 0.05)
    text = destatic.load().text_encoder
    folder = tmp_path_factory.mktemp("base") / "image"
    save(Pipeline(net, None, text, RectifiedFlow(), "flow"), folder)
    return folder


def test_animating_an_image_model_trains_only_the_motion_modules(clips, tiny_image_model, tmp_path):
    from destatic.models.animatediff import UNetMotion
    from destatic.training.config import ConfigError

    cfg_path = write_config(tmp_path / "c.toml", clips, tmp_path / "run")
    text = cfg_path.read_text().replace(
        "frames = 4\n", f'frames = 4\nbase = "{tiny_image_model}"\n'
    )
    network = text[text.index("[video.network]") : text.index("[optim]")]
    text = text.replace(network, "[video.network]\nmotion_num_attention_heads = 2\n\n")
    cfg_path.write_text(text.replace("steps = 5", "steps = 3"))
    model = train(load_config(cfg_path))
    pipe = destatic.load(model)
    assert isinstance(pipe.network, UNetMotion) and pipe.family.name == "destatic-video"
    base = destatic.load(tiny_image_model).network.state_dict()
    trained = pipe.network.state_dict()
    # the image model is frozen (its EMA equals it up to float rounding)
    assert all(torch.allclose(trained[k], v, rtol=1e-5, atol=1e-7) for k, v in base.items())
    motion = [k for k in trained if ".motion_modules." in k and k.endswith("proj_out.weight")]
    assert motion and all(trained[k].abs().max() > 0 for k in motion)  # and the modules moved
    assert pipe.generate("a red square moves right", steps=2).shape == (1, 3, 4, 16, 16)

    cfg_path.write_text(cfg_path.read_text().replace("size = 16", "size = 32"))
    with pytest.raises(ConfigError, match=r"video\.base draws 16²"):
        train(load_config(cfg_path))
