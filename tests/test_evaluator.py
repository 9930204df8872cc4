"""The CLIP-style evaluator: loss, retrieval and scores, saving, training, the bundled one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import destatic
from destatic.cli import app
from destatic.io import CheckpointError, load_weights
from destatic.metrics.evaluator import (
    Evaluator,
    EvaluatorConfig,
    ImageTextModel,
    caption_loss,
    is_evaluator_folder,
    load_evaluator,
    load_image_text_model,
    save_evaluator,
)
from destatic.training import load_config, train
from destatic.training.tasks.evaluator import _shifted
from tests.training_fixtures import COLOURS, write_squares

TINY = EvaluatorConfig(
    image_size=16, block_out_channels=[8, 16], norm_num_groups=4, embed_dim=16, text_hidden=32
)


class WordEncoder(torch.nn.Module):
    """A stand-in text encoder: pooled = a fixed random vector per word, averaged."""

    pooled_dim = 384
    max_length = 8

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def encode(self, prompts):
        vecs = []
        for p in prompts:
            seed = sum(ord(c) * (i + 1) for i, c in enumerate(p)) % (2**31)
            vecs.append(torch.randn(384, generator=torch.Generator().manual_seed(seed)))
        return type("E", (), {"pooled": torch.stack(vecs)})()


def test_caption_loss_is_cross_entropy_with_one_positive_and_sums_several():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    one = torch.zeros(3, 5, dtype=torch.bool)
    one[torch.arange(3), torch.tensor([0, 2, 4])] = True
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2, 4]), reduction="none")
    assert torch.allclose(caption_loss(logits, one), expected, atol=1e-6)
    two = one.clone()
    two[0, 1] = True  # image 0 has two captions: -log(p0 + p1)
    p = logits.softmax(1)
    assert math.isclose(
        float(caption_loss(logits, two)[0]), -math.log(p[0, 0] + p[0, 1]), rel_tol=1e-5
    )
    with pytest.raises(ValueError, match="at least one positive"):
        caption_loss(logits, torch.zeros(3, 5, dtype=torch.bool))


def test_embeddings_are_unit_vectors_and_logits_scaled():
    model = ImageTextModel(TINY)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    t = torch.randn(4, 384)
    assert torch.allclose(model.encode_images(x).norm(dim=-1), torch.ones(2), atol=1e-5)
    logits = model(x, t)
    assert logits.shape == (2, 4)
    cos = model.encode_images(x) @ model.encode_text(t).T
    assert torch.allclose(logits, cos / 0.07, atol=1e-4)


def test_retrieval_ranks_against_candidates_and_checks_input():
    torch.manual_seed(0)
    ev = Evaluator(ImageTextModel(TINY), WordEncoder())
    images = torch.rand(6, 3, 16, 16)
    prompts = ["a", "b", "c", "d", "e", "f"]
    scores = ev.image_features(images) @ ev.text_features(prompts).T
    expected_top1 = float((scores.argmax(1) == torch.arange(6)).float().mean())
    r = ev.retrieval(images, prompts)
    assert r.top1 == pytest.approx(expected_top1)
    assert r.top5 >= r.top1 and r.chance == pytest.approx(1 / 6) and r.n == 6
    assert ev.retrieval(images, prompts, candidates=prompts[:6] + ["x"] * 3).chance == 1 / 7
    assert 0 <= ev.clip_score(images, prompts) <= 100
    with pytest.raises(ValueError, match="images for"):
        ev.retrieval(images, prompts[:5])
    with pytest.raises(ValueError, match="not among the candidates"):
        ev.retrieval(images, prompts, candidates=["a"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ev.image_features(torch.rand(2, 16, 16))


def test_save_load_round_trip_export_and_bad_folders(tmp_path):
    model = ImageTextModel(TINY)
    save_evaluator(model, tmp_path / "ev")
    assert is_evaluator_folder(tmp_path / "ev") and not is_evaluator_folder(tmp_path)
    loaded = load_image_text_model(tmp_path / "ev")
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(model.eval().encode_images(x), loaded.encode_images(x))
    result = CliRunner().invoke(app, ["export", str(tmp_path / "ev"), str(tmp_path / "half")])
    assert result.exit_code == 0, result.output
    half = load_weights(tmp_path / "half")
    assert {v.dtype for v in half.values()} == {torch.float16}
    assert torch.allclose(
        model.encode_images(x), load_image_text_model(tmp_path / "half").encode_images(x), atol=2e-2
    )
    with pytest.raises(CheckpointError, match="not an evaluator folder"):
        load_image_text_model(tmp_path)
    (tmp_path / "ev" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(CheckpointError, match="not an ImageTextModel config"):
        load_image_text_model(tmp_path / "ev")


def test_shift_augmentation_translates_and_fills_with_background():
    x = torch.zeros(2, 1, 4, 4)
    x[:, :, 0, 0] = 5.0  # the corner colour is the fill
    x[:, :, 1, 1] = 1.0
    out = _shifted(x, torch.tensor([[0, 0], [1, 2]]))
    assert torch.equal(out[0], x[0])
    assert out[1, 0, 2, 3] == 1.0  # moved down 1, right 2
    assert out[1, 0, 0, 0] == 5.0 and out[1, 0, 0, 1] == 5.0  # uncovered pixels filled


def test_evaluator_task_trains_and_exports(tmp_path, monkeypatch):
    """Red / green / blue squares: a few steps of the real loop learn the colour words."""
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path / "cache"))
    root = write_squares(tmp_path / "shapes", 30, placed=False)
    cfg_path = tmp_path / "ev.toml"
    cfg_path.write_text(
        f"""
