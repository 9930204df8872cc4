"""Many processes, one run: torch.distributed set up from the variables torchrun exports.

``torchrun --nproc_per_node N -m destatic.cli train cfg.toml`` (one machine) or with
``--nnodes M --node_rank R --rdzv_endpoint HOST:PORT`` (many) starts N·M copies; each reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``, joins the process group (NCCL on GPUs, gloo on CPU)
and trains on its slice of every global batch. Rank 0 alone writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "init_world"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over processes (every process gets it)."""
        if self.size == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.size

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_world(device: torch.device) -> World:
    """Join the process group torchrun describes; a single process when there is none."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return World(rank=rank, local_rank=local_rank, size=size)
