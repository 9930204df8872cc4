"""A training step alone and beside one busy program: thread oversubscription on the CPU.

    python benchmarks/oversubscription.py bf16 compile      # or: fp32 eager
    OMP_WAIT_POLICY=PASSIVE python benchmarks/oversubscription.py fp32 eager

The training step of configs/emoji.toml (2 torch threads, batch 64), median of 6 steps alone,
6 beside a single-threaded busy loop (``python -c "while True: pass"``), and 6 alone again.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch

from destatic.pipelines.devices import cpu_description
from destatic.training import load_config
from destatic.training.distributed import World
from destatic.training.tasks import make_task
from destatic.training.trainer import _Run


def main() -> None:
    precision = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    mode = sys.argv[2] if len(sys.argv) > 2 else "compile"
    torch.set_num_threads(2)
    overrides = {"train.progress": False, "train.tensorboard": False}
    overrides |= {"train.precision": precision, "train.compile": mode == "compile"}
    cfg = load_config("configs/emoji.toml", overrides)
    cfg.output.dir = "/tmp/destatic-bench-oversubscription"
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    run = _Run(cfg, World(), cpu, make_task(cfg, cpu, progress=False))
    for _ in range(3):
        run.train_step()

    def median_step(n: int = 6) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            run.train_step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    quiet = median_step()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(1)
    loaded = median_step()
    busy.kill()
    again = median_step()
    wait = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"{cpu_description()}, torch {torch.__version__}")
    print(f"{precision} {mode}, OMP_WAIT_POLICY={wait}")
    print(f"alone {quiet:.3f} / {again:.3f} s/step; beside a busy thread {loaded:.3f} s/step "
          f"({loaded / min(quiet, again):.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
