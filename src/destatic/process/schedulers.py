"""diffusers scheduler configs ↔ our processes and targets: which noise process and prediction
target a ``scheduler_config.json`` describes (VP β-schedules with ε / v / x0, flow matching with
its shift, EDM with F- or v-prediction, Stable Audio's cosine DPM-Solver, LCM's consistency
boundary condition), the config that writes ours back for diffusers to read, and the sampling
defaults a scheduler class implies (few-step LCM / TCD, the cosine scheduler's SDE solver)."""

from __future__ import annotations

import math
from typing import Any

from destatic.io import CheckpointError
from destatic.process import (
    EDM,
    CosineEDM,
    EDMTarget,
    EDMVTarget,
    LCMTarget,
    RectifiedFlow,
    Target,
    VPDiscrete,
    get_target,
)
from destatic.process.base import Process
from destatic.process.flow import ResolutionShift
from destatic.process.flow_sigmas import (
    IntegerTimestepFlow,
    flow_sigmas_config,
    flow_sigmas_process,
)
from destatic.process.vp import BETA_SCHEDULES

__all__ = [
    "process_from_scheduler_config",
    "scheduler_config_from_process",
    "scheduler_sampling_defaults",
]

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
    "LCMScheduler",  # + LCM's boundary condition (LCMTarget)
    "TCDScheduler",  # the base target; its sampling is the ``tcd`` sampler
)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
COSINE_SCHEDULER = "CosineDPMSolverMultistepScheduler"  # Stable Audio: CosineEDM
VP_TARGETS = ("epsilon", "v_prediction", "sample")


def process_from_scheduler_config(cfg: dict[str, Any]) -> tuple[Process, str | Target]:
    """A diffusers scheduler ``config.json`` dict → (destatic process, prediction target name).

    β-schedule schedulers (DDIM, PNDM, Euler, DPM-Solver, LMS, UniPC, Heun, DDPM, …) give a
    :class:`VPDiscrete`; ``FlowMatchEulerDiscreteScheduler`` gives a :class:`RectifiedFlow` with
    its static ``shift`` and target ``"flow"``. A ``use_dynamic_shifting`` scheduler (Flux)
    keeps its μ-line (``RectifiedFlow.resolution``); the grid stage picks the shift for the
    image size (``RectifiedFlow.at_resolution``). The EDM schedulers give :class:`EDM`, and
    ``CosineDPMSolverMultistepScheduler`` (Stable Audio) :class:`CosineEDM`, with EDM's
    F-prediction (their ``"epsilon"``) or :class:`~destatic.process.EDMVTarget`
    (``"v_prediction"``). ``LCMScheduler`` gives
    the VP process and an :class:`~destatic.process.LCMTarget` over its ``prediction_type``
    (the consistency function of an LCM-distilled network or LCM-LoRA); ``TCDScheduler`` the
    VP process and the plain target (TCD applies no boundary condition).
    """
    name = cfg.get("_class_name")
    steps = int(cfg.get("num_train_timesteps", 1000))
    if name in (*EDM_SCHEDULERS, COSINE_SCHEDULER):
        return _edm_from_config(name, cfg, steps)
    if name in FLOW_SCHEDULERS:
        shift = float(cfg.get("shift", 1.0))
        if not (math.isfinite(shift) and shift > 0):
            raise CheckpointError(f"scheduler shift={shift!r} must be positive; fix config.json")
        dynamic = None
        if cfg.get("use_dynamic_shifting", False):  # Flux: s = exp(μ(image tokens))
            if cfg.get("time_shift_type", "exponential") != "exponential":
                raise CheckpointError(f"{name} time_shift_type must be 'exponential' (Flux's)")
            try:
                dynamic = ResolutionShift(
                    int(cfg.get("base_image_seq_len", 256)),
                    int(cfg.get("max_image_seq_len", 4096)),
                    float(cfg.get("base_shift", 0.5)),
                    float(cfg.get("max_shift", 1.15)),
                )
            except ValueError as e:
                raise CheckpointError(f"{name} dynamic shifting: {e}; fix config.json") from e
        return RectifiedFlow(shift=shift, num_timesteps=steps, resolution=dynamic), "flow"
    if name == "UniPCMultistepScheduler" and cfg.get("use_flow_sigmas", False):  # Wan 2.1
        return flow_sigmas_process(cfg), "flow"
    if name not in VP_SCHEDULERS:
        raise CheckpointError(
            f"unsupported scheduler class {name!r}; supported: "
            f"{', '.join((*VP_SCHEDULERS, *FLOW_SCHEDULERS, *EDM_SCHEDULERS, COSINE_SCHEDULER))}"
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
    if name == "LCMScheduler":
        scaling = float(cfg.get("timestep_scaling", 10.0))
        if not (math.isfinite(scaling) and scaling > 0):
            raise CheckpointError(f"LCMScheduler timestep_scaling={scaling!r} must be positive")
        return process, LCMTarget(target, process, timestep_scaling=scaling)
    return process, target


def _edm_from_config(name: str, cfg: dict[str, Any], steps: int) -> tuple[Process, Target]:
    """An EDM-style scheduler: its σ range and σ_data, and the target its ``prediction_type``
    names — diffusers' EDM ``"epsilon"`` is EDM's F-prediction (c_out = σ·σ_d/√(σ²+σ_d²)),
    ``"v_prediction"`` the same with c_out negated (:class:`EDMVTarget`)."""
    cosine = name == COSINE_SCHEDULER
    cls = CosineEDM if cosine else EDM
    kind = cfg.get("prediction_type", "v_prediction" if cosine else "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise CheckpointError(
            f"{name} with prediction_type={kind!r} is not supported; only 'epsilon' (EDM's "
            "F-prediction) and 'v_prediction' are"
        )
    if cosine:
        _check_cosine(cfg)
    base = cls()
    sigma_data = float(cfg.get("sigma_data", base.sigma_data))
    try:
        process = cls(
            min_sigma=float(cfg.get("sigma_min", base.min_sigma)),
            max_sigma=float(cfg.get("sigma_max", base.max_sigma)),
            sigma_data=sigma_data,
            num_timesteps=steps,
        )
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}; fix config.json") from e
    return process, (EDMVTarget if kind == "v_prediction" else EDMTarget)(sigma_data)


