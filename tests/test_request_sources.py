"""A request records what a single-file model was built with (``--config``, ``--tokenizer``,
``--vae``), so ``destatic generate --from image.png`` draws the same image without repeating
them, and says in one line when a recorded file is gone."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from destatic.cli import app
from destatic.pipelines import GenerationRequest
from destatic.pipelines.request import CHUNK, RequestError
from tests import tiny_sd
from tests.test_single_file import SD, ldm_state

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

BASE = ["--steps", "2", "--size", "16", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny SD 1.x single file, the diffusers folder with its configs and tokenizer, and
    another autoencoder's ``vae/`` folder."""
    tmp = tmp_path_factory.mktemp("sources")
    unet, vae, text, tokenizer = tiny_sd.components(tmp)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp / "folder", safe_serialization=True)
    save_file(ldm_state(pipe), str(tmp / "model.safetensors"))
    torch.manual_seed(1)
    other = tiny_sd.perturb(diffusers.AutoencoderKL(**tiny_sd.VAE)).eval()
    other.save_pretrained(tmp / "other" / "vae", safe_serialization=True)
    return tmp


def _generate(*args: str) -> None:
    result = CliRunner().invoke(app, ["generate", *args])
    assert result.exit_code == 0, result.output


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_from_reproduces_a_single_file_image_with_its_vae(sources, tmp_path):
    file, folder, vae = (
        sources / "model.safetensors",
        sources / "folder",
        sources / "other" / "vae",
    )
    built = [
        "--model",
        str(file),
        "--config",
        str(folder),
        "--tokenizer",
        str(folder / "tokenizer"),
    ]
    _generate("a red cat", *BASE, *built, "--vae", str(vae), "-o", str(tmp_path / "a.png"))
    stored = json.loads(Image.open(tmp_path / "a.png").info[CHUNK])
    assert stored["model"] == str(file) and stored["vae"] == str(vae)
    assert stored["config"] == str(folder) and stored["tokenizer"] == str(folder / "tokenizer")
    assert "VAE: vae" in Image.open(tmp_path / "a.png").info["parameters"]

    _generate("--from", str(tmp_path / "a.png"), "--device", "cpu", "-o", str(tmp_path / "b.png"))
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))

    # the recorded --vae matters: the model's own autoencoder draws another image
    _generate("a red cat", *BASE, *built, "-o", str(tmp_path / "c.png"))
    assert np.abs(_pixels(tmp_path / "a.png") - _pixels(tmp_path / "c.png")).max() > 2


def test_from_names_a_recorded_file_that_is_gone(sources, tmp_path):
    shutil.copytree(sources / "other" / "vae", tmp_path / "vae")
    args = ["--model", str(sources / "model.safetensors"), "--config", str(sources / "folder")]
    _generate("a cat", *BASE, *args, "--vae", str(tmp_path / "vae"), "-o", str(tmp_path / "a.png"))
    shutil.rmtree(tmp_path / "vae")
    result = CliRunner().invoke(
        app, ["generate", "--from", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png")]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"--vae {tmp_path / 'vae'}, which is not there any more" in lines[0]
    assert not (tmp_path / "b.png").exists()


def test_from_refuses_options_it_replaces(sources, tmp_path):
    """Given again with ``--from``, ``--vae`` would be ignored: refused like ``--model``."""
    args = ["--model", str(sources / "model.safetensors"), "--config", str(sources / "folder")]
    _generate("a cat", *BASE, *args, "-o", str(tmp_path / "a.png"))
    for option in ("--vae", "--config", "--tokenizer"):
        result = CliRunner().invoke(
            app, ["generate", "--from", str(tmp_path / "a.png"), option, str(sources / "other")]
        )
        assert result.exit_code == 2 and f"so {option} would be ignored" in result.output


def test_sources_round_trip_and_are_type_checked(tmp_path):
    r = GenerationRequest(prompt="x", model="m.safetensors", config="cfg", vae="v.safetensors")
    back = GenerationRequest.from_json(r.to_json())
    assert back == r
    options = {"config": "cfg", "tokenizer": None, "vae": "v.safetensors", "motion_adapter": None}
    assert back.load_options() == options
    assert GenerationRequest.from_dict({"prompt": "x"}).load_options()["vae"] is None  # older PNGs
    with pytest.raises(RequestError, match="vae must be text"):
        GenerationRequest.from_dict({"prompt": "x", "vae": 3})
    GenerationRequest(config="org/name").check_sources("a.png")  # a repo id: the loader's call
    with pytest.raises(RequestError, match=r"^a\.png was drawn with --tokenizer"):
        GenerationRequest(tokenizer=str(tmp_path / "gone")).check_sources("a.png")
