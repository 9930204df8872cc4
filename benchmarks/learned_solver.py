"""A bespoke non-stationary solver (BNS, Shaul et al. 2024) fitted to the 16-D lab problem at 8 NFE.

    python benchmarks/learned_solver.py      # a few minutes on one core; writes
                                             # benchmarks/results/learned_solver.md

It starts from ``uni_pc_3`` on the ``lab16d`` grid (the best row of the sampler table at 8 NFE),
reads its coefficients off as a :class:`destatic.sampling.learned.BespokeSolver` and fits them
with :func:`~destatic.sampling.learned.fit_bespoke` on training noise (seed 1234, the seed of
benchmarks/optimize_grids.py, disjoint from the lab's evaluation noise, seed 1). It then reports
the RMS to the exact ODE solution on the training noise, on the sampler table's held-out noise,
and on problems it was not fitted on: a 16-D mixture with other random means and the 2-D one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from destatic.lab import LabProblem, reference_trajectory, rms
from destatic.sampling import make_sigmas
from destatic.sampling.learned import BespokeSolver, fit_bespoke

BEST_PEER = 1.04e-1  # diffusers UniPC (default) at 8 NFE in 16-D, BENCHMARKS.md
FLIP = 0.25  # per-sample error that means another mixture component (benchmarks/samplers.py)


def errors(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, int, float]:
    """(RMS, samples that flipped to another component, median per-sample error)."""
    per_sample = ((out - reference) ** 2).mean(1).sqrt()
    return rms(out, reference), int((per_sample > FLIP).sum()), float(per_sample.median())


def check_problems(problem: LabProblem, x_train: torch.Tensor, train_reference: torch.Tensor):
    """(label, lab problem or None, mixture, start at σ_max, reference x(0)) for the training
    noise, the sampler table's held-out noise and two problems a fit never saw."""
    yield "16-D, training noise (seed 1234)", None, problem.mixture, x_train, train_reference
    for label, lab in [
        ("**16-D, held-out benchmark noise**", problem),
        ("16-D, other means (mixture seed 7), not fitted", LabProblem(16, seed=7)),
        ("2-D (8 on a circle), not fitted", LabProblem(2)),
    ]:
        yield label, lab, lab.mixture, lab.start(lab.process.sigma_max), lab.reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="uni_pc_3")
    parser.add_argument("--grid", default="lab16d")
    parser.add_argument("--nfe", type=int, default=8)
    parser.add_argument("--train", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/results/learned_solver.md")
    args = parser.parse_args()
    torch.set_num_threads(1)

    problem = LabProblem(16)  # its noise (seed 1) is the sampler table's: held out here
    sigmas = make_sigmas(args.grid, args.nfe, process=problem.process)
    start = BespokeSolver.from_sampler(args.init, sigmas)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(args.train, 16, generator=gen, dtype=torch.float64) * float(sigmas[0])
    began = time.time()
    targets = reference_trajectory(problem.mixture, x, sigmas)
    reference_seconds = time.time() - began
    began = time.time()
    solver, history = fit_bespoke(
        start,
        [(problem.mixture, x, targets)],
        rounds=args.rounds,
        iterations=args.iterations,
        progress=lambda r, e: print(f"round {r + 1}: training RMS {e:.3e}", flush=True),
    )
    fit_seconds = time.time() - began

    rows = []
    for label, _, mixture, x0, reference in check_problems(problem, x, targets[-1]):
        base = errors(start.sample(mixture, x0), reference)
        fitted = errors(solver.sample(mixture, x0), reference)
        rows.append((label, base, fitted))

    held_out = rows[1][2][0]
    lines = [
        f"# Bespoke solver: {args.init} ({args.grid}) fitted, {args.nfe} NFE",
        "",
        "`python benchmarks/learned_solver.py"
        + (f" --train {args.train}" if args.train != 4096 else "")
        + "` (torch.set_num_threads(1)). Fitted on "
        f"{args.train} training noises of the 16-D lab problem (seed 1234); reference "
        f"trajectories {reference_seconds:.0f} s, fit {fit_seconds:.0f} s "
        f"({args.rounds} L-BFGS rounds of ≤ {args.iterations} iterations). RMS to the exact ODE "
        "solution; flips: samples ending > 0.25 from their reference (another component); "
        "median: the median sample's error.",
        "",
        f"| problem | {args.init} ({args.grid}) RMS | flips | median | bespoke RMS | flips | "
        "median | bespoke / start |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, (b_rms, b_flips, b_med), (f_rms, f_flips, f_med) in rows:
        lines.append(
            f"| {label} | {b_rms:.3e} | {b_flips} | {b_med:.2e} | {f_rms:.3e} | {f_flips} | "
            f"{f_med:.2e} | {f_rms / b_rms:.2f} |"
        )
    lines += [
        "",
        f"Held-out 16-D: bespoke {held_out:.3e} against the best peer's {BEST_PEER:.2e} "
        f"(ours/peer {held_out / BEST_PEER:.2f}; the goal is ≤ 0.5, i.e. ≤ {BEST_PEER / 2:.2e}: "
        f"{'met' if held_out <= BEST_PEER / 2 else 'not met'}).",
        "",
        "Training RMS of the final state after each round (0 = start): "
        + ", ".join(f"{e:.3e}" for e in history),
        "",
        "The fitted solver (`BespokeSolver.from_dict(json.loads(...))`, or save it to a file and "
        "`BespokeSolver.load`):",
        "",
        "```json",
        json.dumps(solver.to_dict()),
        "```",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