def _check_cosine(cfg: dict[str, Any]) -> None:
    """What of ``CosineDPMSolverMultistepScheduler`` destatic reproduces: the exponential or
    Karras (ρ = 7) grid ending at σ = 0, first- or second-order DPM-Solver++ with the midpoint
    rule (its ``euler_at_final`` and ``lower_order_final`` change nothing on such a grid)."""
    checks = {
        "sigma_schedule": (("exponential", "karras"), "exponential"),
        "final_sigmas_type": (("zero",), "zero"),
        "solver_type": (("midpoint", "logrho", "bh1", "bh2"), "midpoint"),  # the rest: midpoint
        "solver_order": ((1, 2), 2),
    }
    for key, (allowed, default) in checks.items():
        if cfg.get(key, default) not in allowed:
            raise CheckpointError(
                f"{COSINE_SCHEDULER} {key}={cfg[key]!r} is not supported; use one of "
                f"{', '.join(map(repr, allowed))}"
            )
    if cfg.get("sigma_schedule", "exponential") == "karras" and float(cfg.get("rho", 7.0)) != 7:
        raise CheckpointError(f"{COSINE_SCHEDULER} rho={cfg['rho']!r}: the karras grid uses 7")


def scheduler_sampling_defaults(cfg: dict[str, Any], guidance_embedded: bool) -> dict[str, Any]:
    """The generation defaults a scheduler class implies, under a folder's stored ones.

    Few-step students: ``LCMScheduler`` → 4 steps of the ``lcm`` sampler on the ``lcm`` grid
    (LCMScheduler.set_timesteps' timesteps); ``TCDScheduler`` → 4 steps of ``tcd`` on the same
    grid. Guidance: a network that embeds the scale (``time_cond_proj_dim``, an LCM-distilled
    U-Net) defaults to diffusers' LatentConsistencyModelPipeline's 8.5; otherwise (LCM-LoRA, TCD
    LoRA on a plain U-Net) to 1, no classifier-free guidance, as those adapters are used.
    ``CosineDPMSolverMultistepScheduler`` (always its SDE variant) → ``dpmpp_2m_sde`` (its first
    order is ``euler_ancestral``, the same rule) on its ``sigma_schedule`` grid; the Brownian
    noise comes with its process (:class:`CosineEDM`). Other schedulers imply nothing (the
    family's defaults apply).
    """
    name = cfg.get("_class_name")
    if name == COSINE_SCHEDULER:
        sampler = "dpmpp_2m_sde" if cfg.get("solver_order", 2) == 2 else "euler_ancestral"
        return {"sampler": sampler, "grid": cfg.get("sigma_schedule", "exponential")}
    if name not in ("LCMScheduler", "TCDScheduler"):
        return {}
    original = cfg.get("original_inference_steps", 50)
    if original != 50:
        raise CheckpointError(
            f"{name} original_inference_steps={original!r} is not supported; the lcm grid "
            "picks from LCM's 50-step schedule"
        )
    sampler = "lcm" if name == "LCMScheduler" else "tcd"
    guidance = 8.5 if guidance_embedded else 1.0
    return {"steps": 4, "sampler": sampler, "grid": "lcm", "guidance": guidance}


