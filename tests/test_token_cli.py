"""Token models through the front ends: ``destatic generate`` (decoding options, the request in
the PNG that ``--from`` replays pixel for pixel, one-line refusals), the HTTP API (decoding
fields accepted, bad values a one-line 400) and the web UI's decoding controls."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from destatic.cli import app as cli
from tests.token_fixtures import SIDE, tiny_token_folder, tiny_token_pipeline


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_token_folder(tmp_path_factory.mktemp("tokens") / "model")


def generate(*args: str):
    return CliRunner().invoke(cli, ["generate", *args, "--no-progress"])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_a_png_of_the_models_size(model, tmp_path):
    out = tmp_path / "x.png"
    result = generate("red heart", "--model", str(model), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (SIDE, SIDE)
    stored = json.loads(Image.open(out).info["destatic"])
    assert (stored["sampler"], stored["steps"], stored["guidance"]) == ("autoregressive", 64, 3.0)
    assert (stored["temperature"], stored["top_k"], stored["top_p"], stored["beams"]) == (
        1.0,
        0,
        1.0,
        1,
    )


@pytest.mark.parametrize(
    "options",
    [
        ["--temperature", "0.7", "--top-k", "8", "--top-p", "0.9", "--seed", "3"],
        ["--beams", "3", "--guidance", "2"],
    ],
)
def test_from_replays_the_same_pixels(model, tmp_path, options):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    result = generate("blue car", "--model", str(model), "-o", str(first), *options)
    assert result.exit_code == 0, result.output
    stored = json.loads(Image.open(first).info["destatic"])
    if "--beams" in options:
        assert (stored["sampler"], stored["beams"], stored["guidance"]) == ("beam", 3, 2.0)
    else:
        assert (stored["temperature"], stored["top_k"], stored["top_p"]) == (0.7, 8, 0.9)
    result = generate("--from", str(first), "-o", str(again))
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(again), pixels(first))
    other = tmp_path / "other.png"
    assert generate("blue car", "--model", str(model), "-o", str(other)).exit_code == 0
    assert not np.array_equal(pixels(other), pixels(first))  # the options mattered


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--sampler", "euler"], "--sampler euler is not for token models; token models take"),
        (["--grid", "karras"], "--grid is not for token models"),
        (["--lora", "x.safetensors"], "--lora is not for token models"),
        (["--hires", "2"], "--hires is not for token models"),
        (["--size", "32"], "draws 16×16 images only"),
        (["--steps", "4"], "steps = 4: an autoregressive model draws its 64 codes"),
        (["--vae", "."], "--vae swaps a part of a diffusion model"),
    ],
)
def test_options_a_token_model_cannot_use_are_one_line(model, tmp_path, options, message):
    result = generate("x", "--model", str(model), "-o", str(tmp_path / "x.png"), *options)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output


def test_decoding_options_are_checked_before_loading(tmp_path):
    for options in (["--top-p", "0"], ["--top-p", "2"], ["--beams", "0"], ["--top-k", "-1"]):
        result = generate("x", "-o", str(tmp_path / "x.png"), *options)
        assert result.exit_code == 2 and "Invalid value" in result.output, options
    result = generate("x", "-o", str(tmp_path / "x.png"), "--temperature", "0.5")
    assert result.exit_code == 2
    assert "error: temperature is for token models; this is a diffusion model" in result.output


# -- the server -----------------------------------------------------------------------------------
gradio = pytest.importorskip("gradio", reason="the web UI needs gradio (pip install gradio)")


@pytest.fixture(scope="module")
def api(model):
    from fastapi.testclient import TestClient

    from destatic.serve import Limits, create_app

    with TestClient(create_app(model, Limits(max_images=2, max_beams=4))) as client:
        yield client


def test_api_draws_with_decoding_fields(api):
    health = api.get("/api/health").json()
    assert health["default_size"] == SIDE and health["defaults"]["sampler"] == "autoregressive"
    assert health["defaults"]["temperature"] == 1.0
    body = {"prompt": "red heart", "temperature": 0.5, "top_k": 4, "beams": 2, "seed": 7}
    r = api.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    params = r.json()["parameters"][0]
    assert (params["sampler"], params["beams"], params["top_k"], params["seed"]) == (
        "beam",
        2,
        4,
        7,
    )
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (SIDE, SIDE)
    sampled = api.post("/api/generate.png", json={"prompt": "red heart", "temperature": 0.5})
    assert sampled.status_code == 200 and sampled.content[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_p": 0}, "top_p = 0: must be in (0, 1]"),
        ({"top_p": 2}, "top_p = 2: must be in (0, 1]"),
        ({"beams": 0}, "beams = 0: must be an integer ≥ 1"),
        ({"beams": 5}, "beams = 5 is out of range: use 1 … 4"),
        ({"top_k": 33}, "top_k = 33 is more than the model's 32 codes"),
        ({"temperature": "hot"}, "temperature must be a finite number"),
        ({"width": 32}, "width = 32: this token model draws 16×16 only"),
        ({"grid": "karras"}, "grid is not for token models"),
        ({"strength": 0.5}, "strength is not for token models"),
        ({"steps": 5}, "steps = 5: an autoregressive model draws its 64 codes"),
    ],
)
def test_bad_decoding_values_are_a_one_line_400(api, fields, message):
    r = api.post("/api/generate", json={"prompt": "x", **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error and "\n" not in error, error


def test_ui_shows_decoding_controls_and_draws_with_them():
    from destatic.serve.service import GenerationService
    from destatic.serve.ui import build_ui

    ui = build_ui(GenerationService(tiny_token_pipeline()))
    config = ui.get_config_file()
    shown = {
        c["props"].get("elem_id"): c["props"]
        for c in config["components"]
        if c["props"].get("visible", True) is not False
    }
    for name in ("temperature", "top-k", "top-p", "beams"):
        assert f"txt2img-{name}" in shown, name
    assert shown["txt2img-top-k"]["maximum"] == 32
    tabs = [c["props"]["label"] for c in config["components"] if c["type"] == "tabitem"]
    assert tabs == ["Text → image"]  # no image → image, inpainting or control
    decoders = [c for c in config["components"] if c["props"].get("label") == "Decoder"]
    assert [choice[0] for choice in decoders[0]["props"]["choices"]] == ["autoregressive", "beam"]
    handler = next(f for f in ui.fns.values() if f.api_name == "txt2img").fn
    # prompt, negative, temperature, top-k, top-p, beams, sampler, grid, steps, guidance, seed,
    # count, size (an autoregressive model's steps and size are states: None)
    decoding = ("red heart", "", 0.5, 4, 0.9, 1)
    images, text = handler(*decoding, "autoregressive", "default", None, 2.0, 3, 1, None)
    assert len(images) == 1 and "Temperature: 0.5, Top-k: 4, Top-p: 0.9, Beams: 1" in text
