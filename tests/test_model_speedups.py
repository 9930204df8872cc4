"""Opt-in speed-ups (destatic.models.speedups): fused projections and torch.compile compute
the same function as the plain models."""

import copy

import pytest
import torch

from destatic.models import MMDiT, MMDiTConfig, UNet2DCondition, UNetConfig
from destatic.models.speedups import fuse_projections, optimize, unfuse_projections
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")

SD2 = dict(tiny_sd.UNET, use_linear_projection=True, attention_head_dim=(2, 4))
QK = dict(tiny_sd.MMDIT, qk_norm="rms_norm")


def _unet(kwargs: dict = tiny_sd.UNET) -> UNet2DCondition:
    torch.manual_seed(0)
    ref = tiny_sd.perturb(diffusers.UNet2DConditionModel(**kwargs))
    ours = UNet2DCondition(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def _mmdit(kwargs: dict = tiny_sd.MMDIT) -> MMDiT:
    torch.manual_seed(0)
    ref = tiny_sd.perturb(diffusers.SD3Transformer2DModel(**kwargs), 0.1)
    ours = MMDiT(MMDiTConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def _unet_inputs(batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    return x, torch.tensor([999.0, 17.25])[:batch], torch.randn(batch, 7, 32, generator=g)


def _mmdit_inputs(batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    return x, t, torch.randn(batch, 7, 32, generator=g), torch.randn(batch, 24, generator=g)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    assert got.shape == want.shape
    assert want.abs().max() > 0.1  # not trivially zero
    assert (got - want).abs().max() <= rtol * want.abs().max()


CASES = [
    (_unet, {}, _unet_inputs),
    (_unet, SD2, _unet_inputs),
    (_mmdit, {}, _mmdit_inputs),
    (_mmdit, QK, _mmdit_inputs),
]
IDS = ["unet-sd1", "unet-sd2", "mmdit", "mmdit-qknorm"]


@pytest.mark.parametrize(("build", "kwargs", "make_inputs"), CASES, ids=IDS)
def test_fused_equals_unfused_and_unfuse_restores_keys(build, kwargs, make_inputs) -> None:
    model = build(kwargs) if kwargs else build()
    keys = list(model.state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = make_inputs()
    with torch.no_grad():
        want = model(*inputs)
        fuse_projections(model)
        fused_keys = list(model.state_dict())
        assert fused_keys != keys and len(fused_keys) < len(keys)
        assert any("qkv" in k for k in fused_keys)
        got = model(*inputs)
        fuse_projections(model)  # idempotent
        assert list(model.state_dict()) == fused_keys
        unfuse_projections(model)
        again = model(*inputs)
    _close(got, want)
    assert list(model.state_dict()) == keys  # diffusers' keys, in diffusers' order
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(again, want)  # unfused is bit-identical to never fused


def test_fused_model_trains_and_unfuses_to_trained_weights() -> None:
    model = _mmdit().train()
    fuse_projections(model)
    x, t, ctx, pooled = _mmdit_inputs()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(x, t, ctx, pooled).square().mean().backward()
    opt.step()
    fused_w = model.transformer_blocks[0].attn.to_qkv.weight.detach().clone()
    with torch.no_grad():
        want = model(x, t, ctx, pooled)
    unfuse_projections(model)
    attn = model.transformer_blocks[0].attn
    assert torch.equal(attn.to_k.weight, fused_w[fused_w.shape[0] // 3 : 2 * fused_w.shape[0] // 3])
    assert attn.to_q.weight.requires_grad
    with torch.no_grad():
        _close(model(x, t, ctx, pooled), want)


def test_optimize_without_compile_and_channels_last() -> None:
    model = _unet()
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        want = model(x, t, ctx)
        fast = optimize(model, channels_last=True)
        assert fast is model
        _close(fast(x, t, ctx), want)
    with pytest.raises(ValueError, match="compile"):
        optimize(model, freeze=True)


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [False, True], ids=["compile", "compile-freeze"])
@pytest.mark.parametrize(("build", "kwargs", "make_inputs"), CASES[::2], ids=IDS[::2])
def test_compiled_equals_eager(build, kwargs, make_inputs, freeze) -> None:
    torch._dynamo.reset()
    model = build()
    inputs = make_inputs()
    with torch.no_grad():
        want = model(*inputs)
        fast = optimize(copy.deepcopy(model), compile=True, freeze=freeze)
        _close(fast(*inputs), want)