def scheduler_config_from_process(process: Process, target: str | Target) -> dict[str, Any]:
    """The inverse of :func:`process_from_scheduler_config`: a diffusers-compatible scheduler
    config (``EulerDiscreteScheduler`` for VP, ``FlowMatchEulerDiscreteScheduler`` for flow,
    ``EDMEulerScheduler`` for EDM, ``CosineDPMSolverMultistepScheduler`` for CosineEDM with
    Stable Audio's exponential grid)."""
    target_obj = get_target(target)
    if isinstance(target_obj, LCMTarget):
        if target_obj.process != process or target_obj.sigma_data != 0.5:
            raise CheckpointError(
                "an LCMTarget saves as LCMScheduler only over its own process, sigma_data 0.5"
            )
        config = scheduler_config_from_process(process, target_obj.base)
        for key in ("interpolation_type", "use_karras_sigmas"):  # not LCMScheduler options
            del config[key]
        config.update(
            _class_name="LCMScheduler",
            original_inference_steps=50,
            timestep_scaling=target_obj.timestep_scaling,
            timestep_spacing="leading",
            steps_offset=0,
        )
        return config
    target = target_obj.name
    if isinstance(process, EDM):
        return _edm_config(process, target_obj)
    if isinstance(process, IntegerTimestepFlow) and target == "flow":
        return flow_sigmas_config(process)
    if isinstance(process, RectifiedFlow):
        if target != "flow":
            raise CheckpointError(
                f"a RectifiedFlow process needs target 'flow', got {target!r}; pass 'flow'"
            )
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": process.num_timesteps,
            "shift": process.shift,
            "use_dynamic_shifting": process.resolution is not None,
            **_dynamic_shift_config(process.resolution),
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


def _edm_config(process: EDM, target: Target) -> dict[str, Any]:
    """``EDMEulerScheduler`` (Karras grid) for EDM, ``CosineDPMSolverMultistepScheduler`` for
    CosineEDM; ``prediction_type`` from the target (F-prediction is their ``"epsilon"``)."""
    if not isinstance(target, EDMTarget) or target.sigma_data != process.sigma_data:
        raise CheckpointError(
            "an EDM process needs the EDM target with the same sigma_data "
            f"({process.sigma_data}); got {target!r}"
        )
    config = {
        "_class_name": "EDMEulerScheduler",
        "num_train_timesteps": process.num_timesteps,
        "sigma_min": process.min_sigma,
        "sigma_max": process.max_sigma,
        "sigma_data": process.sigma_data,
        "sigma_schedule": "karras",
        "rho": 7.0,
        "prediction_type": "v_prediction" if isinstance(target, EDMVTarget) else "epsilon",
    }
    if isinstance(process, CosineEDM):
        config.update(
            _class_name=COSINE_SCHEDULER,
            sigma_schedule="exponential",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            euler_at_final=False,
            final_sigmas_type="zero",
        )
    return config


def _dynamic_shift_config(resolution: ResolutionShift | None) -> dict[str, Any]:
    """diffusers' keys for a dynamic (resolution-dependent) shift; none for a static one."""
    if resolution is None:
        return {}
    return {
        "base_image_seq_len": resolution.base_seq_len,
        "max_image_seq_len": resolution.max_seq_len,
        "base_shift": resolution.base_shift,
        "max_shift": resolution.max_shift,
    }
