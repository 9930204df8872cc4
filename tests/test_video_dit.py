"""VideoDiT (destatic.models.video_dit): shapes, zero init, RoPE's relative positions,
frame-locality of factorised attention, save/load, other frame counts, bad configs."""

from __future__ import annotations

import pytest
import torch

from destatic.models.flux import apply_rope, rope
from destatic.models.registry import COMPONENT_CLASSES, load_component, save_component
from destatic.models.video_dit import (
    VIDEO_DIT_MODELS,
    VideoDiT,
    VideoDiTBlock,
    VideoDiTConfig,
    video_rope,
)

TINY = {"dim": 32, "num_layers": 2, "num_heads": 2, "context_dim": 24, "pooled_dim": 16}


def tiny(attention: str = "factorised", **kw) -> VideoDiT:
    return VideoDiT(VideoDiTConfig(attention=attention, **{**TINY, **kw}))


def randomise(model: VideoDiT, seed: int = 0) -> VideoDiT:
    """Every parameter random (the zero-initialised ones too), so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def inputs(b: int = 2, frames: int = 4, size: int = 8, seed: int = 1):
    cfg = VideoDiTConfig(**TINY)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, frames, size, size, generator=g)
    t = torch.rand(b, generator=g) * 1000
    ctx = torch.randn(b, 5, cfg.context_dim, generator=g)
    pooled = torch.randn(b, cfg.pooled_dim, generator=g)
    return x, t, ctx, pooled


@pytest.mark.parametrize("attention", ["full", "factorised"])
@pytest.mark.parametrize("patch", [(1, 2), (2, 4)])
def test_output_shape(attention, patch):
    pt, p = patch
    model = randomise(tiny(attention, patch_size_t=pt, patch_size=p, out_channels=6))
    x, t, ctx, pooled = inputs(frames=4, size=8)
    y = model(x, t, ctx, pooled)
    assert y.shape == (2, 6, 4, 8, 8)
    assert torch.isfinite(y).all() and y.abs().max() > 0


@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_zero_init_gives_zero_output_and_identity_blocks(attention):
    model = tiny(attention)
    x, t, ctx, pooled = inputs()
    assert torch.equal(model(x, t, ctx, pooled), torch.zeros_like(x))
    block = model.blocks[0]
    h = torch.randn(2, 4 * 4 * 4, 32)
    c = torch.randn(2, 32)
    rotary = video_rope((4, 4, 4), model.config.rope_axes_dim, attention, torch.device("cpu"))
    assert torch.equal(block(h, c, ctx, (4, 4, 4), rotary), h)


def test_rope_scores_depend_only_on_offsets():
    """⟨R(m)q, R(n)k⟩ is unchanged when both positions move by the same (t, h, w) shift."""
    cfg = VideoDiTConfig(**TINY)
    ids_grid = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 5.0]])  # positions m, n
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 2, cfg.head_dim, generator=g).unbind(0)  # (1, 1, H=2, d)

    def score(m, n):
        cos, sin = rope(torch.stack([m, n]), cfg.rope_axes_dim)
        qm = apply_rope(q, cos[:1], sin[:1])
        kn = apply_rope(k, cos[1:], sin[1:])
        return (qm * kn).sum(-1)  # (1, 1, H)

    base = score(*ids_grid)
    for shift in ([3.0, 0, 0], [0, 7.0, 0], [0, 0, 11.0], [2.0, 5.0, 9.0]):
        moved = score(*(ids_grid + torch.tensor(shift)))
        assert torch.allclose(base, moved, atol=1e-5)
    # and it does depend on the offset (the test can fail)
    other = score(ids_grid[0], ids_grid[1] + torch.tensor([1.0, 0, 0]))
    assert not torch.allclose(base, other, atol=1e-3)


def _frame_change(model: VideoDiT, frame: int = 1) -> float:
    """How much frame ``frame``'s output moves when frame 0 of the input is perturbed."""
    x, t, ctx, pooled = inputs(frames=6)
    x2 = x.clone()
    x2[:, :, 0] += torch.randn_like(x2[:, :, 0])
    with torch.no_grad():
        a, b = model(x, t, ctx, pooled), model(x2, t, ctx, pooled)
    return (a[:, :, frame] - b[:, :, frame]).abs().max().item()


