"""What the side-by-side comparison of diffusion and token models measures: decoding settings
as sweep settings, the unseen-skin-tone compositions and network FLOPs per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from destatic.data.emoji import SKIN_TONES, tone_variants
from destatic.metrics.evaluator import Evaluator, ImageTextModel
from destatic.metrics.flops import flops_per_image
from destatic.metrics.sweep import Reference, Setting, _unseen_tones, evaluate
from tests.test_evaluator import TINY, WordEncoder


def test_tone_variants_swap_the_one_tone_named():
    variants = tone_variants("raised hand: medium-light skin tone")
    assert variants == [f"raised hand: {t}" for t in SKIN_TONES]
    assert tone_variants("people holding hands: light skin tone, dark skin tone") is None
    assert tone_variants("red heart") is None


def test_unseen_tones_are_held_out_tones_of_trained_concepts():
    prompts = ["raised hand: dark skin tone", "ghost: light skin tone", "red heart"]
    train = [["raised hand: light skin tone"], ["raised hand"], ["pizza"]]
    found = _unseen_tones(prompts, train)
    assert list(found) == [0]  # the ghost's concept never had a tone; the heart names none
    assert found[0][4] == "raised hand: dark skin tone"


def test_decoding_settings_pass_their_fields_and_count_passes():
    s = Setting("autoregressive", 64, 2.0, None, (("temperature", 0.7), ("top_k", 32)))
    assert s.nfe == 64
    assert s.fields() == {
        "sampler": "autoregressive",
        "steps": 64,
        "guidance": 2.0,
        "grid": None,
        "temperature": 0.7,
        "top_k": 32,
    }
    assert s.label.endswith("temperature 0.7 top-k 32")
    assert Setting("maskgit", 8, 2.0).nfe == 8


class _Recorder:
    """A stand-in model that records the fields it was asked for and draws from the seed."""

    default_size = 8

    def __init__(self):
        self.calls: list[dict] = []
        self.layer = torch.nn.Linear(4, 4)

    def generate(self, prompts, seed, **fields):
        self.calls.append(fields)
        images = torch.stack(
            [torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seed]
        )
        self.layer(torch.ones(len(prompts), 4))  # a counted matmul: 2·4·4 FLOPs per image
        return images


def test_evaluate_passes_options_scores_compositions_and_counts_flops():
    prompts = ["raised hand: dark skin tone", "pizza"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    reference = Reference(prompts, images, images, compositions={0: tone_variants(prompts[0])})
    torch.manual_seed(0)
    scorer = Evaluator(ImageTextModel(TINY), WordEncoder())
    model = _Recorder()
    setting = Setting("autoregressive", 16, 1.5, None, (("beams", 2),))
    real, (row,) = evaluate(
        model,
        [setting],
        reference,
        evaluator=scorer,
        metrics=["retrieval"],
        progress=False,
        flops=True,
    )
    assert model.calls[0]["beams"] == 2 and model.calls[0]["sampler"] == "autoregressive"
    assert row.composition in (0.0, 1.0) and real.composition in (0.0, 1.0)
    assert row.flops == pytest.approx(2 * 4 * 4)


def test_flops_count_attention_on_the_cpu():
    class Attend(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    class One:
        def generate(self, prompts, seed, **fields):
            return Attend()(torch.randn(1, 2, 16, 8))

    # QKᵀ and the weighted sum: 2 · (2 · 16 · 16 · 8) multiply-adds, 2 FLOPs each
    assert flops_per_image(One(), {}, "x") == 4 * 2 * 16 * 16 * 8


def test_cli_eval_sweeps_a_token_models_decoders(tmp_path):
    """``destatic eval`` on a token model: its decoders (sampling, greedy, beam search) instead
    of samplers, each row with its GFLOP per image."""
    import json

    from typer.testing import CliRunner

    import destatic
    from destatic.cli import app
    from tests.token_fixtures import tiny_token_folder

    if not (destatic.DEFAULT_EVALUATOR / "config.json").is_file():
        pytest.skip("no bundled evaluator")
    try:
        from destatic.data.emoji import load_emoji

        load_emoji(16, progress=False)
    except (FileNotFoundError, RuntimeError) as err:
        pytest.skip(f"emoji data unavailable: {err}")
    model = tiny_token_folder(tmp_path / "ar")
    args = ["eval", str(model), "--n", "3", "--guidance", "2", "--guidance-sweep", "1,3"]
    args += ["--metrics", "retrieval", "-o", str(tmp_path / "r")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "r" / "results.json").read_text())
    labels = [r["label"] for r in rows["steps"]]
    assert labels == [
        "autoregressive 64 steps cfg 2 temperature 1",
        "autoregressive 64 steps cfg 2 temperature 0",
        "beam 64 steps cfg 2 beams 4",
    ]
    flops = [r["flops"] for r in rows["steps"]]
    assert all(f > 0 for f in flops) and flops[2] > flops[0]  # four beams cost more
    assert [r["setting"]["guidance"] for r in rows["guidance"]] == [1.0, 3.0]
    assert rows["guidance"][0]["flops"] < rows["guidance"][1]["flops"]  # w = 1: one stream
