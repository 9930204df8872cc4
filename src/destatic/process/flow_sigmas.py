"""Flow matching run by diffusers' multistep solvers with ``use_flow_sigmas`` (Wan 2.1's
``UniPCMultistepScheduler``: ``prediction_type="flow_prediction"``, ``flow_shift``).

The process is :class:`~destatic.process.RectifiedFlow` with ``shift = flow_shift``; the grid
diffusers draws, ``t_i = shift(1 - 0.999·i/N)`` then 0 (``linspace(1, 1/1000, N+1)[:-1]``
shifted), is destatic's ``sgm_uniform`` grid on that process, but for its first point. Two
things differ from the flow matching schedulers, and :class:`IntegerTimestepFlow` does both:

* the solver casts its timesteps to integers (``int64``), so the network is told ``⌊1000·t⌋``;
  the process labels σ the same way, ``min(⌊T·t⌋, T - 1)``;
* the grid starts just short of pure noise, at ``t = 1 - 10⁻⁶`` (diffusers moves it there to
  keep log σ finite), so a multistep solver keeps the first x̂0 in its history and corrects
  the second state with it. The process's ``sigma_max`` is that point's σ = (1 - 10⁻⁶)/10⁻⁶,
  so the grids start there and the samplers run the whole grid as diffusers does (from σ = ∞
  they would take an exact first step and start afresh, UniPC then drawing other frames).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from destatic.io import CheckpointError
from destatic.process.flow import RectifiedFlow

__all__ = ["IntegerTimestepFlow", "flow_sigmas_config", "flow_sigmas_process"]

#: 1 - t at diffusers' first point of a ``use_flow_sigmas`` grid
FIRST_POINT_GAP = 1e-6


@dataclass(frozen=True)
class IntegerTimestepFlow(RectifiedFlow):
    """Rectified flow whose network timestep is the integer ``min(⌊T·t⌋, T - 1)`` and whose
    grids start at t = 1 - 10⁻⁶ (diffusers' ``use_flow_sigmas`` solvers)."""

    @property
    def sigma_max(self) -> float:
        """σ of diffusers' first point, t = 1 - 10⁻⁶ (module doc)."""
        return (1 - FIRST_POINT_GAP) / FIRST_POINT_GAP

    def noise_label(self, sigma: torch.Tensor) -> torch.Tensor:
        label = torch.floor(super().noise_label(sigma))
        return label.clamp(max=self.num_timesteps - 1)


def flow_sigmas_process(cfg: dict[str, Any]) -> IntegerTimestepFlow:
    """The process of a ``use_flow_sigmas`` scheduler config (flow prediction, a static
    ``flow_shift``); a one-line CheckpointError for what it cannot be."""
    name = cfg.get("_class_name")
    if cfg.get("prediction_type") != "flow_prediction":
        raise CheckpointError(
            f"{name} with use_flow_sigmas needs prediction_type 'flow_prediction', got "
            f"{cfg.get('prediction_type')!r}; fix scheduler_config.json"
        )
    if cfg.get("use_dynamic_shifting", False):
        raise CheckpointError(
            f"{name} with use_flow_sigmas and use_dynamic_shifting is not supported"
        )
    shift = float(cfg.get("flow_shift", 1.0))
    if not (math.isfinite(shift) and shift > 0):
        raise CheckpointError(f"{name} flow_shift={shift!r} must be positive; fix config.json")
    return IntegerTimestepFlow(shift=shift, num_timesteps=int(cfg.get("num_train_timesteps", 1000)))


def flow_sigmas_config(process: IntegerTimestepFlow) -> dict[str, Any]:
    """The inverse of :func:`flow_sigmas_process`: diffusers' ``UniPCMultistepScheduler`` with
    flow sigmas (its other settings at their defaults, which are Wan 2.1's)."""
    return {
        "_class_name": "UniPCMultistepScheduler",
        "num_train_timesteps": process.num_timesteps,
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": process.shift,
    }
