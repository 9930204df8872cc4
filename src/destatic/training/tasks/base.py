"""What a training task is, and the registry of tasks by name.

A task owns its model and data and answers three questions for the loop in
:mod:`destatic.training.trainer`: what a step's global batch is (:meth:`Task.draw`, every random
number drawn up front from one generator, so any split over processes and accumulation steps
sees the same batch), what the per-sample loss of a slice of it is (:meth:`Task.loss`), and how
the trained weights are exported for inference (:meth:`Task.export`).

Each task is one module of this package whose class registers under its ``name``, the value of
``[train] task``. A task with options names their dataclass as its ``section``: the config table
of the same name (``[lcm]``), validated when the config is loaded
(:func:`destatic.training.load_config`) and read as ``cfg.lcm``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from destatic.training.config import Config, ConfigError, choice

__all__ = [
    "TASKS",
    "Batch",
    "Task",
    "evaluating",
    "make_task",
    "network_config",
    "register",
    "task_sections",
]

Batch = dict[str, torch.Tensor]


class Task(ABC):
    name: ClassVar[str]  # its [train] task value
    section: ClassVar[type | None] = None  # the dataclass of its [name] table, if it has options
    trainable: nn.Module  # what the optimizer updates (a network, an adapter, a pair, …)
    step: int = 0  # the optimizer step being taken; the loop sets it before each draw()

    @abstractmethod
    def __init__(self, cfg: Config, device: torch.device, progress: bool = True): ...

    @abstractmethod
    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        """The global batch for dataset rows ``index`` (CPU tensors, one row per sample)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        """Per-sample loss [b] for a slice of a batch from :meth:`draw`."""

    @abstractmethod
    def export(self, trainable: nn.Module, folder: Path) -> None:
        """Write ``trainable`` (its EMA, or itself without EMA) as an inference folder."""

    @property
    @abstractmethod
    def num_items(self) -> int: ...

    @abstractmethod
    def sample_grid(self, trainable: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """Images [B, 3, H, W] in [0, 1] and their labels, for progress grids."""


#: Every task by its name.
TASKS: dict[str, type[Task]] = {}

T = TypeVar("T", bound=type[Task])


def register(cls: T) -> T:
    """Class decorator: add a task to :data:`TASKS` under its ``name``."""
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls
    return cls


def task_sections() -> dict[str, type | None]:
    """Each task's name, in sorted order, and the dataclass of its config table (None: it has
    no options)."""
    return {name: TASKS[name].section for name in sorted(TASKS)}


def make_task(cfg: Config, device: torch.device, progress: bool = True) -> Task:
    """The task ``[train] task`` names, built for ``cfg``."""
    choice("train.task", cfg.train.task, tuple(task_sections()))
    return TASKS[cfg.train.task](cfg, device, progress)


def network_config(cls: Any, fields: dict[str, Any], where: str) -> Any:
    """``cls.from_dict(fields)``: a network's config from a config table; a bad one is a
    :class:`ConfigError` naming the table ``where``."""
    try:
        return cls.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{where}]: {e}") from e


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block (sample grids, exports, held-out checks), its
    train/eval flag restored after it, errors included."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
