"""One GenerationRequest: every front end (Python API, CLI, HTTP API, web UI) resolves the same
sampling settings for every bundled model, a request round-trips through a PNG, and the family
and task registries list what they hold and refuse unknown names with the valid ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import destatic
from destatic.bundled import resolve
from destatic.cli import app
from destatic.pipelines import FAMILIES, GenerationRequest, RequestError, load

SETTINGS = ("steps", "sampler", "grid", "guidance")


def settings(r: GenerationRequest) -> tuple:
    return tuple(getattr(r, k) for k in SETTINGS)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An input image, a mask and a control image, as files."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root


# (bundled model, CLI arguments, request fields, the pipeline that draws it)
CASES = {
    "emoji": ([], {}, "emoji"),
    "emoji_lcm": (["--model", "emoji_lcm"], {"model": "emoji_lcm"}, "emoji_lcm"),
    "inpainting": (
        ["--image", "{root}/in.png", "--mask", "{root}/mask.png"],
        {"image": "{root}/in.png", "mask": "{root}/mask.png"},
        "emoji_inpaint",
    ),
    "controlnet": (["--control", "{root}/in.png"], {"control_image": "{root}/in.png"}, "emoji"),
}


def _fill(value, root):
    return value.format(root=root) if isinstance(value, str) else value


@pytest.mark.parametrize("case", list(CASES))
def test_every_front_end_resolves_the_same_request(case, inputs, tmp_path):
    args, fields, drawn_by = CASES[case]
    fields = {k: _fill(v, inputs) for k, v in fields.items()}
    # the Python API: the request the caller builds, routed and resolved on its model
    request = GenerationRequest("cat face", **fields).with_companions()
    assert resolve(request.model or None).name == drawn_by
    python = request.resolved(load(request.model or None))
    # the CLI: what the written PNG says it was drawn with
    out = tmp_path / "cli.png"
    cli_args = ["generate", "cat face", *[_fill(a, inputs) for a in args], "-o", str(out)]
    result = CliRunner().invoke(app, [*cli_args, "--no-progress"])
    assert result.exit_code == 0, result.output
    cli = GenerationRequest.from_png(out)
    assert settings(cli) == settings(python)
    # the HTTP API and the web UI share the service, which routes and resolves the same way
    from destatic.serve import GenerationService
    from destatic.serve.__init__ import _service

    model = fields.get("model")
    service = _service(model, _limits(), None, None)
    assert isinstance(service, GenerationService)
    image = Image.open(inputs / "in.png")
    served = {
        "emoji": {},
        "emoji_lcm": {},
        "inpainting": {"image": image, "mask": Image.open(inputs / "mask.png").convert("L")},
        "controlnet": {"control_image": image},
    }[case]
    _, routed = service.route(GenerationRequest("cat face", **served))
    assert settings(routed) == settings(python)
    ui = _ui_settings(service)  # the web UI opens on the same settings
    assert (ui["steps"], ui["sampler"], ui["guidance"]) == (
        python.steps,
        python.sampler,
        python.guidance,
    )


def _limits():
    from destatic.serve import Limits

    return Limits(max_side=64)


def _ui_settings(service) -> dict:
    """The values the web UI's settings show when it opens."""
    import gradio as gr

    from destatic.serve.ui import _Tabs

    with gr.Blocks():
        sampler, _grid, steps, guidance, *_ = _Tabs(service).sampling_controls()
    return {"sampler": sampler.value, "steps": steps.value, "guidance": guidance.value}


def test_serve_lcm_answers_with_its_own_sampler_and_steps():
    """The bug this request fixed: `destatic serve --model emoji_lcm` used dpmpp_2m, 20 steps
    and guidance 3 instead of the model's lcm / 4 steps."""
    from fastapi.testclient import TestClient

    from destatic.serve import create_app

    client = TestClient(create_app("emoji_lcm", _limits()))
    answer = client.post("/api/generate", json={"prompt": "pizza"})
    assert answer.status_code == 200, answer.text
    params = answer.json()["parameters"][0]
    assert (params["sampler"], params["steps"]) == ("lcm", 4)
    assert client.get("/api/health").json()["defaults"]["sampler"] == "lcm"
    assert _ui_settings(client.app.state.service)["sampler"] == "lcm"


