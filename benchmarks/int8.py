"""int8 inference on the CPU: does it beat bf16 for the bundled U-Net? (issue 19, goal 1)

    python benchmarks/int8.py [--batch 8] [--reps 15]
    pip install torchao==0.18.0   # for the static int8 side (PT2E, X86InductorQuantizer)

Sides, one network forward of the bundled emoji U-Net on the same inputs (2 threads,
interleaved, median):

* fp32 eager — the reference output;
* int8 dynamic — ``torch.ao.quantization.quantize_dynamic`` on the ``Linear`` layers (weights
  int8, activations quantised per batch at run time; the convolutions stay fp32);
* int8 static — torchao's PT2E flow: ``torch.export``, ``X86InductorQuantizer`` (convolutions
  and linears, per-channel int8 weights, activations calibrated on four batches), then
  ``torch.compile`` with freezing, which lowers to oneDNN's int8 kernels (AMX-INT8 where
  present);
* bf16 compiled — bf16 weights, channels_last, ``torch.compile`` with freezing: the same
  compiler, so the two compiled sides differ only in the number format.

Each side's error is ``‖out − fp32‖ / ‖fp32‖`` on the timed inputs.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import interleaved

import destatic
from destatic.pipelines.devices import cpu_description

THREADS = 2


class _Plain(torch.nn.Module):
    """The U-Net as a function of (x, t, context) returning a tensor (for torch.export)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, t, context):
        out = self.net(x, t, context)
        return getattr(out, "sample", out)


def _inputs(batch: int, size: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 3, size, size, generator=g),
        torch.rand(batch, generator=g) * 1000,
        torch.randn(batch, 24, 384, generator=g),
    )


def static_int8(net: torch.nn.Module, example: tuple, batch: int, size: int):
    """torchao's PT2E int8 (None when torchao is not installed)."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        return None
    exported = torch.export.export(net, example).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for seed in range(1, 5):
        prepared(*_inputs(batch, size, seed))
    return torch.compile(convert_pt2e(prepared))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    import torch._inductor.config as inductor

    inductor.freezing = True
    pipe = destatic.load()
    net = _Plain(pipe.network.float().eval()).eval()
    size = pipe.default_size
    x, t, c = _inputs(args.batch, size, 0)
    bf16 = copy.deepcopy(net).to(torch.bfloat16).to(memory_format=torch.channels_last)
    bf16 = torch.compile(bf16)
    dynamic = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(net), {torch.nn.Linear}, dtype=torch.qint8
    )
    sides = {
        "fp32 eager": lambda: net(x, t, c),
        "int8 dynamic (linears)": lambda: dynamic(x, t, c),
        "bf16 compiled": lambda: bf16(x.bfloat16(), t, c.bfloat16()),
    }
    with torch.no_grad():
        static = static_int8(net, (x, t, c), args.batch, size)
        if static is not None:
            sides["int8 static (torchao PT2E)"] = lambda: static(x, t, c)
        else:
            print("int8 static skipped: pip install torchao==0.18.0")
        reference = net(x, t, c)
        times = interleaved(list(sides.values()), warmup=2, reps=args.reps)
        print(f"machine: {cpu_description()}, torch {torch.__version__}")
        print(f"bundled U-Net forward, batch {args.batch}, {size}²")
        print("| side | ms | fp32 ÷ this | error vs fp32 |")
        print("|---|---:|---:|---:|")
        for (name, fn), s in zip(sides.items(), times, strict=True):
            err = float((fn().float() - reference).norm() / reference.norm())
            print(f"| {name} | {s * 1e3:.1f} | {times[0] / s:.2f} | {err:.4f} |")


if __name__ == "__main__":
    main()