def test_factorised_spatial_attention_is_frame_local():
    """Without the temporal attention, frames are independent; with it, frame 0 reaches frame 5
    (both directions: the attention is not causal)."""
    model = randomise(tiny("factorised"))
    assert _frame_change(model, 5) > 1e-3
    with torch.no_grad():
        for block in model.blocks:
            block.attn_t.to_out[0].weight.zero_()
            block.attn_t.to_out[0].bias.zero_()
    assert _frame_change(model, 5) == 0.0
    assert _frame_change(model, 0) > 1e-3  # frame 0 itself still moves


def test_full_attention_mixes_frames():
    assert _frame_change(randomise(tiny("full")), 5) > 1e-3


@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_save_load_round_trip(tmp_path, attention):
    assert COMPONENT_CLASSES["VideoDiT"][0] is VideoDiT
    model = randomise(tiny(attention, patch_size_t=2)).eval()
    save_component(model, tmp_path / "t", class_name="VideoDiT", config=model.config.to_dict())
    loaded = load_component(tmp_path / "t")
    assert isinstance(loaded, VideoDiT) and loaded.config == model.config
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx, pooled), loaded(x, t, ctx, pooled))


@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_other_frame_counts_and_sizes(attention):
    model = randomise(tiny(attention, num_frames=8))
    for frames, size in ((8, 8), (3, 8), (12, 4), (5, 12)):
        x, t, ctx, pooled = inputs(frames=frames, size=size, b=1)
        assert model(x, t, ctx, pooled).shape == (1, 3, frames, size, size)


def test_backward_reaches_every_parameter():
    model = randomise(tiny("factorised"))
    x, t, ctx, pooled = inputs()
    model(x, t, ctx, pooled).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing
    fresh = tiny("full")  # from zero init, the output layer gets a gradient at once
    fresh(*inputs()).sum().backward()
    assert fresh.proj_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"dim": 30, "num_heads": 4}, "divisible by num_heads"),
        ({"num_frames": 7, "patch_size_t": 2}, "num_frames=7"),
        ({"sample_size": 30, "patch_size": 4}, "sample_size=30"),
        ({"attention": "sparse"}, "attention='sparse'"),
        ({"rope_axes_dim": [4, 4, 4]}, "summing to the head width"),
        ({"rope_axes_dim": [5, 5, 6]}, "even counts"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_bad_config_is_one_line_value_error(fields, words):
    with pytest.raises(ValueError, match=words) as info:
        VideoDiTConfig.from_dict({**TINY, **fields})
    assert "\n" not in str(info.value)


def test_bad_clip_is_one_line_value_error():
    model = tiny(patch_size_t=2)
    x, t, ctx, pooled = inputs(frames=3)
    with pytest.raises(ValueError, match="does not cut into") as info:
        model(x, t, ctx, pooled)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="takes clips"):
        model(x[:, :, 0], t, ctx, pooled)


def test_block_type_and_factory_sizes():
    assert isinstance(tiny().blocks[0], VideoDiTBlock)
    small = VIDEO_DIT_MODELS["VideoDiT-S"](attention="full")
    assert 3e6 < sum(p.numel() for p in small.parameters()) < 6e6


def test_fused_projections_give_the_same_output():
    """The self-attentions are MMDiT attentions, so ``models.fuse_projections`` applies."""
    from destatic.models import fuse_projections, unfuse_projections

    model = randomise(tiny("factorised")).eval()
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        before = model(x, t, ctx, pooled)
        fused = fuse_projections(model)(x, t, ctx, pooled)
    assert torch.allclose(before, fused, atol=1e-5)
    assert model.blocks[0].attn.fused and model.blocks[0].attn_t.fused
    unfuse_projections(model)
    assert set(model.state_dict()) == set(tiny("factorised").state_dict())
