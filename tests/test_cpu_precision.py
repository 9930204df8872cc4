"""CPU precision levers of issue 19: the attention kernel's fp32 backward for bf16 training
(spelled out in bf16 when compiled),
the GroupNorm that normalises small channels_last maps contiguously, and training's ``auto``
precision (bf16 autocast only where the CPU has bf16 matrix units)."""

import pytest
import torch
import torch.nn.functional as F

from destatic.models.layers import GroupNorm
from destatic.models.sdpa import scaled_dot_product_attention
from destatic.pipelines import devices
from destatic.training import trainer


def _qkv(dtype: torch.dtype, grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 64, 16, generator=g).to(dtype).requires_grad_(grad) for _ in "qkv"]


def test_attention_is_torchs_kernel_in_fp32_and_at_inference():
    q, k, v = _qkv(torch.float32)
    assert torch.equal(
        scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    )
    q, k, v = _qkv(torch.bfloat16)
    with torch.no_grad():
        ours = scaled_dot_product_attention(q, k, v)
        assert torch.equal(ours, F.scaled_dot_product_attention(q, k, v))


def test_bf16_training_attention_runs_in_fp32_and_gives_bf16_gradients():
    q, k, v = _qkv(torch.bfloat16, grad=True)
    out = scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(*(t.detach().float() for t in (q, k, v)))
    assert torch.equal(out, exact.to(torch.bfloat16))  # computed in fp32, rounded once
    out.float().square().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not re-cast it to bf16
        again = scaled_dot_product_attention(q, k, v)
    assert torch.equal(again, out)


def test_compiled_bf16_training_attention_is_spelled_out_within_bf16_rounding():
    """Inside torch.compile a bf16 training step's attention is the explicit bf16 product (see
    destatic.models.sdpa): output and gradients within bf16 rounding of fp32 attention."""
    q, k, v = _qkv(torch.bfloat16, grad=True)
    compiled = torch.compile(scaled_dot_product_attention, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    assert out.dtype == torch.bfloat16
    assert not torch.equal(out, scaled_dot_product_attention(q, k, v))  # the other spelling
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    exact = F.scaled_dot_product_attention(*ref)
    torch.testing.assert_close(out.float(), exact, atol=0.03, rtol=0.03)
    weights = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * weights).sum().backward()
    (exact * weights).sum().backward()
    for ours, theirs in zip((q, k, v), ref, strict=True):
        error = (ours.grad.float() - theirs.grad).norm() / theirs.grad.norm()
        assert error < 0.01, error  # measured 0.005


@pytest.mark.parametrize("side", [8, 16, 32])
def test_group_norm_is_the_same_in_either_layout(side):
    norm = GroupNorm(8, 32)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 32, side, side)
    reference = F.group_norm(x, 8, norm.weight, norm.bias, norm.eps)
    assert torch.equal(norm(x), reference)  # contiguous: torch's own call
    last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(norm(last), reference, rtol=1e-5, atol=1e-5)
    assert set(norm.state_dict()) == {"weight", "bias"}  # nn.GroupNorm's keys


@pytest.mark.parametrize(
    "flags, expected", [({"avx2"}, None), ({"amx_bf16"}, torch.bfloat16), (set(), None)]
)
def test_training_auto_precision_follows_the_cpu(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "cpu_features", lambda: frozenset(flags))
    assert trainer._autocast_dtype("auto", torch.device("cpu")) is expected
    assert trainer._autocast_dtype("fp32", torch.device("cpu")) is None
    assert trainer._autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


def _unet_grads(model: torch.nn.Module, amp: bool) -> dict[str, torch.Tensor]:
    """The parameter gradients of one MSE step of ``model`` on a fixed batch, in fp32 or under
    bf16 autocast."""
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 8, 384, generator=g)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(x, torch.full((4,), 500.0), context)
    out.float().square().mean().backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def _trained_unet() -> torch.nn.Module:
    """The tiny test U-Net with every weight random (a fresh one zeroes its output convolution,
    which would leave all gradients but that layer's zero)."""
    from destatic.models import UNet2DCondition, UNetConfig
    from tests.training_fixtures import PIXEL_UNET

    torch.manual_seed(0)
    model = UNet2DCondition(UNetConfig(**PIXEL_UNET))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_layer_norm_sums_its_affine_gradients_in_fp32_under_autocast():
    from destatic.models.layers import LayerNorm

    torch.manual_seed(0)
    ours, plain = LayerNorm(64), torch.nn.LayerNorm(64)
    x = torch.randn(64, 256, 64)
    grads = {}
    for name, norm, amp in (("fp32", plain, False), ("ours", ours, True), ("aten", plain, True)):
        norm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = norm(x.to(torch.bfloat16) if amp else x)
        (y.float() * torch.linspace(-1, 1, 64)).square().mean().backward()
        grads[name] = norm.weight.grad.clone()
    error = {k: float((grads[k] - grads["fp32"]).norm() / grads["fp32"].norm()) for k in grads}
    assert error["ours"] < 0.01 < 0.1 < error["aten"]  # ATen's bf16 sums are far off
    assert torch.equal(ours(x), plain(x))  # outside autocast it is nn.LayerNorm


def test_compiled_blocks_give_eager_gradients_under_bf16_autocast():
    """``compile_blocks`` (``[train] compile``): every parameter gets the gradient eager bf16
    gives it, to bf16's rounding — compiling the whole U-Net as one graph gave 126 of its 208
    parameters gradients off by more than that (most of them zero)."""
    from destatic.models.speedups import blocks, compile_blocks

    model = _trained_unet()
    assert len(blocks(model)) == 5  # 2 down, mid, 2 up
    reference, eager = _unet_grads(model, False), _unet_grads(model, True)
    compiled = _unet_grads(compile_blocks(model), True)
    for name, ref in reference.items():  # off fp32 by no more than eager bf16 is, or 5%
        scale = float(ref.norm()) + 1e-8
        eager_error = float((eager[name] - ref).norm()) / scale
        assert float((compiled[name] - ref).norm()) / scale <= max(2 * eager_error, 0.05), name
