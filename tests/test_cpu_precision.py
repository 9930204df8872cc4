"""CPU precision levers of issue 19: the attention kernel's fp32 backward for bf16 training,
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
