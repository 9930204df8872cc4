"""Where bf16 pays on the CPU, per operator: the figures behind BENCHMARKS.md "Speed on the CPU's
matrix units" (the bundled U-Net, 2 threads).

    python benchmarks/cpu_precision.py       # about 2 minutes on 2 vCPUs

1. The forward at batch 16 per operator (``torch.profiler``, 5 calls) in fp32, bf16 in the
   contiguous layout and bf16 in channels_last (destatic's ``Pipeline.to(dtype="bf16")``), and
   the last with torch's ``nn.GroupNorm`` instead of ``destatic.models.layers.GroupNorm``.
2. The forward against diffusers' ``UNet2DConditionModel`` on the same weights, both in bf16 +
   channels_last, batch 16 and 2 (medians of interleaved calls).
3. A bf16-autocast training step (batch 64, forward + MSE + backward + AdamW) with destatic's
   attention (fp32 on the CPU when training in half precision, ``destatic.models.sdpa``) against
   torch's bf16 kernel, and fp32, per operator and in samples/s.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parents[1]))

import destatic
from benchmarks.generation import THREADS, interleaved
from destatic.models import attention
from destatic.models.layers import GroupNorm
from destatic.pipelines.devices import cpu_description

LAST = "bf16 channels_last"
OPS = {
    "convolutions": ("aten::mkldnn_convolution",),
    "copies (layouts, casts)": ("aten::copy_",),
    "group_norm": ("aten::native_group_norm",),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "linear": ("aten::addmm", "aten::mm"),
    "attention backward": ("aten::_scaled_dot_product_flash_attention_for_cpu_backward",),
    "convolution backward": ("aten::convolution_backward",),
    "group_norm backward": ("aten::native_group_norm_backward",),
}


def per_operator(fn: Callable[[], object], calls: int) -> dict[str, float]:
    """Self CPU ms of :data:`OPS` over ``calls`` calls of ``fn`` (after two warm-up calls)."""
    fn(), fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = prof.key_averages()
    ms = {k: sum(e.self_cpu_time_total for e in events if e.key in v) / 1e3 for k, v in OPS.items()}
    ms["total"] = sum(e.self_cpu_time_total for e in events) / 1e3
    return ms


def forward_sides(net: torch.nn.Module, batch: int) -> dict[str, Callable]:
    x, ctx = torch.randn(batch, 3, 32, 32), torch.randn(batch, 24, 384)
    t = torch.tensor(500.0)
    sides = {}
    for name, dtype, layout in (
        ("fp32", torch.float32, torch.contiguous_format),
        ("bf16 contiguous", torch.bfloat16, torch.contiguous_format),
        (LAST, torch.bfloat16, torch.channels_last),
    ):
        m = copy.deepcopy(net).to(dtype=dtype, memory_format=layout)
        sides[name] = lambda m=m, d=dtype: m(x.to(d), t, ctx.to(d))
    return sides


def bf16_pair(ours, theirs, batch: int) -> list[Callable[[], object]]:
    """destatic's and diffusers' bf16 U-Nets on the same bf16 inputs."""
    x = torch.randn(batch, 3, 32, 32, dtype=torch.bfloat16)
    ctx = torch.randn(batch, 24, 384, dtype=torch.bfloat16)
    t = torch.tensor(500.0)
    return [lambda: ours(x, t, ctx), lambda: theirs(x, t, encoder_hidden_states=ctx)]


def train_step(net: torch.nn.Module, amp: bool) -> Callable[[], None]:
    net = copy.deepcopy(net).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, t, ctx = torch.randn(64, 3, 32, 32), torch.rand(64) * 1000, torch.randn(64, 24, 384)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = (net(x, t, ctx).float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def table(rows: dict[str, dict[str, float]], keys: list[str]) -> None:
    print("| operator | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for k in [*keys, "total"]:
        print(f"| {k} | " + " | ".join(f"{r[k]:.0f}" for r in rows.values()) + " |")


def main() -> None:
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(THREADS)
    print(f"# {cpu_description()}, torch {torch.__version__}\n")
    net = destatic.load().network.eval()
    with torch.no_grad():
        print("## U-Net forward, batch 16, 5 calls: self CPU ms per operator\n")
        sides = forward_sides(net, 16)
        rows = {k: per_operator(f, 5) for k, f in sides.items()}
        with mock.patch.object(GroupNorm, "forward", torch.nn.GroupNorm.forward):
            rows["bf16 channels_last, torch's GroupNorm"] = per_operator(sides[LAST], 5)
        table(rows, list(OPS)[:5])

        print("\n## bf16 + channels_last against diffusers, ms per forward\n")
        theirs = UNet2DConditionModel.from_pretrained(
            destatic.DEFAULT_MODEL / "unet", torch_dtype=torch.bfloat16
        ).eval()
        theirs.to(memory_format=torch.channels_last)
        ours = destatic.load().to(dtype="bf16").network.eval()
        print("| batch | destatic | diffusers | ratio |\n|---:|---:|---:|---:|")
        for batch in (16, 2):
            a, b = interleaved(bf16_pair(ours, theirs, batch), 1, 9)
            print(f"| {batch} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}× |")

    print("\n## Training step, batch 64, 3 steps: self CPU ms per operator, samples/s\n")
    steps = {"fp32": train_step(net, False), "bf16 autocast": train_step(net, True)}
    # the U-Net's attention module calling torch's kernel directly, as before destatic.models.sdpa
    torch_attention = mock.patch.object(attention, "scaled_dot_product_attention", _torch_kernel)
    torch_step = train_step(net, True)
    rows = {k: per_operator(f, 3) for k, f in steps.items()}
    with torch_attention:
        rows["bf16 autocast, torch's bf16 attention"] = per_operator(torch_step, 3)
    table(rows, list(OPS)[1:])
    with torch_attention:
        rate = 64 / interleaved([torch_step], 1, 5)[0]
    ours_rates = [64 / t for t in interleaved(list(steps.values()), 1, 5)]
    print(f"\nsamples/s: fp32 {ours_rates[0]:.1f}, bf16 autocast {ours_rates[1]:.1f}, ", end="")
    print(f"bf16 autocast with torch's bf16 attention {rate:.1f}")


def _torch_kernel(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


if __name__ == "__main__":
    main()
