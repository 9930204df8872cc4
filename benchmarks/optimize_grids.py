"""Reproduce the optimised grids ``lab2d`` and ``lab16d`` of destatic.sampling.grids.OPTIMIZED.

    python benchmarks/optimize_grids.py            # about 10 minutes on a 2-core CPU

For each lab problem (8-mode Gaussian mixture in 2-D and 16-D, SD 1.x schedule) it optimises an
8-step grid for ``uni_pc_3`` on 4096 training noises (seed 1234, disjoint from the lab's
evaluation noise, seed 1) with destatic.sampling.optimize.optimize_sigmas, then reports the
RMS error on the lab's evaluation noise beside karras and the published AYS grid.
"""

from __future__ import annotations

import argparse
import time

import torch

from destatic.lab import GaussianMixture, LabProblem, reference_solution
from destatic.process import VPDiscrete
from destatic.sampling import SAMPLER_INFO
from destatic.sampling.optimize import optimize_sigmas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler", default="uni_pc_3")
    parser.add_argument("--nfe", type=int, default=8)
    parser.add_argument("--train", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    process = VPDiscrete()
    steps = SAMPLER_INFO[args.sampler].steps_for(args.nfe)
    for dim in (2, 16):
        start = time.time()
        mixture = GaussianMixture.standard(dim)
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(args.train, dim, generator=gen, dtype=torch.float64) * process.sigma_max
        reference = reference_solution(mixture, x, process.sigma_max)
        grid, train_rms = optimize_sigmas(
            args.sampler, [(mixture, x, reference)], steps, process.sigma_min, process.sigma_max
        )
        problem = LabProblem(dim)
        held_out = problem.evaluate(args.sampler, grid, args.nfe).rms
        print(f"dim {dim}: grid {[round(v, 4) for v in grid.tolist()[:-1]]}")
        took = time.time() - start
        print(f"  train RMS {train_rms:.3e}, held-out RMS {held_out:.3e} ({took:.0f} s)")
        for name in ("karras", "ays"):
            print(f"  {name}: held-out RMS {problem.row(args.sampler, args.nfe, name).rms:.3e}")


if __name__ == "__main__":
    main()
