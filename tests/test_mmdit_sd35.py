"""SD3.5 Medium's MMDiT-X: dual-attention blocks and RMS-normed queries/keys, against diffusers'
SD3Transformer2DModel, alone and in a pipeline folder against StableDiffusion3Pipeline."""

import json

import pytest
import torch

import destatic
from destatic.models.mmdit import AdaLayerNormZeroX, MMDiT, MMDiTConfig
from destatic.models.speedups import fuse_projections, unfuse_projections
from tests import tiny_sd
from tests.test_mmdit import _inputs
from tests.test_pipeline_sd3 import assert_same_image

diffusers = pytest.importorskip("diffusers")

# SD3.5 Medium in miniature: dual attention in the first blocks (0..12 of 24 there), including
# here the last (pre-only) block so that combination is covered too.
SD35 = dict(tiny_sd.MMDIT, num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0, 2))


def _reference(config: dict, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return tiny_sd.perturb(SD3Transformer2DModel(**config), 0.1).eval()


def test_transformer_parity_with_diffusers():
    ref = _reference(SD35)
    model = MMDiT(MMDiTConfig.from_diffusers(dict(ref.config))).eval()
    assert model.state_dict().keys() == ref.state_dict().keys()  # attn2.*, norm1.linear 9·D
    model.load_state_dict(ref.state_dict(), strict=True)
    assert [b.attn2 is not None for b in model.transformer_blocks] == [True, False, True]
    assert isinstance(model.transformer_blocks[0].norm1, AdaLayerNormZeroX)

    x, t, ctx, pooled = _inputs(model.config)
    with torch.no_grad():
        want = ref(x, ctx, pooled, t, return_dict=False)[0]
        got = model(x, t, ctx, pooled)
        # the second attention matters: without it the output moves
        for block in model.transformer_blocks:
            block.dual = False
        ablated = model(x, t, ctx, pooled)
        for block in model.transformer_blocks:
            block.dual = block.attn2 is not None
        fused = fuse_projections(model)(x, t, ctx, pooled)
    unfuse_projections(model)
    scale = want.abs().max().item()
    assert scale > 0.1
    assert (got - want).abs().max().item() <= 1e-5 * scale
    assert (ablated - want).abs().max().item() > 1e-2 * scale
    assert (fused - want).abs().max().item() <= 1e-5 * scale
    assert model.state_dict().keys() == ref.state_dict().keys()


def test_fresh_dual_model_outputs_zero():
    model = MMDiT(MMDiTConfig(**SD35))
    x, t, ctx, pooled = _inputs(model.config)
    assert torch.equal(model(x, t, ctx, pooled), torch.zeros_like(x))


def test_config_json_round_trip_and_bad_indices():
    cfg = MMDiTConfig(**SD35)
    again = MMDiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # tuple → list → tuple
    assert again == cfg and again.dual_attention_layers == (0, 2)
    for bad in ((3,), (-1,), (0.5,)):
        with pytest.raises(ValueError, match="dual_attention_layers"):
            MMDiTConfig.from_diffusers({**SD35, "dual_attention_layers": bad})


def sd35_pipeline(tmp_path):
    """The tiny SD3 pipeline with an SD3.5 Medium transformer (dual attention in block 0, RMS
    q/k norms), saved by diffusers to ``tmp_path / "pipeline"``; returns the diffusers pipeline."""
    from diffusers import SD3Transformer2DModel

    reference = tiny_sd.sd3_pipeline(tmp_path)
    torch.manual_seed(1)
    config = dict(tiny_sd.SD3_MMDIT, qk_norm="rms_norm", dual_attention_layers=(0,))
    transformer = tiny_sd.perturb(SD3Transformer2DModel(**config)).eval()
    reference.register_modules(transformer=transformer)
    reference.save_pretrained(tmp_path / "pipeline", safe_serialization=True)
    return reference


def test_sd35_folder_same_image_as_diffusers(tmp_path):
    reference = sd35_pipeline(tmp_path)

    ours = destatic.load(tmp_path / "pipeline")
    assert ours.network.config.dual_attention_layers == (0,)
    assert ours.network.config.qk_norm == "rms_norm"
    print("sd35 pipeline max abs diff", assert_same_image(reference, ours, seed=0))
