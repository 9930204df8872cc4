"""MMDiT (SD3): parity with diffusers' SD3Transformer2DModel, init, config handling."""

import pytest
import torch

from destatic.models.mmdit import MMDIT_MODELS, MMDiT, MMDiTConfig
from tests import tiny_sd

TINY = tiny_sd.MMDIT


def _inputs(cfg: MMDiTConfig, batch: int = 2, side: int = 16, tokens: int = 7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, tokens, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    return x, t, ctx, pooled


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("side", [16, 12])
def test_parity_with_diffusers(qk_norm, side):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**TINY, qk_norm=qk_norm).eval()
    tiny_sd.perturb(ref, 0.1)  # the zero-initialised gates and output layer too
    model = MMDiT(MMDiTConfig.from_diffusers(dict(ref.config))).eval()
    assert model.state_dict().keys() == ref.state_dict().keys()
    torch.testing.assert_close(model.pos_embed.pos_embed, ref.pos_embed.pos_embed)
    model.load_state_dict(ref.state_dict(), strict=True)

    x, t, ctx, pooled = _inputs(model.config, side=side)
    with torch.no_grad():
        want = ref(x, ctx, pooled, t, return_dict=False)[0]
        got = model(x, t, ctx, pooled)
    assert got.shape == want.shape == x.shape
    scale = want.abs().max().item()
    assert scale > 0.1  # not trivially zero
    assert (got - want).abs().max().item() <= 1e-5 * scale


def test_fresh_model_outputs_zero_and_is_trainable():
    model = MMDiT(MMDiTConfig(**TINY))
    x, t, ctx, pooled = _inputs(model.config)
    out = model(x, t, ctx, pooled)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    (out - 1).pow(2).mean().backward()  # zero output, but the output layer still learns
    assert model.proj_out.weight.grad.abs().sum() > 0


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="dual_attention_layers"):  # block 2 of 2 blocks
        MMDiTConfig.from_diffusers({**TINY, "dual_attention_layers": (0, 2)})
    with pytest.raises(ValueError, match="qk_norm"):
        MMDiTConfig.from_diffusers({**TINY, "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="bogus"):
        MMDiTConfig.from_diffusers({**TINY, "bogus": 1})
    with pytest.raises(ValueError, match="caption_projection_dim"):
        MMDiTConfig(**{**TINY, "caption_projection_dim": 12})
    # bookkeeping keys and the SD3.0 defaults are accepted
    cfg = MMDiTConfig.from_diffusers(
        {**TINY, "_class_name": "SD3Transformer2DModel", "dual_attention_layers": ()}
    )
    assert cfg == MMDiTConfig(**TINY)


def test_config_round_trip():
    cfg = MMDiTConfig(**{**TINY, "qk_norm": "rms_norm"})
    assert MMDiTConfig.from_dict(cfg.to_dict()) == cfg
    assert MMDiTConfig(num_attention_heads=3, attention_head_dim=8).caption_projection_dim == 24


def test_named_sizes():
    small = dict(joint_attention_dim=32, pooled_projection_dim=24, in_channels=4)
    model = MMDIT_MODELS["MMDiT-XS"](**small)
    assert model.config.hidden_size == 128 and len(model.transformer_blocks) == 4
    x, t, ctx, pooled = _inputs(model.config, batch=1, side=8, tokens=3)
    assert model(x, t, ctx, pooled).shape == x.shape
    assert set(MMDIT_MODELS) >= {"MMDiT-XS", "MMDiT-S", "MMDiT-B"}
