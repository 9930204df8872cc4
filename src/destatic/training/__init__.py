"""Training: objectives, the loop, checkpoints, configs and the task registry
(docs/architecture.md, "The task registry")."""

from destatic.training.config import Config, ConfigError
from destatic.training.configure import load_config
from destatic.training.objectives import (
    OBJECTIVES,
    Objective,
    edm_objective,
    flow_objective,
    vp_objective,
)
from destatic.training.state import latest_checkpoint, load_checkpoint, save_checkpoint
from destatic.training.trainer import TrainingError, train

__all__ = [
    "OBJECTIVES",
    "Config",
    "ConfigError",
    "Objective",
    "TrainingError",
    "edm_objective",
    "flow_objective",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "save_checkpoint",
    "train",
    "vp_objective",
]
