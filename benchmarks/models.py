"""Model speed on CPU: destatic's U-Net, MMDiT and VAE decoder against diffusers' on the same
config, the same weights and the same inputs (fp32, 2 threads).

    python benchmarks/models.py            # the full run (about 6-8 minutes on 2 vCPUs)
    python benchmarks/models.py --quick    # smoke run: fewer repeats, no torch.compile

Each diffusers model is built first; its ``state_dict`` is loaded into ours with
``strict=True`` through ``*Config.from_diffusers(dict(model.config))``. Weights are the
diffusers init plus seeded noise (so that zero-initialised output layers do not make every
output zero). Latency is the median over timed calls after warm-ups, ours and diffusers'
interleaved call by call so that load from other processes hits both alike. The training step
is forward + MSE + backward + AdamW step at batch 16. GFLOP are counted with
``torch.utils.flop_counter.FlopCounterMode``; MFU is achieved GFLOP/s over a measured fp32
2048² matmul peak on the same threads. ``torch.compile`` runs in a child process with a
time limit (compiling with inductor on 2 vCPUs can take minutes).

Speed-up rows (``destatic.models.speedups``): fused attention projections in eager mode for
both libraries (ours ``fuse_projections``, diffusers' own ``fuse_qkv_projections()``); in the
child process, interleaved call by call, diffusers eager, our eager, our plain
``torch.compile``, our fastest setting ``optimize(model, **FASTEST)`` and diffusers with the
same levers (fused + compile + inductor freezing), so "ours fastest" is compared with both
diffusers' default and diffusers' best; and the training step with fused projections.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from destatic.models.speedups import fuse_projections

THREADS = 2
COMPILE_LIMIT_S = 180  # per compile; inductor on 2 busy vCPUs takes 5-100 s
# Our fastest safe setting: destatic.models.optimize(model, **FASTEST).
FASTEST: dict[str, Any] = dict(fuse=True, compile=True, freeze=True)
RESULTS = Path(__file__).parent / "results" / "models.md"

UNET_CFG: dict[str, Any] = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=384,
    attention_head_dim=8,
    norm_num_groups=32,
)
MMDIT_CFG: dict[str, Any] = dict(
    sample_size=32,
    patch_size=2,
    in_channels=4,
    num_layers=12,
    attention_head_dim=64,
    num_attention_heads=6,
    joint_attention_dim=384,
    caption_projection_dim=384,
    pooled_projection_dim=384,
    out_channels=4,
    pos_embed_max_size=32,
)
VAE_CFG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(64, 128, 256, 256),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)
TOKENS, CTX_DIM, LATENT = 77, 384, 32


# ----------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def build(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, diffusers') with identical weights, both in eval mode."""
    torch.manual_seed(0)
    if kind == "unet":
        from diffusers import UNet2DConditionModel

        from destatic.models.unet import UNet2DCondition, UNetConfig

        theirs = UNet2DConditionModel(**UNET_CFG)
        _perturb(theirs, 1)
        ours = UNet2DCondition(UNetConfig.from_diffusers(dict(theirs.config)))
    elif kind == "mmdit":
        from diffusers import SD3Transformer2DModel

        from destatic.models.mmdit import MMDiT, MMDiTConfig

        theirs = SD3Transformer2DModel(**MMDIT_CFG)
        _perturb(theirs, 2)
        ours = MMDiT(MMDiTConfig.from_diffusers(dict(theirs.config)))
    elif kind == "vae":
        from diffusers import AutoencoderKL as DAutoencoderKL

        from destatic.models.autoencoder import AutoencoderConfig, AutoencoderKL

        theirs = DAutoencoderKL(**VAE_CFG)
        _perturb(theirs, 3)
        ours = AutoencoderKL(AutoencoderConfig.from_diffusers(dict(theirs.config)))
    else:
        raise ValueError(kind)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def inputs(kind: str, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + batch)
    x = torch.randn(batch, 4, LATENT, LATENT, generator=g)
    if kind == "vae":
        return {"z": x}
    ctx = torch.randn(batch, TOKENS, CTX_DIM, generator=g)
    if kind == "unet":
        return {"x": x, "t": torch.rand(batch, generator=g) * 999, "ctx": ctx}
    pooled = torch.randn(batch, CTX_DIM, generator=g)
    return {"x": x, "t": torch.rand(batch, generator=g) * 1000, "ctx": ctx, "pooled": pooled}


