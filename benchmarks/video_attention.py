"""VideoDiT on CPU: full against factorised (space, then time) attention, and training-step rates.

    python benchmarks/video_attention.py            # about 10 minutes on 2 busy vCPUs (load 6)
    python benchmarks/video_attention.py --quick    # the (2, 4, 4) rows and the XS step rates

Table 1: seconds per forward + backward of a batch of 8 clips of 3×8×32×32 (fp32, 2 threads,
the best of interleaved runs after a one-clip warm-up: on a shared machine the best run is
the least disturbed), for VideoDiT-S (about 4M parameters full, 5M factorised) with (pt, p, p)
patches (1, 2, 2) and (2, 4, 4). Table 2: optimizer steps per second (forward, backward, AdamW)
at batch 32 for smaller configs, the rate a one-hour CPU training gets. The CPU model, the
threads and the load average are printed so the figures can be read against the machine's
contention; "CPU s" is this process's CPU time in the same run (about 2× the undisturbed wall
time with 2 busy threads).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from destatic.models.video_dit import VideoDiT, VideoDiTConfig
from destatic.pipelines.devices import cpu_description

THREADS = 2
CLIP = (3, 8, 32, 32)  # C, F, H, W
TEXT_TOKENS = 16
S = {"dim": 160, "num_layers": 6, "num_heads": 5}  # VideoDiT-S
#: Smaller configs for the training-rate table: (name, fields).
SMALL = (
    ("XS (128·4)", {"dim": 128, "num_layers": 4, "num_heads": 4}),
    ("XXS (96·4, mlp 2)", {"dim": 96, "num_layers": 4, "num_heads": 3, "mlp_ratio": 2}),
    ("XXXS (64·3, mlp 2)", {"dim": 64, "num_layers": 3, "num_heads": 2, "mlp_ratio": 2}),
)


def make(fields: dict, attention: str, patch: tuple[int, int]) -> VideoDiT:
    pt, p = patch
    cfg = VideoDiTConfig(attention=attention, patch_size_t=pt, patch_size=p, **fields)
    return VideoDiT(cfg).train()


def batch(n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(n, *CLIP, generator=g),
        torch.rand(n, generator=g) * 1000,
        torch.randn(n, TEXT_TOKENS, 384, generator=g),
        torch.randn(n, 384, generator=g),
    )


def tokens(patch: tuple[int, int]) -> int:
    pt, p = patch
    return (CLIP[1] // pt) * (CLIP[2] // p) * (CLIP[3] // p)


def best_times(steps: list, inputs: tuple[torch.Tensor, ...], reps: int) -> list[tuple]:
    """(wall seconds, CPU seconds of this process) of each step's run with the least wall time.

    Each step is warmed up on one clip (the rotary tables, the allocator, the kernels), then the
    steps run in turn ``reps`` times, so that a busy spell on a shared machine slows every row
    alike rather than one."""
    for step in steps:
        step(tuple(t[:1] for t in inputs))
    times: list[list[tuple[float, float]]] = [[] for _ in steps]
    for _ in range(reps):
        for step, row in zip(steps, times, strict=True):
            t0, c0 = time.perf_counter(), time.process_time()
            step(inputs)
            row.append((time.perf_counter() - t0, time.process_time() - c0))
    return [min(row) for row in times]


def forward_backward(model: VideoDiT):
    def step(inputs: tuple[torch.Tensor, ...]) -> None:
        model.zero_grad(set_to_none=True)
        model(*inputs).square().mean().backward()

    return step


def train_step(model: VideoDiT):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(inputs: tuple[torch.Tensor, ...]) -> None:
        opt.zero_grad(set_to_none=True)
        model(*inputs).square().mean().backward()
        opt.step()

    return step


def params(model: VideoDiT) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    print(
        f"# VideoDiT attention on CPU: {cpu_description()}, torch {torch.__version__}, "
        f"{THREADS} threads, fp32, best of {args.reps} interleaved runs after a warm-up; "
        f"load average {os.getloadavg()[0]:.1f} at start\n"
    )
    print(
        "| config | attention | patch (pt, p, p) | tokens/clip | params (M) | fwd+bwd s / 8 clips "
        "| CPU s |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    patches = [(2, 4)] if args.quick else [(2, 4), (1, 2)]
    rows = [(attention, patch) for patch in patches for attention in ("full", "factorised")]
    models = [make(S, attention, patch) for attention, patch in rows]
    steps = [forward_backward(model) for model in models]
    results = best_times(steps, batch(8), args.reps)
    for (attention, (pt, p)), model, (sec, cpu) in zip(rows, models, results, strict=True):
        print(
            f"| VideoDiT-S | {attention} | ({pt}, {p}, {p}) | {tokens((pt, p))} | "
            f"{params(model):.1f} | {sec:.2f} | {cpu:.2f} |"
        )
    print(
        "\n| config | attention | patch | tokens/clip | params (M) | steps/s at batch 32 "
        "| CPU s/step |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    small = SMALL[:1] if args.quick else SMALL
    rows = [
        (name, fields, attention) for name, fields in small for attention in ("full", "factorised")
    ]
    models = [make(fields, attention, (2, 4)) for _, fields, attention in rows]
    results = best_times([train_step(model) for model in models], batch(32), args.reps)
    for (name, _, attention), model, (sec, cpu) in zip(rows, models, results, strict=True):
        print(
            f"| {name} | {attention} | (2, 4, 4) | {tokens((2, 4))} | {params(model):.1f} "
            f"| {1 / sec:.2f} | {cpu:.2f} |"
        )
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