def test_request_round_trips_through_a_png(tmp_path):
    request = GenerationRequest(
        ["red heart", "pizza"],
        negative_prompt="blurry",
        steps=3,
        sampler="euler_ancestral",
        grid="karras",
        guidance=2.5,
        guidance_rescale=0.5,
        guidance_interval=(0.1, 10.0),
        seed=7,
        num_images=2,
        variation_seed=100,
        variation_strength=0.25,
        loras=[["style.safetensors", 0.8]],
        sampler_options={"eta": 0.5},
    )
    third = request.for_image(2, 32, 32)
    assert (third.prompt, third.seed, third.variation_seed) == ("pizza", 9, 102)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png", pnginfo=third.png_info())
    back = GenerationRequest.from_png(tmp_path / "a.png")
    assert back == third
    text = Image.open(tmp_path / "a.png").text["parameters"]
    assert text.startswith("pizza\nNegative prompt: blurry\nSteps: 3, Sampler: euler_ancestral")


def test_request_json_is_type_checked():
    with pytest.raises(RequestError, match="unknown field"):
        GenerationRequest.from_dict({"prompt": "x", "colour": "red"})
    with pytest.raises(RequestError, match="steps must be an integer"):
        GenerationRequest.from_dict({"prompt": "x", "steps": "ten"})
    with pytest.raises(RequestError, match="guidance must be a finite number"):
        GenerationRequest.from_dict({"prompt": "x", "guidance": float("nan")})
    with pytest.raises(RequestError, match="not valid Unicode"):
        GenerationRequest.from_dict({"prompt": "\ud800"})
    with pytest.raises(RequestError, match="loras must be"):
        GenerationRequest.from_dict({"prompt": "x", "loras": [["a"]]})
    with pytest.raises(RequestError, match="not valid JSON"):
        GenerationRequest.from_json("{")
    old = {"prompt": "x", "image": "", "mask": "", "controlnet": "", "control_image": ""}
    assert GenerationRequest.from_dict(old).image is None  # PNGs of earlier versions


def test_one_fallback_per_family():
    """A folder without stored defaults takes its family's; the bundled ones store theirs."""
    assert load().sampling_defaults["guidance"] == 3.0
    assert FAMILIES["stable-diffusion"].defaults["guidance"] == 7.5
    lcm = load("emoji_lcm").sampling_defaults
    assert (lcm["sampler"], lcm["steps"]) == ("lcm", 4)


def test_family_registry_lists_and_refuses(tmp_path):
    from destatic.io import CheckpointError

    assert {"destatic", "stable-diffusion", "sd3"} <= set(FAMILIES)
    assert load().family.name == "destatic"
    index = {"transformer": ["diffusers", "HunyuanDiT2DModel"], "vae": ["a", "b"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"supported: .*destatic \(") as err:
        load(tmp_path)
    assert "\n" not in str(err.value) and "stable-diffusion" in str(err.value)


def test_task_registry_lists_and_refuses(tmp_path):
    from destatic.training import ConfigError, load_config
    from destatic.training.tasks import TASKS

    expected = {"denoiser", "autoencoder", "evaluator", "control", "lcm", "reflow", "lora"}
    assert expected <= set(TASKS)
    config = tmp_path / "c.toml"
    config.write_text('[train]\ntask = "painting"\n')
    with pytest.raises(ConfigError, match="painting") as err:
        load_config(config)
    assert all(name in str(err.value) for name in expected)


def test_bundled_table_and_companions():
    from destatic.bundled import BUNDLED, companions

    assert set(BUNDLED) == {"emoji", "emoji64", "emoji_inpaint", "emoji_control", "emoji_lcm",
                            "emoji_video", "emoji_ar", "emoji_evaluator", "notes",
                            "notes_evaluator"}  # fmt: skip
    assert resolve(None) == destatic.DEFAULT_MODEL == resolve("emoji")
    assert set(companions(None)) == {"inpaint", "control"}
    assert companions("emoji_lcm") == {}


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ({"steps": "many"}, "destatic_defaults.steps must be an integer"),
        ({"sampler": "bogus"}, "destatic_defaults.sampler must be one of"),
        ({"guidance": [1]}, "destatic_defaults.guidance must be a number"),
        ([], "destatic_defaults must be an object"),
    ],
)
def test_stored_defaults_are_checked(tmp_path, defaults, message):
    import shutil

    from destatic.io import CheckpointError

    folder = tmp_path / "m"
    shutil.copytree(destatic.DEFAULT_LCM_MODEL, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["destatic_defaults"] = defaults
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        load(folder)
