"""Many processes, one run: torch.distributed set up from the variables torchrun exports.

``torchrun --nproc_per_node N -m destatic.cli train cfg.toml`` (one machine) or with
``--nnodes M --node_rank R --rdzv_endpoint HOST:PORT`` (many) starts N·M copies; each reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``, joins the process group (NCCL on GPUs, gloo on CPU)
and trains on its slice of every global batch. Rank 0 alone writes files.

How the processes share the model (``[train] parallel``):

* ``"ddp"``: every process holds the whole model, optimizer state and EMA; DDP all-reduces the
  gradients (their mean over processes).
* ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, "PyTorch FSDP")
  splits every parameter, its gradient, its AdamW moments and its EMA along dim 0 over the
  processes. Each block (an item of a ``*blocks`` module list: U-Net down/up blocks,
  transformer blocks) is gathered whole just before its forward/backward and freed after; the
  gradients are reduce-scattered, so process ``r`` holds the mean gradient of its shard only.
  The update is the same as with DDP; memory per process falls to about ``1/N`` of the
  weights, gradients and moments plus one gathered block.

Checkpoints hold whole tensors either way (gathered onto rank 0 with
:func:`full_model_state` / :func:`full_optimizer_state`), so a run resumes under the other
mode or in one process.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from destatic.models.speedups import blocks

__all__ = [
    "World",
    "full_model_state",
    "full_optimizer_state",
    "init_world",
    "load_full_model_state",
    "local",
    "meta_copy",
    "no_sync",
    "parallelize",
    "shard",
    "shard_optimizer_state",
    "whole_module",
]


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

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds in every process (every process gets the answer)."""
        if self.size == 1:
            return flag
        value = torch.tensor(int(flag))
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value)

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


# -- wrapping ----------------------------------------------------------------------------------
def parallelize(model: nn.Module, world: World, device: torch.device, parallel: str) -> nn.Module:
    """The module the loss runs through: ``model`` itself in one process, a DDP wrapper of it
    (``parallel = "ddp"``), or ``model`` sharded in place (``"fsdp"``, see :func:`shard`)."""
    if world.size == 1:
        return model
    if parallel == "fsdp":
        shard(model, world, device)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard(model: nn.Module, world: World, device: torch.device) -> None:
    """FSDP2 in place: each block of :func:`~destatic.models.speedups.blocks`, then ``model``
    itself (the parameters outside blocks), over a 1-D mesh of all processes. Parameters become
    DTensors sharded along dim 0; the same call on a copy of ``model`` (the EMA) shards it the
    same way."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


@contextlib.contextmanager
def no_sync(trained: nn.Module) -> Iterator[None]:
    """Backward passes inside accumulate local gradients without communication (DDP's
    ``no_sync``; FSDP2's ``set_requires_gradient_sync(False)``); a plain module is unchanged."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(trained, FSDPModule):
        trained.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            trained.set_requires_gradient_sync(True)
    elif hasattr(trained, "no_sync"):
        with trained.no_sync():
            yield
    else:
        yield


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (its shard of a DTensor; a plain tensor as is)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# -- whole state from shards, shards from whole state --------------------------------------------
def _options(**kwargs: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every shard gathered whole onto rank 0's CPU (collective:
    call in every process; the others get ``{}``)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_full_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors (the same in every process) into sharded ``module``: each process
    keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options())


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` (parameters numbered, as one process writes it) with every
    sharded moment gathered whole onto rank 0's CPU (collective; the others get ``{}``).

    Not ``get_optimizer_state_dict``: it keys the state by parameter name and first takes a
    zero-lr step when the optimizer has none yet, which would start AdamW's step count at 1.
    """
    from torch.distributed.tensor import DTensor

    saved = optimizer.state_dict()
    main = dist.get_rank() == 0
    state: dict[int, dict[str, Any]] = {}
    for index, entry in saved["state"].items():
        whole = {
            k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in entry.items()
        }
        if main:
            state[index] = whole
    return {"state": state, "param_groups": saved["param_groups"]} if main else {}


def shard_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict:
    """A whole ``optimizer.state_dict()`` (:func:`full_optimizer_state`'s form, the same in
    every process) with each moment cut like its parameter, for ``optimizer.load_state_dict``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]

    def cut(value: Any, param: torch.Tensor) -> Any:
        if isinstance(param, DTensor) and isinstance(value, torch.Tensor):
            if value.shape == param.shape and value.dim() > 0:
                value = value.to(param.device)
                return distribute_tensor(
                    value, param.device_mesh, param.placements, src_data_rank=None
                )
        return value

    state = {
        index: {k: cut(v, params[index]) for k, v in entry.items()}
        for index, entry in saved["state"].items()
    }
    return {"state": state, "param_groups": saved["param_groups"]}


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are on the meta device (no memory) and whose
    buffers are real: the frame :func:`whole_module` fills with gathered weights."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    return copy.deepcopy(module, memo)


def whole_module(
    frame: nn.Module, state: dict[str, torch.Tensor], device: torch.device
) -> nn.Module:
    """A plain module: a copy of :func:`meta_copy`'s ``frame`` holding ``state`` on ``device``."""
    module = copy.deepcopy(frame)
    module.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    return module
