"""What A1111 users expect: sampler labels ("DPM++ 2M Karras") as aliases everywhere a sampler
is named, its ``parameters`` text read back by ``--from``, and the generate options
``--width/--height``, ``--prompts-file``, ``--hires`` and ``--vae-tiling``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

import destatic
from destatic.cli import app
from destatic.pipelines import GenerationRequest, RequestError
from destatic.pipelines.a1111 import parse_parameters
from destatic.sampling.aliases import resolve_grid, resolve_sampler
from destatic.serve.service import GenerationService
from tests.cli_fixtures import latent_model

read = GenerationRequest.from_png


@pytest.fixture(scope="module")
def pipe():
    return destatic.load()


# -- sampler labels ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
        ("dpm++ 2m karras", ("dpmpp_2m", "karras")),
        ("Euler a", ("euler_ancestral", None)),
        ("Euler", ("euler", None)),
        ("DPM++ 2M SDE Karras", ("dpmpp_2m_sde", "karras")),
        ("DPM++ 3M SDE Exponential", ("dpmpp_3m_sde", "exponential")),
        ("DPM++ 2S a", ("dpmpp_2s_ancestral", None)),
        ("DDIM", ("ddim", None)),
        ("UniPC", ("uni_pc", None)),
        ("LCM", ("lcm", None)),
        ("Heun", ("heun", None)),
        ("LMS Karras", ("lms", "karras")),
        ("DPM2", ("dpm_2", None)),
        ("DPM++ SDE Karras", ("dpmpp_sde", "karras")),
        ("Euler a SGM Uniform", ("euler_ancestral", "sgm_uniform")),
        ("dpmpp_2m", ("dpmpp_2m", None)),
    ],
)
def test_a1111_labels_resolve(label, expected):
    assert resolve_sampler(label) == expected


def test_schedule_types_resolve():
    assert resolve_grid("Karras") == "karras"
    assert resolve_grid("Align Your Steps") == "ays"
    assert resolve_grid("Automatic") is None
    assert resolve_sampler("DPM++ 2M", "SGM Uniform") == ("dpmpp_2m", "sgm_uniform")
    assert resolve_sampler("DPM++ 2M Karras", "karras") == ("dpmpp_2m", "karras")


@pytest.mark.parametrize(
    ("name", "grid", "message"),
    [
        ("DPM++ 9M", None, "unknown sampler 'DPM++ 9M'; choose one of ddim, "),
        ("DPM2 a", None, "A1111's sampler 'DPM2 a' is not in destatic"),
        ("DPM++ 2M Karras", "exponential", "implies the karras grid"),
        ("euler", "Karas", "unknown grid 'Karas'"),
    ],
)
def test_bad_names_fail_on_one_line(name, grid, message):
    with pytest.raises(ValueError) as err:
        resolve_sampler(name, grid)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RequestError, match=re.escape(message)):  # the request says so too
        GenerationRequest("x", sampler=name, grid=grid).canonical()


def test_a_label_draws_its_sampler_on_its_grid(tmp_path):
    """ "DPM++ 2M Karras" is dpmpp_2m on the karras grid: the same image, and not the image of
    another grid (a tiny SD 1.x model, whose finite σ_max allows karras)."""
    pytest.importorskip("diffusers")
    from tests.test_devices import save_tiny_sd

    sd = destatic.load(save_tiny_sd(tmp_path))
    common = {"steps": 3, "seed": 5, "guidance": 2.0, "width": 16, "height": 16}
    label = sd.generate("red heart", sampler="DPM++ 2M Karras", **common)
    named = sd.generate("red heart", sampler="dpmpp_2m", grid="karras", **common)
    default_grid = sd.generate("red heart", sampler="dpmpp_2m", grid="exponential", **common)
    torch.testing.assert_close(label, named, rtol=0, atol=0)
    assert (label - default_grid).abs().max() > 1e-3


def test_requests_store_canonical_names(pipe):
    r = GenerationRequest.from_dict({"prompt": "x", "sampler": "Euler a", "grid": "Karras"})
    resolved = r.resolved(pipe)
    assert (resolved.sampler, resolved.grid) == ("euler_ancestral", "karras")
    assert json.loads(resolved.to_json())["sampler"] == "euler_ancestral"


def test_the_service_takes_labels(pipe):
    service = GenerationService(pipe)
    service.check(GenerationRequest("x", sampler="DPM++ 2M SDE Karras"))
    with pytest.raises(RequestError, match="unknown sampler 'nope'"):
        service.check(GenerationRequest("x", sampler="nope"))
    result = service.run(GenerationRequest("x", sampler="Euler a", steps=2))
    assert result.requests[0].sampler == "euler_ancestral"


def test_cli_sampler_label_is_stored_canonical(tmp_path):
    out = tmp_path / "a.png"
    args = ["generate", "red heart", "--steps", "2", "--sampler", "DPM++ 2M SDE Beta"]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (read(out).sampler, read(out).grid) == ("dpmpp_2m_sde", "beta")
    bad = CliRunner().invoke(app, ["generate", "x", "--sampler", "DPM fast", "-o", str(out)])
    assert bad.exit_code == 2 and "'DPM fast' is not in destatic" in bad.output


# -- A1111 parameters text -----------------------------------------------------------------------
A1111_TEXT = (
    "a (very beautiful:1.3) girl,\nwith red hair\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 32x48, "
    'Model hash: abc123, Model: v1-5, Lora hashes: "a: 1, b: 2", Version: v1.10.1'
)


def test_parse_parameters():
    p = parse_parameters(A1111_TEXT)
    assert p.prompt == "a (very beautiful:1.3) girl,\nwith red hair"
    assert p.negative_prompt == "blurry, lowres"
    assert p.settings["Lora hashes"] == "a: 1, b: 2" and p.settings["Version"] == "v1.10.1"
    assert parse_parameters("just a prompt").prompt == "just a prompt"


def test_from_a1111():
    r = GenerationRequest.from_a1111(A1111_TEXT)
    assert (r.prompt, r.negative_prompt) == (
        "a (very beautiful:1.3) girl,\nwith red hair",
        "blurry, lowres",
    )
    assert (r.steps, r.sampler, r.grid, r.guidance, r.seed) == (12, "dpmpp_2m", "karras", 6.5, 1234)
    assert (r.width, r.height, r.model) == (32, 48, "")
    old = GenerationRequest.from_a1111(
        "cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 512x512, "
        "Denoising strength: 0.4, Hires upscale: 2"
    )
    assert (old.sampler, old.grid, old.hires_scale, old.hires_strength) == (
        "euler_ancestral",
        None,
        2.0,
        0.4,
    )
    with pytest.raises(RequestError, match="Steps: 'many' is not a valid int"):
        GenerationRequest.from_a1111("cat\nSteps: many, Sampler: Euler, Seed: 1")
    with pytest.raises(RequestError, match="unknown sampler 'Zap'"):
        GenerationRequest.from_a1111("cat\nSteps: 2, Sampler: Zap, Seed: 1")


def test_destatic_text_reads_back_as_a1111():
    r = GenerationRequest("cat face", steps=20, sampler="dpmpp_2m", grid="karras", guidance=3.0)
    back = GenerationRequest.from_a1111(r.a1111())
    assert (back.prompt, back.steps, back.sampler, back.grid, back.guidance) == (
        "cat face",
        20,
        "dpmpp_2m",
        "karras",
        3.0,
    )


def test_from_an_a1111_png(tmp_path):
    info = PngInfo()
    info.add_text(
        "parameters",
        "red heart\nSteps: 3, Sampler: Euler a, Schedule type: Normal, CFG scale: 2, Seed: 9, "
        "Size: 32x32, Model: sd15",
    )
    Image.new("RGB", (32, 32)).save(tmp_path / "a1111.png", pnginfo=info)
    runner = CliRunner()
    out = tmp_path / "again.png"
    result = runner.invoke(app, ["generate", "--from", str(tmp_path / "a1111.png"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    r = read(out)
    assert (r.prompt, r.steps, r.sampler, r.grid, r.seed) == (
        "red heart",
        3,
        "euler_ancestral",
        "normal",
        9,
    )
    args = ["generate", "red heart", "--steps", "3", "--sampler", "euler_ancestral", "--grid"]
    direct = tmp_path / "direct.png"
    args += ["normal", "--guidance", "2", "--seed", "9", "-o", str(direct)]
    assert runner.invoke(app, args).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(direct)))
    # an A1111 PNG names no model folder: --model may say which one draws it
    model = runner.invoke(
        app, ["generate", "--from", str(tmp_path / "a1111.png"), "--model", "emoji", "-o", str(out)]
    )
    assert model.exit_code == 0, model.output
    refused = runner.invoke(app, ["generate", "--from", str(direct), "--model", "emoji"])
    assert refused.exit_code == 2 and "--model would be ignored" in refused.output


# -- generate options ---------------------------------------------------------------------------
def test_width_height_and_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\n\nred heart\n   pizza  \n#skip\n", encoding="utf-8")
    runner = CliRunner()
    args = ["generate", "--prompts-file", str(prompts), "--width", "32", "--height", "16"]
    result = runner.invoke(app, [*args, "--steps", "2", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [read(p).prompt for p in pngs] == ["red heart", "pizza"]
    assert {Image.open(p).size for p in pngs} == {(32, 16)}
    assert (read(pngs[0]).width, read(pngs[0]).height) == (32, 16)
    both = runner.invoke(app, ["generate", "x", "--size", "32", "--width", "16"])
    assert both.exit_code == 2 and "give --size or --width/--height" in both.output
    missing = runner.invoke(app, ["generate", "--prompts-file", str(tmp_path / "none.txt")])
    assert missing.exit_code == 2 and "--prompts-file" in missing.output


def test_hires_fix(tmp_path):
    runner = CliRunner()
    out = tmp_path / "hires.png"
    args = ["generate", "red heart", "--steps", "4", "--hires", "2", "--hires-strength", "0.5"]
    result = runner.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (64, 64)
    stored = read(out)
    assert (stored.width, stored.hires_scale, stored.hires_strength) == (32, 2.0, 0.5)
    assert "Hires upscale: 2" in Image.open(out).text["parameters"]
    again = tmp_path / "again.png"
    assert runner.invoke(app, ["generate", "--from", str(out), "-o", str(again)]).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    plain = tmp_path / "plain.png"
    runner.invoke(app, ["generate", "red heart", "--steps", "4", "-o", str(plain)])
    upscaled = np.asarray(Image.open(plain).resize((64, 64), Image.Resampling.LANCZOS))
    assert not np.array_equal(upscaled, np.asarray(Image.open(out)))  # the second pass ran
    bad = runner.invoke(app, ["generate", "x", "--hires-strength", "0.3"])
    assert bad.exit_code == 2 and "--hires-strength needs --hires" in bad.output


def test_vae_tiling_runs_the_vae_in_tiles(tmp_path, monkeypatch):
    from destatic.models.autoencoder import AutoencoderKL

    pipe = destatic.load(latent_model(tmp_path))
    seen = []
    decode = AutoencoderKL.decode

    def spy(self, z, *args, **kwargs):
        seen.append(self.tile_pixels)
        return decode(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", spy)
    tiled = pipe.generate("red heart", steps=2, vae_tiling=True)
    plain = pipe.generate("red heart", steps=2)
    assert seen == [512, None] and pipe.autoencoder.tile_pixels is None
    torch.testing.assert_close(tiled, plain)  # 512-pixel tiles cover a small image: exact


def test_device_and_dtype_options(tmp_path):
    runner = CliRunner()
    out = tmp_path / "f64.png"
    args = ["generate", "red heart", "--steps", "2", "--device", "cpu", "--dtype", "fp64"]
    assert runner.invoke(app, [*args, "-o", str(out)]).exit_code == 0
    if not torch.cuda.is_available():
        bad = runner.invoke(app, ["generate", "x", "--device", "cuda"])
        assert bad.exit_code == 2 and "CUDA is not available" in bad.output
    bad = runner.invoke(app, ["generate", "x", "--dtype", "fp8"])
    assert bad.exit_code == 2 and "unknown dtype 'fp8'" in bad.output
