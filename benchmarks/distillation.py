"""Distilled few-step students against their teacher: Fréchet distance (FID Inception) and
prompt retrieval on the emoji held-out prompts, students at 1/2/4 steps, the teacher at 8/16/32.

    destatic train configs/emoji_reflow.toml    # the LCM student is bundled (emoji_lcm)
    python benchmarks/distillation.py                      # every held-out prompt
    python benchmarks/distillation.py --n 16 --quick       # a smoke run (numbers meaningless)

Every row draws one image per held-out prompt with seeds ``seed + i`` (the same initial noise
for every model) and is scored by :func:`destatic.metrics.sweep.evaluate`, the code behind
``destatic eval``: FID and KID against the held-out images, top-1/top-5 retrieval of each
image's prompt among all held-out prompts by the bundled evaluator. The students have guidance
folded in: they run one network pass per step at the given scale w; the teacher runs
classifier-free guidance at w, two passes per step (batched), shown as "passes / image".

The goal of issue 7: a student at 4 steps within 15% of the teacher's best Fréchet distance.
FID is biased upwards at small n, so compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch

import destatic
from destatic.bundled import resolve
from destatic.metrics.sweep import Result, Setting, evaluate, reference_set

THREADS = 2


def _steps(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def rows_for(
    name: str,
    pipe,
    steps: list[int],
    sampler: str | None,
    guidance: float,
    reference,
    common,
    grid: str | None = None,
) -> tuple[Result, list[tuple[str, Result, int]]]:
    """(the real-data row, (model name, result, network passes per image) per step count)."""
    chosen = sampler or pipe.defaults.get("sampler", "dpmpp_2m")
    settings = [Setting(chosen, k, guidance, grid) for k in steps]
    real, results = evaluate(pipe, settings, reference, **common)
    branches = 1 if pipe.guidance_embedded or guidance == 1 else 2
    return real, [(name, r, r.nfe * branches) for r in results]


def table(real: Result, rows: list[tuple[str, Result, int]], best: float | None) -> str:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    def num(v: float | None, fmt: str = "{:.2f}") -> str:
        return "–" if v is None else fmt.format(v)

    head = "| model | sampler | steps | passes / image | FID | FID / teacher's best | KID ×10³ |"
    head += " top-1 % | top-5 % | s / image |"
    lines = [head, "|" + "---|" * 10]
    lines.append(
        f"| real held-out images (n = {real.n}) | – | – | – | {num(real.fid)} | – | "
        f"{num(real.kid and 1e3 * real.kid)} | {pct(real.top1)} | {pct(real.top5)} | – |"
    )
    for name, r, passes in rows:
        assert r.setting is not None
        ratio = None if best is None or r.fid is None else r.fid / best
        lines.append(
            f"| {name} | {r.setting.sampler} | {r.setting.steps} | {passes} | {num(r.fid)} | "
            f"{num(ratio)} | {num(r.kid and 1e3 * r.kid)} | {pct(r.top1)} | {pct(r.top5)} | "
            f"{r.seconds / r.n:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=None, help="teacher folder (default: bundled model)")
    p.add_argument("--lcm", default="emoji_lcm", help="LCM student ('' = skip; default: bundled)")
    p.add_argument("--reflow", default="runs/emoji_reflow/model", help="reflow student ('' = skip)")
    p.add_argument("--student-steps", default="1,2,4")
    p.add_argument("--teacher-steps", default="8,16,32")
    p.add_argument("--teacher-sampler", default="dpmpp_2m")
    p.add_argument("--teacher-grid", default=None, help="teacher's σ grid (default: its own)")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale (folded in: w)")
    p.add_argument("--metrics", default="fid,kid,retrieval")
    p.add_argument("--n", type=int, default=0, help="held-out prompts (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="students at 1 step, teacher at 8")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    if args.quick:
        args.student_steps, args.teacher_steps = "1", "8"

    from destatic.metrics.evaluator import load_evaluator
    from destatic.metrics.inception import InceptionFeatures

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    teacher = destatic.load(args.teacher)
    reference = reference_set("emoji", teacher.default_size, n=args.n, seed=args.seed)
    common = dict(
        evaluator=load_evaluator() if {"retrieval", "clip"} & set(metrics) else None,
        inception=InceptionFeatures() if {"fid", "kid", "pr"} & set(metrics) else None,
        metrics=metrics,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=True,
    )
    real, rows = rows_for(
        "teacher",
        teacher,
        _steps(args.teacher_steps),
        args.teacher_sampler,
        args.guidance,
        reference,
        common,
        args.teacher_grid,
    )
    for name, folder in (("LCM student", args.lcm), ("reflow student", args.reflow)):
        if not folder:
            continue
        if not resolve(folder).is_dir():
            print(f"skipping {name}: {folder} does not exist (train it first)", file=sys.stderr)
            continue
        student = destatic.load(folder)
        steps = _steps(args.student_steps)
        rows += rows_for(name, student, steps, None, args.guidance, reference, common)[1]
    fids = [r.fid for name, r, _ in rows if name == "teacher" and r.fid is not None]
    best = min(fids) if fids else None
    print()
    print(f"emoji held-out, n = {real.n}, guidance {args.guidance:g}, seed {args.seed}")
    print()
    print(table(real, rows, best))
    if real.n < 100:
        print(f"\n(n = {real.n}: Fréchet distances so few images are noisy: use all prompts)")
    if best is not None:
        print()
        for name, r, _ in rows:
            if name != "teacher" and r.setting is not None and r.setting.steps == 4:
                ok = r.fid is not None and r.fid <= 1.15 * best
                verdict = "meets" if ok else "misses"
                print(f"{name} at 4 steps: FID {r.fid:.2f} vs teacher's best {best:.2f}: "
                      f"{verdict} the 15% goal")  # fmt: skip
    if args.json is not None:
        out = [{"model": name, "passes": passes, **r.to_dict()} for name, r, passes in rows]
        args.json.write_text(json.dumps({"real": real.to_dict(), "rows": out}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
