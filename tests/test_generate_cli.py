"""`destatic generate`: PNGs carry their parameters and `--from` regenerates them exactly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from destatic.cli import app
from destatic.pipelines import GenerationRequest

read_params = GenerationRequest.from_png
# bit-exact replays need fp32: bf16 (the default on CPUs with AMX) rounds differently per batch
FP32 = ["--dtype", "fp32"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_png_carries_parameters_and_from_regenerates_it(tmp_path, dtype):
    """fp32 replays to within 1/255 (float rounding of another batch size); bf16 rounds
    differently at another batch size, so its replay is close on average, not pixel for pixel."""
    runner = CliRunner()
    args = ["generate", "red heart", "pizza", "--steps", "3", "--seed", "7", "--guidance", "2.5"]
    args += ["--dtype", dtype]
    result = runner.invoke(app, [*args, "--negative", "blurry", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    first, second = sorted((tmp_path / "a").glob("*.png"))
    params = read_params(second)
    assert (params.prompt, params.seed, params.steps) == ("pizza", 8, 3)
    assert params.guidance == 2.5 and params.negative_prompt == "blurry"
    assert (params.width, params.height) == (32, 32)
    text = Image.open(first).text["parameters"]
    assert text.startswith("red heart\nNegative prompt: blurry\nSteps: 3, Sampler: dpmpp_2m")
    assert "Seed: 7" in text and "Size: 32x32" in text

    again = tmp_path / "again.png"
    replay = ["generate", "--from", str(second), "--dtype", dtype, "-o", str(again)]
    result = runner.invoke(app, replay)
    assert result.exit_code == 0, result.output
    # drawn alone now, second in a batch of two before: float rounding may move a pixel by 1/255
    redrawn, original = (np.asarray(Image.open(p)).astype(int) for p in (again, second))
    if dtype == "fp32":
        assert np.abs(redrawn - original).max() <= 1 and (redrawn != original).mean() < 0.01
    else:
        assert np.abs(redrawn - original).mean() < 1.0
    assert read_params(again) == params


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate"], "at least one prompt"),
        (["generate", "x", "--from", "a.png"], "not both"),
        (["generate", "--from", "missing.png"], "does not exist"),
    ],
)
def test_generate_input_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output


def test_from_rejects_images_without_parameters(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    runner = CliRunner()
    plain = runner.invoke(app, ["generate", "--from", str(tmp_path / "plain.png")])
    assert plain.exit_code == 2 and "no destatic generation parameters" in plain.output
    junk = runner.invoke(app, ["generate", "--from", str(tmp_path / "junk.png")])
    assert junk.exit_code == 2 and "not a readable image" in junk.output


def test_a1111_text_without_negative_or_size():
    text = GenerationRequest("cat face", steps=20, sampler="dpmpp_2m", guidance=3.0, seed=3).a1111()
    assert text == (
        "cat face\nSteps: 20, Sampler: dpmpp_2m, Schedule type: default, CFG scale: 3, "
        "Seed: 3, Model: destatic default"
    )


def test_image_to_image_and_inpainting_from_the_command_line(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    runner = CliRunner()
    base = ["generate", "pizza", "--steps", "4", "--image", str(tmp_path / "in.png")]
    out = tmp_path / "inpainted.png"
    result = runner.invoke(app, [*base, "--mask", str(tmp_path / "mask.png"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    got, original = np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "in.png"))
    keep = mask == 0
    assert np.abs(got[keep].astype(int) - original[keep]).max() <= 1  # kept pixels survive
    params = read_params(out)
    assert params.mask.endswith("mask.png") and params.image.endswith("in.png")
    assert params.model.endswith("emoji_inpaint")  # the bundled inpainting variant
    again = tmp_path / "again.png"
    assert runner.invoke(app, ["generate", "--from", str(out), "-o", str(again)]).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(again)), got)

    light = tmp_path / "light.png"
    result = runner.invoke(app, [*base, "--strength", "0.5", "-o", str(light)])
    assert result.exit_code == 0, result.output
    assert "Denoising strength: 0.5" in Image.open(light).text["parameters"]
    bad = runner.invoke(app, ["generate", "x", "--mask", str(tmp_path / "mask.png")])
    assert bad.exit_code == 2 and "--mask needs --image" in bad.output
    bad = runner.invoke(app, ["generate", "x", "--image", str(tmp_path / "nope.png")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_previews_of_every_step(tmp_path):
    args = [
        "generate",
        "sun",
        "--steps",
        "3",
        "--preview",
        str(tmp_path / "p"),
        "-o",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "step-000.png",
        "step-001.png",
        "step-002.png",
    ]


def test_controlnet_from_the_command_line(tmp_path):
    import torch

    import destatic
    from destatic.models.controlnet import ControlNet
    from destatic.models.registry import save_component

    pipe = destatic.load()
    net = ControlNet.from_unet(pipe.network, conditioning_embedding_out_channels=(16,))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))  # leave zero init: the control must matter
    save_component(net, tmp_path / "cn", class_name="ControlNetModel", config=net.config.to_dict())
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    runner = CliRunner()
    base = ["generate", "sun", "--steps", "3"]
    control = ["--controlnet", str(tmp_path / "cn"), "--control", str(tmp_path / "ref.png")]
    out = tmp_path / "c.png"
    result = runner.invoke(
        app, [*base, *control, "--canny", "--control-end", "0.7", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "ControlNet: cn (weight 1, steps 0-0.7, canny)" in Image.open(out).text["parameters"]
    plain = tmp_path / "p.png"
    assert runner.invoke(app, [*base, "-o", str(plain)]).exit_code == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))
    again = tmp_path / "again.png"
    assert runner.invoke(app, ["generate", "--from", str(out), "-o", str(again)]).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    exported = runner.invoke(app, ["export", str(tmp_path / "cn"), str(tmp_path / "cn16")])
    assert exported.exit_code == 0, exported.output
    from destatic.io import load_weights
    from destatic.models.registry import load_component

    assert {v.dtype for v in load_weights(tmp_path / "cn16").values()} == {torch.float16}
    assert type(load_component(tmp_path / "cn16")).__name__ == "ControlNet"
    bad = runner.invoke(app, [*base, "--controlnet", str(tmp_path / "cn")])
    assert bad.exit_code == 2 and "go together" in bad.output


def test_variations_of_a_generated_image(tmp_path):
    runner = CliRunner()
    ref = tmp_path / "ref.png"
    first = runner.invoke(app, ["generate", "cat face", "--steps", "4", *FP32, "-o", str(ref)])
    assert first.exit_code == 0
    args = ["generate", "--from", str(ref), "--variation-strength", "0.2", "-n", "3", *FP32]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "v").glob("*.png"))
    assert len(files) == 3
    base = np.asarray(Image.open(ref)).astype(float)
    diffs = [np.abs(np.asarray(Image.open(f)).astype(float) - base).mean() for f in files]
    assert all(0 < d < 40 for d in diffs)  # close to the reference, yet not equal
    params = read_params(files[1])
    assert (params.seed, params.variation_seed, params.variation_strength) == (0, 2, 0.2)
    again = tmp_path / "again.png"
    replay = runner.invoke(app, ["generate", "--from", str(files[1]), *FP32, "-o", str(again)])
    assert replay.exit_code == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(files[1])))
    far = tmp_path / "far.png"
    far_args = ["generate", "--from", str(ref), "--variation-strength", "1", "-o", str(far)]
    assert runner.invoke(app, far_args).exit_code == 0
    far_diff = np.abs(np.asarray(Image.open(far)).astype(float) - base).mean()
    assert far_diff > max(diffs)


def test_slerp_keeps_the_norm_and_its_ends():
    import torch

    from destatic.sampling import slerp

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    ratio = mid.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    assert (ratio - 1).abs().max() < 0.05  # a straight line would give ≈ 0.71
    torch.testing.assert_close(slerp(a, a, 0.3), a)  # parallel: no division by zero
