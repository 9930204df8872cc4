"""σ grids, samplers and guidance (docs/architecture.md, "Layers"). Imports nothing from models."""

from destatic.sampling import ancestral, dpmpp, dpmpp_sde, ode, tcd, unipc  # noqa: F401  (fill the registry)
from destatic.sampling.base import SAMPLER_INFO, SAMPLERS, SamplerInfo, StepInfo, ancestral_step
from destatic.sampling.grids import GRIDS, make_sigmas
from destatic.sampling.guidance import ClassifierFreeGuidance
from destatic.sampling.inpaint import KnownRegion
from destatic.sampling.noise import (
    NOISE,
    brownian_noise,
    generators,
    noise_sampler,
    randn,
    resolve_noise,
    slerp,
)
from destatic.sampling.sample import (
    NonFiniteError,
    check_sigmas,
    initial_noise,
    sample,
    sampler_info,
)
from destatic.sampling.tokens import (
    DECODERS,
    autoregressive,
    beam_search,
    filter_logits,
    guide,
    maskgit,
)

__all__ = [
    "DECODERS",
    "GRIDS",
    "NOISE",
    "SAMPLERS",
    "SAMPLER_INFO",
    "ClassifierFreeGuidance",
    "KnownRegion",
    "NonFiniteError",
    "SamplerInfo",
    "StepInfo",
    "ancestral_step",
    "autoregressive",
    "beam_search",
    "brownian_noise",
    "check_sigmas",
    "filter_logits",
    "generators",
    "guide",
    "initial_noise",
    "make_sigmas",
    "maskgit",
    "noise_sampler",
    "randn",
    "resolve_noise",
    "sample",
    "sampler_info",
    "slerp",
]