def caller(kind: str, model: torch.nn.Module, ours: bool) -> Callable[..., torch.Tensor]:
    """A uniform ``f(**inputs) -> output tensor`` for either side."""
    if kind == "unet":
        if ours:
            return lambda x, t, ctx: model(x, t, ctx)
        return lambda x, t, ctx: model(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
    if kind == "mmdit":
        if ours:
            return lambda x, t, ctx, pooled: model(x, t, ctx, pooled)
        return lambda x, t, ctx, pooled: model(
            hidden_states=x,
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
            timestep=t,
            return_dict=False,
        )[0]
    if ours:
        return lambda z: model.decode(z)
    return lambda z: model.decode(z, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def matmul_peak(
    reps: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> float:
    """GFLOP/s of a square matmul in ``dtype`` on ``device`` (CPU: 2048² on the current threads;
    CUDA: 8192²), best of ``reps``."""
    device = device or torch.device("cpu")
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = device_sync(device)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before a clock is read (nothing on the CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def interleaved(
    fns: list[Callable[[], Any]], warmup: int, reps: int, sync: Callable[[], None] = lambda: None
) -> list[float]:
    """Median seconds per call of each fn, calling them in turn (round-robin); ``sync`` waits for
    an accelerator's queue before each clock reading."""
    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(reps):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            sync()
            t0 = time.perf_counter()
            fns[i]()
            sync()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def count_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, that over max |b|)."""
    d = (a.float() - b.float()).abs().max().item()
    return d, d / max(b.abs().max().item(), 1e-30)


def train_step_fn(kind: str, model: torch.nn.Module, ours: bool, batch: int) -> Callable[[], None]:
    model = copy.deepcopy(model).train()
    f = caller(kind, model, ours)
    inp = inputs(kind, batch, seed=7)
    target = torch.randn_like(inp["x"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(f(**inp), target)
        loss.backward()
        opt.step()

    return step


# ----------------------------------------------------------------------------------------------
# torch.compile, in a child process with a time limit
# ----------------------------------------------------------------------------------------------


def theirs_fused(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a diffusers model with its own ``fuse_qkv_projections()`` applied."""
    model = copy.deepcopy(model)
    model.fuse_qkv_projections()
    return model


def compile_worker(kind: str, batches: list[int], warmup: int, reps: int) -> dict[str, Any]:
    """In one process, interleaved: diffusers eager, our eager, our plain torch.compile, our
    fastest setting (``optimize(fuse, compile, freeze)``) and diffusers with the same levers
    (its ``fuse_qkv_projections()`` + torch.compile with freezing)."""
    from destatic.models.speedups import optimize

    torch.set_num_threads(THREADS)
    ours, theirs = build(kind)
    fns = {
        "d_eager": caller(kind, theirs, False),
        "o_eager": caller(kind, ours, True),
        "o_compile": caller(kind, torch.compile(copy.deepcopy(ours)), True),
        "o_fast": caller(kind, optimize(copy.deepcopy(ours), **FASTEST), True),
        "d_best": caller(
            kind, torch.compile(theirs_fused(theirs), options={"freezing": True}), False
        ),
    }
    out: dict[str, Any] = {"rows": [], "compile_s": {}}
    with torch.no_grad():  # freezing applies only with autograd off
        for b in batches:
            inp = inputs(kind, b)
            for name, f in fns.items():  # first call compiles (again for a new batch size)
                t0 = time.perf_counter()
                f(**inp)
                out["compile_s"].setdefault(name, []).append(time.perf_counter() - t0)
            ref = fns["o_eager"](**inp)
            d_ref = fns["d_eager"](**inp)
            diffs = {
                name: max_diff(f(**inp), d_ref if name.startswith("d_") else ref)
                for name, f in fns.items()
            }
            times = interleaved([partial(f, **inp) for f in fns.values()], warmup, reps)
            out["rows"].append({"batch": b, "t": dict(zip(fns, times, strict=True)), "d": diffs})
    return out


def run_compile(kind: str, batches: list[int], warmup: int, reps: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--compile-worker", kind, "--batches"]
    cmd += [str(b) for b in batches] + ["--warmup", str(warmup), "--reps", str(reps)]
    # The limit covers three compiles per batch size plus the timed calls.
    limit = 3 * COMPILE_LIMIT_S * len(batches) + 5 * (warmup + reps) * sum(batches) * 0.15
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {limit:.0f} s (compile + timing)"}
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"failed: {tail[0][:200]}"}
    data = json.loads(res.stdout.strip().splitlines()[-1])
    slowest = max(max(v) for v in data["compile_s"].values())
    if slowest > COMPILE_LIMIT_S:
        data["error"] = f"a compile took {slowest:.0f} s > {COMPILE_LIMIT_S} s"
    return data


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


SETTING_NAMES = {
    "d_eager": "diffusers eager",
    "o_compile": "torch.compile (ours)",
    "o_fast": "fastest: fused + compile + freezing (ours)",
    "d_best": "diffusers fused + compile + freezing",
}


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--quick", action="store_true", help="fewer repeats; skip torch.compile")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--out", type=Path, default=RESULTS, help="Markdown output file")
    ap.add_argument("--compile-worker", help=argparse.SUPPRESS)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8], help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.compile_worker:
        print(json.dumps(compile_worker(args.compile_worker, args.batches, args.warmup, args.reps)))
        return

    torch.set_num_threads(THREADS)
    warmup, reps = (1, 2) if args.quick else (2, 5)
    train_warmup, train_reps = (1, 1) if args.quick else (1, 4)
    train_batch = 16
    lines: list[str] = []
    start = time.perf_counter()
    load0 = os.getloadavg()

    import diffusers

    cmd = "python benchmarks/models.py" + (" --quick" if args.quick else "")
    lines += [
        "# Model speed: destatic vs diffusers (CPU, fp32)",
        "",
        f"Command: `{cmd}`",
        "",
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{THREADS} threads; warm-up {warmup}, median of {reps} interleaved calls "
        f"(training: {train_warmup} + {train_reps} steps at batch {train_batch}).",
        f"Load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}.",
    ]
    peak = matmul_peak(5 if args.quick else 10)
    lines.append(f"Measured fp32 matmul peak (2048², {THREADS} threads): {peak:.0f} GFLOP/s.")
    print("\n".join(lines), flush=True)

    table = [
        "| model | setting | batch | ours ms | diffusers ms | ratio | max abs Δ vs diffusers "
        "(rel.) | max abs Δ vs our eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    mfu_table = [
        "| model | params | GFLOP/call b1 (ours / diffusers) | MFU b1 ours / diffusers | "
        "MFU b8 ours / diffusers | train b16 samples/s ours / diffusers | MFU train ours / "
        "diffusers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes: list[str] = []

    def row(*cells: Any) -> None:
        table.append("| " + " | ".join(str(c) for c in cells) + " |")
        print(table[-1], flush=True)

    names = {"unet": "UNet (64,128,256)", "mmdit": "MMDiT 12×384", "vae": "VAE decode 32²→256²"}
    for kind in ("unet", "mmdit", "vae"):
        ours, theirs = build(kind)
        f_o, f_t = caller(kind, ours, True), caller(kind, theirs, False)
        batches = [1] if kind == "vae" else [1, 8]
        lat: dict[int, tuple[float, float]] = {}
        with torch.inference_mode():
            for b in batches:
                inp = inputs(kind, b)
                d_abs, d_rel = max_diff(f_o(**inp), f_t(**inp))
                t_o, t_t = interleaved([partial(f_o, **inp), partial(f_t, **inp)], warmup, reps)
                lat[b] = (t_o, t_t)
                row(
                    names[kind], "eager", b, fmt_ms(t_o), fmt_ms(t_t), f"{t_t / t_o:.2f}",
                    f"{d_abs:.2e} ({d_rel:.1e})", "—",
                )  # fmt: skip
            inp1 = inputs(kind, 1)
            gf_o = count_flops(partial(f_o, **inp1))
            gf_t = count_flops(partial(f_t, **inp1))

        if kind == "unet":  # channels_last on both sides, same inputs
            with torch.inference_mode():
                eager_out = {b: f_o(**inputs(kind, b)) for b in batches}
            ours_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
            theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
            fo_cl, ft_cl = caller(kind, ours_cl, True), caller(kind, theirs_cl, False)
            with torch.inference_mode():
                for b in batches:
                    inp = inputs(kind, b)
                    inp["x"] = inp["x"].contiguous(memory_format=torch.channels_last)
                    o_cl = fo_cl(**inp)
                    d_abs, d_rel = max_diff(o_cl, ft_cl(**inp))
                    e_abs, e_rel = max_diff(o_cl, eager_out[b])
                    t_o, t_t = interleaved(
                        [partial(fo_cl, **inp), partial(ft_cl, **inp)], warmup, reps
                    )
                    row(
                        names[kind], "channels_last (both)", b, fmt_ms(t_o), fmt_ms(t_t),
                        f"{t_t / t_o:.2f}", f"{d_abs:.2e} ({d_rel:.1e})",
                        f"{e_abs:.2e} ({e_rel:.1e})",
                    )  # fmt: skip
            del ours_cl, theirs_cl

        if kind != "vae":  # fused projections, eager, each library with its own
            ours_f = fuse_projections(copy.deepcopy(ours))
            fo_f, ft_f = caller(kind, ours_f, True), caller(kind, theirs_fused(theirs), False)
            with torch.inference_mode():
                for b in batches:
                    inp = inputs(kind, b)
                    o_f = fo_f(**inp)
                    d_abs, d_rel = max_diff(o_f, ft_f(**inp))
                    e_abs, e_rel = max_diff(o_f, f_o(**inp))
                    t_o, t_t = interleaved(
                        [partial(fo_f, **inp), partial(ft_f, **inp)], warmup, reps
                    )
                    row(
                        names[kind], "fused projections, eager (both)", b, fmt_ms(t_o),
                        fmt_ms(t_t), f"{t_t / t_o:.2f}", f"{d_abs:.2e} ({d_rel:.1e})",
                        f"{e_abs:.2e} ({e_rel:.1e})",
                    )  # fmt: skip
            del ours_f

        if kind != "vae" and not (args.quick or args.no_compile):
            t0 = time.perf_counter()
            res = run_compile(kind, batches, warmup, reps)
            if "error" in res:
                notes.append(f"{names[kind]}: torch.compile skipped — {res['error']}.")
            else:
                cs = {k: v for k, v in res["compile_s"].items() if not k.endswith("eager")}
                notes.append(
                    f"{names[kind]}: compile rows come from one child process (all five "
                    "variants interleaved call by call, diffusers eager re-measured there; our "
                    "eager in the child: "
                    + " / ".join(f"{fmt_ms(r['t']['o_eager'])} ms" for r in res["rows"])
                    + f" at batch {' / '.join(str(r['batch']) for r in res['rows'])}). "
                    "First-call (compile) seconds per batch size: "
                    + "; ".join(
                        f"{SETTING_NAMES[k]} {' / '.join(f'{s:.0f}' for s in v)}"
                        for k, v in cs.items()
                    )
                    + f"; {time.perf_counter() - t0:.0f} s in all."
                )
                for r in res["rows"]:
                    b, t, d = r["batch"], r["t"], r["d"]
                    for name, base in (
                        ("o_compile", "d_eager"),
                        ("o_fast", "d_eager"),
                        ("o_fast", "d_best"),
                    ):
                        row(
                            names[kind], f"{SETTING_NAMES[name]} vs {SETTING_NAMES[base]}", b,
                            fmt_ms(t[name]), fmt_ms(t[base]), f"{t[base] / t[name]:.2f}",
                            "—" if base != "d_best" else
                            f"{d[base][0]:.2e} ({d[base][1]:.1e}) theirs vs their eager",
                            f"{d[name][0]:.2e} ({d[name][1]:.1e})",
                        )  # fmt: skip

        params = sum(p.numel() for p in ours.parameters()) / 1e6
        if kind == "vae":
            mfu_table.append(
                f"| {names[kind]} | {params:.1f} M | {gf_o:.2f} / {gf_t:.2f} | "
                f"{gf_o / lat[1][0] / peak:.0%} / {gf_t / lat[1][1] / peak:.0%} | — | — | — |"
            )
            continue

        # Training step: forward + MSE + backward + AdamW at batch 16.
        s_o = train_step_fn(kind, ours, True, train_batch)
        s_t = train_step_fn(kind, theirs, False, train_batch)
        s_of = train_step_fn(kind, fuse_projections(copy.deepcopy(ours)), True, train_batch)
        t_o, t_t, t_of = interleaved([s_o, s_t, s_of], train_warmup, train_reps)
        row(
            names[kind], "train step (fwd+MSE+bwd+AdamW)", train_batch, fmt_ms(t_o), fmt_ms(t_t),
            f"{t_t / t_o:.2f}", "—", "—",
        )  # fmt: skip
        row(
            names[kind], "train step, fused projections (ours) vs diffusers eager", train_batch,
            fmt_ms(t_of), fmt_ms(t_t), f"{t_t / t_of:.2f}", "—", "—",
        )  # fmt: skip
        # FLOPs of one training forward+backward (AdamW's elementwise work is not counted).
        m = copy.deepcopy(ours).train()
        fm = caller(kind, m, True)
        tinp = inputs(kind, train_batch, seed=7)

        def fwd_bwd(fm: Callable[..., torch.Tensor] = fm, tinp: dict = tinp) -> None:
            fm(**tinp).square().mean().backward()

        gf_train = count_flops(fwd_bwd)
        del m
        mfu = [gf_o / lat[b][i] / peak for b in batches for i in (0, 1)]
        mfu_table.append(
            f"| {names[kind]} | {params:.1f} M | {gf_o:.2f} / {gf_t:.2f} | "
            f"{mfu[0]:.0%} / {mfu[1]:.0%} | "
            f"{8 * gf_o / lat[8][0] / peak:.0%} / {8 * gf_o / lat[8][1] / peak:.0%} | "
            f"{train_batch / t_o:.2f} / {train_batch / t_t:.2f} | "
            f"{gf_train / t_o / peak:.0%} / {gf_train / t_t / peak:.0%} |"
        )

    load1 = os.getloadavg()
    peak_end = matmul_peak(5 if args.quick else 10)
    footer = [
        "",
        "ratio = diffusers ms / ours ms (> 1: destatic is faster). Relative Δ is max |Δ| over "
        "max |reference output|. MFU = counted GFLOP / measured latency / matmul peak; the "
        "training FLOPs are forward + backward of our model at batch 16.",
        "",
        *[f"- {n}" for n in notes],
        "",
        f"Matmul peak re-measured at the end: {peak_end:.0f} GFLOP/s (MFU above uses the start "
        "value; conv kernels (oneDNN) can beat this matmul rate, so MFU > 100% is possible).",
        "",
        f"Load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; total wall time "
        f"{time.perf_counter() - start:.0f} s.",
    ]
    text = "\n".join([*lines, "", *table, "", *mfu_table, *footer]) + "\n"
    print("\n" + "\n".join(mfu_table + footer), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