[data]
dataset = "folder"
path = "{root}"
size = 16
caption_dropout = 0.0

[evaluator.config]
block_out_channels = [8, 16]
norm_num_groups = 4
embed_dim = 16
text_hidden = 32
text_max_length = 8

[optim]
lr = 3e-3
warmup_steps = 0
ema_decay = 0.0

[train]
task = "evaluator"
steps = 25
batch_size = 12
checkpoint_every = 25
log_every = 1
sample_every = 0
threads = 1
progress = false
tensorboard = false

[output]
dir = "{tmp_path / "run"}"
"""
    )
    folder = train(load_config(cfg_path))
    ev = load_evaluator(folder)
    images = torch.from_numpy(
        np.stack([np.asarray(Image.open(p)) for p in sorted(root.glob("*.png"))])
    )
    images = images.permute(0, 3, 1, 2).float() / 255
    prompts = [f"a {list(COLOURS)[i % 3]} square" for i in range(30)]
    assert ev.retrieval(images, prompts).top1 == 1.0  # three colours, 25 steps
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg_path.read_text().replace("embed_dim = 16", "embed_dim = 16\nimage_size = 8"))
    from destatic.training import ConfigError

    with pytest.raises(ConfigError, match="image_size"):
        train(load_config(bad))


@pytest.mark.skipif(
    not (destatic.DEFAULT_EVALUATOR / "config.json").is_file(), reason="no bundled evaluator"
)
def test_bundled_evaluator_is_small_and_retrieves_real_heldout_emoji():
    files = [f for f in destatic.DEFAULT_EVALUATOR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 10e6
    assert {f.suffix for f in files} <= {".json", ".safetensors"}
    try:
        from destatic.data.emoji import load_emoji

        held = load_emoji(32, progress=False).heldout()
    except (FileNotFoundError, RuntimeError) as err:
        pytest.skip(f"emoji data unavailable: {err}")
    ev = load_evaluator()
    images = torch.from_numpy(held.images).permute(0, 3, 1, 2).float() / 255
    r = ev.retrieval(images, held.captions)
    assert r.top1 > 30 * r.chance  # measured: see BENCHMARKS.md "Evaluation"
    shuffled = held.captions[1:] + held.captions[:1]
    assert ev.clip_score(images, held.captions) > ev.clip_score(images, shuffled) + 5
