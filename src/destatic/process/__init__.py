"""Noise processes and prediction targets: the σ-space core (docs/architecture.md, "One core")."""

from destatic.process.base import Process
from destatic.process.consistency import (
    ConsistencyTarget,
    LCMTarget,
    consistency_coefficients,
)
from destatic.process.edm import EDM, CosineEDM
from destatic.process.flow import RectifiedFlow, resolution_shift
from destatic.process.targets import (
    TARGETS,
    Denoiser,
    EDMTarget,
    EDMVTarget,
    EpsilonTarget,
    FlowTarget,
    SampleTarget,
    Target,
    VTarget,
    get_target,
    preconditioning,
)
from destatic.process.vp import BETA_SCHEDULES, VPDiscrete, beta_schedule, rescale_zero_terminal_snr

__all__ = [
    "BETA_SCHEDULES",
    "EDM",
    "TARGETS",
    "ConsistencyTarget",
    "CosineEDM",
    "Denoiser",
    "EDMTarget",
    "EDMVTarget",
    "EpsilonTarget",
    "FlowTarget",
    "LCMTarget",
    "Process",
    "RectifiedFlow",
    "SampleTarget",
    "Target",
    "VPDiscrete",
    "VTarget",
    "beta_schedule",
    "consistency_coefficients",
    "get_target",
    "preconditioning",
    "rescale_zero_terminal_snr",
    "resolution_shift",
]
