"""The bundled models (the 32² default, the 64² one and the companions): small, load offline,
follow their configs, generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import destatic
from destatic.training import load_config

ROOT = Path(__file__).parents[1]
#: the bundled text-to-image models: the 32² default and the 64² one (BENCHMARKS.md, "The 64×64
#: model"), each with its training config and side
PIXEL_MODELS = pytest.mark.parametrize(
    ("name", "side"), [("emoji", 32), ("emoji64", 64)], ids=["emoji", "emoji64"]
)


@PIXEL_MODELS
def test_bundle_is_small_fp16_safetensors(name, side):
    folder = destatic.BUNDLED[name].folder
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25e6
    assert {f.suffix for f in files} <= {".json", ".safetensors"}  # never pickle
    from destatic.io import load_weights

    weights = load_weights(folder / "unet")
    assert {v.dtype for v in weights.values()} == {torch.float16}


@PIXEL_MODELS
def test_bundle_matches_its_config(name, side):
    folder = destatic.BUNDLED[name].folder
    cfg = load_config(ROOT / destatic.BUNDLED[name].config)
    assert cfg.data.size == side
    unet = json.loads((folder / "unet" / "config.json").read_text())
    for key, value in cfg.model.unet.items():
        assert unet[key] == value, key
    index = json.loads((folder / "model_index.json").read_text())
    assert index["destatic_text_max_length"] == cfg.model.text_max_length
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    # the API and the CLI draw at the scale the config's sample grids used
    defaults = destatic.load(name).sampling_defaults
    assert defaults["guidance"] == cfg.sample.guidance == 3.0
    assert defaults["steps"] == cfg.sample.steps == 8  # on the time-to-quality frontier


@PIXEL_MODELS
def test_bundled_model_generates_distinct_images_per_prompt(name, side):
    pipe = destatic.load(name)
    assert pipe.default_size == side
    images = pipe.generate(["red heart", "green apple"], steps=8, seed=0)
    assert images.shape == (2, 3, side, side)
    assert bool(torch.isfinite(images).all())
    assert float((images[0] - images[1]).abs().mean()) > 0.05  # the prompt changes the image
    # a red heart is redder than it is green
    heart = images[0]
    assert float(heart[0].mean()) > float(heart[1].mean())


def test_default_flow_grid_keeps_multistep_solvers_accurate():
    """On diffusers' FlowMatch spacing (``normal``) the last nonzero σ is the smallest trained
    one, so DPM++ 2M's penultimate step spans most of log σ and over-extrapolates; the default
    grid ends its uniform time steps at 0 instead. Measured against a fine Euler solve."""
    pipe = destatic.load()
    assert pipe.default_grid == "sgm_uniform"
    prompts, seeds = ["red heart", "cat face", "pizza"], [0, 1, 2]
    reference = pipe.generate(prompts, sampler="euler", steps=96, guidance=3.0, seed=seeds)

    def error(grid: str) -> float:
        out = pipe.generate(
            prompts, sampler="dpmpp_2m", steps=4, grid=grid, guidance=3.0, seed=seeds
        )
        return float((out - reference).pow(2).mean().sqrt())

    assert error("sgm_uniform") < 0.7 * error("normal")


def _heldout_emoji():
    """The held-out split of the emoji data at 32², or a skip where the font is missing."""
    try:
        from destatic.data.emoji import load_emoji

        return load_emoji(32, progress=False).heldout()
    except (FileNotFoundError, RuntimeError) as err:
        pytest.skip(f"emoji data unavailable: {err}")


INPAINT_CONFIG = ROOT / "configs" / "emoji_inpaint.toml"


def test_bundled_inpainting_model_reads_mask_and_image():
    files = [f for f in destatic.DEFAULT_INPAINT_MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25e6
    assert {f.suffix for f in files} <= {".json", ".safetensors"}
    cfg = load_config(INPAINT_CONFIG)
    unet = json.loads((destatic.DEFAULT_INPAINT_MODEL / "unet" / "config.json").read_text())
    for key, value in cfg.model.unet.items():
        assert unet[key] == value, key
    pipe = destatic.load(destatic.DEFAULT_INPAINT_MODEL)
    assert pipe.inpainting_model and unet["in_channels"] == 7  # noisy image, mask, masked image
    heart = destatic.load().generate("red heart", steps=8, seed=0)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1  # repaint the centre of the heart
    kwargs = {"steps": 8, "sampler": "dpmpp_2m", "seed": 1, "guidance": 3.0}
    free = pipe.generate("red heart", image=heart, mask=mask, **kwargs)
    keep = (mask == 0).expand_as(heart)
    assert float(((free - heart)[keep] ** 2).mean()) < 0.02  # it learned to keep what it sees
    held = pipe.generate("red heart", image=heart, mask=mask, keep_unmasked=True, **kwargs)
    torch.testing.assert_close(held[keep], heart[keep], atol=2e-3, rtol=0)  # fp16 network
    hole = held[0, :, 8:24, 8:24]
    assert float(hole[0].mean()) > float(hole[1].mean()) + 0.2  # the hole is filled with red


def test_bundled_controlnet_makes_images_follow_real_edges():
    from destatic.data.edges import canny_edges
    from destatic.io import load_weights
    from destatic.metrics import edge_f1
    from destatic.models.registry import load_component

    files = [f for f in destatic.DEFAULT_CONTROLNET.rglob("*") if f.is_file()]
    assert {f.suffix for f in files} <= {".json", ".safetensors"}
    weights = load_weights(destatic.DEFAULT_CONTROLNET)
    assert {v.dtype for v in weights.values()} == {torch.float16}
    held = _heldout_emoji()
    images, prompts = held.images[:16], list(held.captions[:16])
    edges = canny_edges(images)
    maps = torch.from_numpy(edges).permute(0, 3, 1, 2).float() / 255
    pipe, net = destatic.load(), load_component(destatic.DEFAULT_CONTROLNET)
    kwargs = {"steps": 8, "sampler": "dpmpp_2m", "guidance": 3.0, "seed": 0}
    free = pipe.generate(prompts, **kwargs)
    steered = pipe.generate(prompts, controlnet=net, control_image=maps, **kwargs)
    # these 16 with their captions: 0.83 → 0.89; on 64 held-out images at 20 steps 0.81 → 0.90
    # (BENCHMARKS.md, "Inpainting and control quality")
    assert edge_f1(steered, edges) > edge_f1(free, edges) + 0.04


def test_bundled_lcm_student_follows_prompts_in_four_steps():
    """The bundled LCM student (configs/emoji_lcm.toml) loads by name, runs its own 4 guided
    steps, and finds held-out prompts about as well as the teacher does with 16 CFG steps (2×16
    network passes). Full figures: BENCHMARKS.md, "Distillation"."""
    from destatic.metrics.evaluator import load_evaluator

    files = [f for f in destatic.DEFAULT_LCM_MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25e6
    assert {f.suffix for f in files} <= {".json", ".safetensors"}
    student = destatic.load("emoji_lcm")
    assert student.guidance_embedded
    assert student.sampling_defaults == {
        "steps": 4,
        "sampler": "lcm",
        "grid": "sgm_uniform",
        "guidance": 3.0,
    }
    held = _heldout_emoji()
    prompts = list(held.captions[::16][:24])  # spread over the categories (measured: both 0.62)
    fast = student.generate(prompts, seed=0)
    slow = destatic.load().generate(prompts, steps=16, sampler="euler", guidance=3.0, seed=0)
    evaluator = load_evaluator()
    fast_top1, slow_top1 = (evaluator.retrieval(x, prompts).top1 for x in (fast, slow))
    assert slow_top1 > 0.5 and fast_top1 >= slow_top1 - 0.15, (fast_top1, slow_top1)


def test_bundled_token_model_draws_from_the_cli_and_follows_prompts(tmp_path):
    """The bundled autoregressive token model (configs/emoji_ar.toml over the VQ tokenizer of
    configs/emoji_tokenizer.toml) is small fp16 safetensors, draws ``destatic generate "red
    heart" --model emoji_ar`` with its decoding recorded in the PNG, and finds held-out prompts
    by top-k sampling and by beam search. Full figures: BENCHMARKS.md, "Autoregressive and
    MaskGIT beside diffusion"."""
    from PIL import Image
    from typer.testing import CliRunner

    from destatic.bundled import BUNDLED
    from destatic.cli import app
    from destatic.metrics.evaluator import load_evaluator

    folder = BUNDLED["emoji_ar"].folder
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25e6
    assert {f.suffix for f in files} <= {".json", ".safetensors"}
    out = tmp_path / "heart.png"
    args = ["generate", "red heart", "--model", "emoji_ar", "--top-k", "64", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (32, 32)
    stored = json.loads(Image.open(out).info["destatic"])
    assert (stored["sampler"], stored["top_k"]) == ("autoregressive", 64)

    pipe = destatic.load("emoji_ar")
    config = load_config(Path(__file__).parents[1] / "configs" / "emoji_ar.toml")
    assert pipe.sampling_defaults["guidance"] == config.sample.guidance == 1.0
    held = _heldout_emoji()
    prompts = list(held.captions[::16][:24])  # spread over the categories
    evaluator = load_evaluator()
    sampled = pipe.generate(prompts, top_k=64, seed=0)
    beam = pipe.generate(prompts, sampler="beam", beams=4, seed=0)
    tops = [evaluator.retrieval(x, prompts).top1 for x in (sampled, beam)]
    assert min(tops) >= 0.125, tops  # measured 8 and 16 of 24 (seed 0); chance: 1 of 24
