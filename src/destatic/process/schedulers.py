"""diffusers scheduler configs ↔ our processes and targets: which noise process and prediction
target a ``scheduler_config.json`` describes (VP β-schedules with ε / v / x0, flow matching with
its shift, EDM), and the config that writes ours back for diffusers to read."""

from __future__ import annotations

import math
from typing import Any

from destatic.io import CheckpointError
from destatic.process import EDM, EDMTarget, RectifiedFlow, Target, VPDiscrete, get_target
from destatic.process.base import Process
from destatic.process.vp import BETA_SCHEDULES

__all__ = ["process_from_scheduler_config", "scheduler_config_from_process"]

# diffusers scheduler classes that run on a discrete VP (β-schedule) process.
VP_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "LMSDiscreteScheduler",
    "UniPCMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
VP_TARGETS = ("epsilon", "v_prediction", "sample")


def process_from_scheduler_config(cfg: dict[str, Any]) -> tuple[Process, str | Target]:
    """A diffusers scheduler ``config.json`` dict → (destatic process, prediction target name).

    β-schedule schedulers (DDIM, PNDM, Euler, DPM-Solver, LMS, UniPC, Heun, DDPM, …) give a
    :class:`VPDiscrete`; ``FlowMatchEulerDiscreteScheduler`` gives a :class:`RectifiedFlow` with
    its static ``shift`` and target ``"flow"``. A ``use_dynamic_shifting`` scheduler (Flux) is
    accepted: the resolution-dependent shift is chosen at generation time
    (``RectifiedFlow.for_resolution``), nothing extra is stored here.
    """
    name = cfg.get("_class_name")
    steps = int(cfg.get("num_train_timesteps", 1000))
    if name in EDM_SCHEDULERS:
        # diffusers' EDM "epsilon" is EDM's F-prediction (c_out = σ·σ_d/√(σ²+σ_d²)).
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise CheckpointError(
                f"{name} with prediction_type={cfg.get('prediction_type')!r} is not supported; "
                "only 'epsilon' (EDM's F-prediction) is"
            )
        sigma_data = float(cfg.get("sigma_data", 0.5))
        process = EDM(
            min_sigma=float(cfg.get("sigma_min", 0.002)),
            max_sigma=float(cfg.get("sigma_max", 80.0)),
            sigma_data=sigma_data,
            num_timesteps=steps,
        )
        return process, EDMTarget(sigma_data)
    if name in FLOW_SCHEDULERS:
        shift = float(cfg.get("shift", 1.0))
        if not (math.isfinite(shift) and shift > 0):
            raise CheckpointError(f"scheduler shift={shift!r} must be positive; fix config.json")
        return RectifiedFlow(shift=shift, num_timesteps=steps), "flow"
    if name not in VP_SCHEDULERS:
        raise CheckpointError(
            f"unsupported scheduler class {name!r}; supported: "
            f"{', '.join(VP_SCHEDULERS + FLOW_SCHEDULERS + EDM_SCHEDULERS)}"
        )
    if cfg.get("trained_betas") is not None:
        raise CheckpointError(
            f"{name} with trained_betas is not supported; only named beta schedules "
            f"({', '.join(BETA_SCHEDULES)}) are"
        )
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise CheckpointError(
            f"unsupported beta_schedule {schedule!r} in {name} config; supported: "
            f"{', '.join(BETA_SCHEDULES)}"
        )
    target = cfg.get("prediction_type", "epsilon")
    if target not in VP_TARGETS:
        raise CheckpointError(
            f"unsupported prediction_type {target!r} in {name} config; supported: "
            f"{', '.join(VP_TARGETS)}"
        )
    process = VPDiscrete(
        schedule=schedule,
        beta_start=float(cfg.get("beta_start", 0.0001)),
        beta_end=float(cfg.get("beta_end", 0.02)),
        num_timesteps=steps,
        zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
    )
    return process, target


def scheduler_config_from_process(process: Process, target: str | Target) -> dict[str, Any]:
    """The inverse of :func:`process_from_scheduler_config`: a diffusers-compatible scheduler
    config (``EulerDiscreteScheduler`` for VP, ``FlowMatchEulerDiscreteScheduler`` for flow,
    ``EDMEulerScheduler`` for EDM)."""
    target_obj = get_target(target)
    target = target_obj.name
    if isinstance(process, EDM):
        if not isinstance(target_obj, EDMTarget) or target_obj.sigma_data != process.sigma_data:
            raise CheckpointError(
                "an EDM process needs the EDM target with the same sigma_data "
                f"({process.sigma_data}); got {target_obj!r}"
            )
        return {
            "_class_name": "EDMEulerScheduler",
            "num_train_timesteps": process.num_timesteps,
            "sigma_min": process.min_sigma,
            "sigma_max": process.max_sigma,
            "sigma_data": process.sigma_data,
            "sigma_schedule": "karras",
            "rho": 7.0,
            "prediction_type": "epsilon",
        }
    if isinstance(process, RectifiedFlow):
        if target != "flow":
            raise CheckpointError(
                f"a RectifiedFlow process needs target 'flow', got {target!r}; pass 'flow'"
            )
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": process.num_timesteps,
            "shift": process.shift,
            "use_dynamic_shifting": False,
        }
    if isinstance(process, VPDiscrete):
        if target not in VP_TARGETS:
            raise CheckpointError(
                f"a VPDiscrete process needs target one of {', '.join(VP_TARGETS)}, got {target!r}"
            )
        return {
            "_class_name": "EulerDiscreteScheduler",
            "num_train_timesteps": process.num_timesteps,
            "beta_schedule": process.schedule,
            "beta_start": process.beta_start,
            "beta_end": process.beta_end,
            "trained_betas": None,
            "prediction_type": target,
            "rescale_betas_zero_snr": process.zero_terminal_snr,
            "timestep_spacing": "trailing" if process.zero_terminal_snr else "leading",
            "steps_offset": 0 if process.zero_terminal_snr else 1,
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
        }
    raise CheckpointError(
        f"{type(process).__name__} has no diffusers scheduler; only VPDiscrete and "
        "RectifiedFlow processes are saved"
    )
