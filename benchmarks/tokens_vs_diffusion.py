"""Diffusion against the autoregressive alternative on the same data and training compute: the
bundled diffusion model (and its LCM student), the token models (next-token AR by sampling and
by beam search, MaskGIT's parallel decoding) and the hybrid (AR for the layout, a few diffusion
steps for detail), scored on the emoji held-out prompts.

    destatic train configs/emoji_tokenizer.toml && destatic train configs/emoji_ar.toml
    destatic train configs/emoji_maskgit.toml
    python benchmarks/tokens_vs_diffusion.py --json benchmarks/results/tokens_vs_diffusion.json \
        --plot docs/tokens_vs_diffusion.png
    python benchmarks/tokens_vs_diffusion.py --n 16 --quick     # a smoke run (numbers meaningless)
    python benchmarks/tokens_vs_diffusion.py --replot benchmarks/results/tokens_vs_diffusion.json \
        --plot docs/tokens_vs_diffusion.png                     # redraw the plot only

Every row draws one image per held-out prompt with seeds ``seed + i`` and is scored by
:func:`destatic.metrics.sweep.evaluate`, the code behind ``destatic eval``: FID and KID against
the held-out images (the first row: as many *train* images, FID's floor at this n), top-1 /
top-5 retrieval of each image's prompt among all held-out prompts by the bundled evaluator,
"unseen tone": held-out emoji in a skin tone their concept was never trained in, right when the
evaluator picks the asked tone among the five, and the network GFLOP and seconds per image
(text encoder, every network pass and the decoder; ``torch.utils.flop_counter``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch

import destatic
from destatic.bundled import resolve
from destatic.data.select import load_split
from destatic.metrics.sweep import Result, Setting, evaluate, reference_set, score_images
from destatic.metrics.tokenizer import round_trip, tokenizer_report
from destatic.pipelines.devices import cpu_description

THREADS = int(os.environ.get("DESTATIC_THREADS", "2"))
ROUND_TRIP = "encode → decode"  # the decoding column of the tokenizer's round trip


def diffusion_rows(args) -> list[tuple[str, str, Setting]]:
    """(row name, model, setting) of the diffusion side."""
    w = args.guidance
    rows = [("diffusion (bundled emoji)", "emoji", Setting("dpmpp_2m", k, w)) for k in (8, 20)]
    rows.append(("LCM student (emoji_lcm)", "emoji_lcm", Setting("lcm", 4, w)))
    return rows[1:] if args.quick else rows


def token_rows(args, ar: str, maskgit: str) -> list[tuple[str, str, Setting]]:
    """(row name, model, setting) of the token side; a model that is not there is skipped."""
    rows: list[tuple[str, str, Setting]] = []
    if resolve(ar).is_dir():
        n, w = (destatic.load(ar).sampling_defaults[k] for k in ("steps", "guidance"))
        w = w if args.ar_guidance is None else args.ar_guidance
        rows += [
            ("AR, sampling", ar, Setting("autoregressive", n, w, None, (("temperature", 1.0),))),
            ("AR, top-k 64", ar, Setting("autoregressive", n, w, None, (("top_k", 64),))),
            ("AR, beam search 4", ar, Setting("beam", n, w, None, (("beams", 4),))),
        ]
        if not args.quick:
            rows.append(
                ("AR, greedy", ar, Setting("autoregressive", n, w, None, (("temperature", 0.0),)))
            )
    else:
        print(f"skipping AR rows: {ar} does not exist (train it first)", file=sys.stderr)
    if resolve(maskgit).is_dir():
        w = destatic.load(maskgit).sampling_defaults["guidance"]
        w = w if args.ar_guidance is None else args.ar_guidance
        rows += [
            ("MaskGIT", maskgit, Setting("maskgit", k, w))
            for k in (8,) + (() if args.quick else (16,))
        ]
    else:
        print(f"skipping MaskGIT rows: {maskgit} does not exist (train it first)", file=sys.stderr)
    return rows


def hybrid(ar: str, refiner: str, strength: float, steps: int):
    """The AR model whose decoded images a diffusion model redraws image → image at
    ``strength`` (AR for the layout, diffusion for the detail)."""
    pipe = destatic.load(ar)
    refine = {"strength": strength, "steps": steps, "sampler": "dpmpp_2m", "guidance": 3.0}
    return dataclasses.replace(pipe, refiner=destatic.load(refiner), refine=refine)


def tokenizer_figures(tokenizer, heldout) -> dict[str, dict[str, float]]:
    """PSNR, codebook usage and code perplexity of the tokenizer on the held-out images and on
    the train split (:func:`destatic.metrics.tokenizer.tokenizer_report`)."""
    train = load_split("emoji", 32, "train").images
    return {
        "heldout": tokenizer_report(tokenizer, heldout),
        "train": tokenizer_report(tokenizer, train),
    }


def table(real: Result, rows: list[tuple[str, Result]]) -> str:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    def num(v: float | None, fmt: str = "{:.1f}") -> str:
        return "–" if v is None else fmt.format(v)

    head = "| model | decoding | FID | KID ×10³ | top-1 % | top-5 % | unseen tone % |"
    head += " GFLOP / image | s / image |"
    lines = [head, "|" + "---|" * 9]
    lines.append(
        f"| real (train vs held-out FID; held-out retrieval), n = {real.n} | – | {num(real.fid)} |"
        f" {num(real.kid and 1e3 * real.kid, '{:.2f}')} | {pct(real.top1)} | {pct(real.top5)} |"
        f" {pct(real.composition)} | – | – |"
    )
    for name, r in rows:
        label = r.setting.label if r.setting else ROUND_TRIP
        flops = None if r.flops is None else r.flops / 1e9
        seconds = f"{r.seconds / r.n:.3f}" if r.setting else "–"
        lines.append(
            f"| {name} | {label} | {num(r.fid)} | "
            f"{num(r.kid and 1e3 * r.kid, '{:.2f}')} | {pct(r.top1)} | {pct(r.top5)} | "
            f"{pct(r.composition)} | {num(flops, '{:.2f}')} | {seconds} |"
        )
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    """FID and top-1 against GFLOP per image, one marker per row, from the JSON payload
    (``--json`` writes it; ``--replot`` redraws a saved one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    real = payload["real"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 6.2))
    for ax, (field, title, scale) in zip(
        axes, (("fid", "FID (lower is better)", 1), ("top1", "prompt top-1 %", 100)), strict=True
    ):
        for row in payload["rows"]:
            name, y, flops = row["model"], row[field], row["flops"]
            if y is not None and row["setting"] is None:  # the tokenizer's round trip
                ax.axhline(scale * y, color="grey", ls=":", lw=1, label=name)
            if y is None or flops is None:
                continue
            diffusion = "diffusion" in name or "LCM" in name
            marker = "o" if diffusion else ("s" if "hybrid" in name else "^")
            ax.scatter(flops / 1e9, scale * y, marker=marker, label=f"{name} ({row['label']})")
        if real[field] is not None:
            ax.axhline(scale * real[field], color="k", ls="--", lw=1, label="real images")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("GFLOP per image")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.suptitle("emoji held-out: quality against compute per image", fontsize=11)
    fig.tight_layout(rect=(0, 0.27, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ar", default="emoji_ar", help="the AR token model (bundled name or folder)")
    p.add_argument("--maskgit", default="runs/emoji_maskgit/model", help="the MaskGIT model")
    p.add_argument("--refiner", default="emoji", help="the hybrid's diffusion model ('' = none)")
    p.add_argument("--refine-strength", type=float, default=0.5)
    p.add_argument("--refine-steps", type=int, default=8, help="grid steps (runs strength × it)")
    p.add_argument("--guidance", type=float, default=3.0, help="diffusion CFG scale")
    p.add_argument("--ar-guidance", type=float, default=None, help="token CFG (default: model's)")
    p.add_argument("--metrics", default="fid,kid,retrieval")
    p.add_argument("--n", type=int, default=0, help="held-out prompts (0 = all 376)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="fewer rows")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--plot", type=Path, default=None, help="quality against GFLOP per image")
    p.add_argument("--replot", type=Path, default=None, help="only redraw --plot from this JSON")
    args = p.parse_args()
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.plot or Path("tokens_vs_diffusion.png"))
        return
    torch.set_num_threads(THREADS)

    from destatic.metrics.evaluator import load_evaluator
    from destatic.metrics.inception import InceptionFeatures

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    reference = reference_set("emoji", 32, n=args.n, seed=args.seed)
    common = dict(
        evaluator=load_evaluator() if {"retrieval", "clip"} & set(metrics) else None,
        inception=InceptionFeatures() if {"fid", "kid", "pr"} & set(metrics) else None,
        metrics=metrics,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=True,
        flops=True,
    )
    plan = [*diffusion_rows(args), *token_rows(args, args.ar, args.maskgit)]
    rows: list[tuple[str, Result]] = []
    real = None
    loaded: dict[str, object] = {}
    for name, model, setting in plan:
        if model not in loaded:
            loaded[model] = destatic.load(model)
        pipe = loaded[model]
        real, results = evaluate(pipe, [setting], reference, **common)
        rows.append((name, results[0]))
    if args.refiner and resolve(args.ar).is_dir():
        pipe = hybrid(args.ar, args.refiner, args.refine_strength, args.refine_steps)
        n = pipe.sampling_defaults["steps"]
        w = pipe.sampling_defaults["guidance"] if args.ar_guidance is None else args.ar_guidance
        s = Setting("autoregressive", n, w, None, (("top_k", 64),))
        real, results = evaluate(pipe, [s], reference, **common)
        name = f"hybrid: AR + {args.refiner} at strength {args.refine_strength:g}"
        rows.append((f"{name}, {args.refine_steps} steps", results[0]))
    tokenizer = None
    if resolve(args.ar).is_dir():
        tokenizer = (loaded.get(args.ar) or destatic.load(args.ar)).tokenizer
        scored = score_images(
            round_trip(tokenizer, reference.images, args.batch_size)[0],
            reference,
            evaluator=common["evaluator"],
            inception=common["inception"],
            metrics=metrics,
        )
        rows.append(("tokenizer round trip (the token models' ceiling)", scored))
    assert real is not None
    print()
    cpu = cpu_description()
    print(f"emoji held-out, n = {real.n}, seed {args.seed}; {cpu}, {THREADS} threads")
    print()
    print(table(real, rows))
    out = [
        {"model": name, **r.to_dict(), **({} if r.setting else {"label": ROUND_TRIP})}
        for name, r in rows
    ]
    payload = {"cpu": cpu, "real": real.to_dict(), "rows": out}
    if tokenizer is not None:
        payload["tokenizer"] = tokenizer_figures(tokenizer, reference.images)
        print(f"tokenizer: {payload['tokenizer']}")
    if args.json is not None:
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot(payload, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
