"""Model families (:mod:`destatic.pipelines.families.base`): importing this package registers
every family in :data:`FAMILIES`, in matching order."""

from destatic.models.text import CLIPTextEncoder, SD3TextEncoder, SDXLTextEncoder, TextEncoder
from destatic.pipelines.families.base import (
    FAMILIES,
    Components,
    ConditioningContext,
    Family,
    family_of,
    load_components,
    register_family,
)
from destatic.pipelines.families.flux import FLUX  # noqa: F401 (registers the family)
from destatic.pipelines.families.own import OWN
from destatic.pipelines.families.sd3 import SD3
from destatic.pipelines.families.sdxl import SDXL
from destatic.pipelines.families.stable_diffusion import STABLE_DIFFUSION

__all__ = [
    "FAMILIES",
    "OWN",
    "SD3",
    "SDXL",
    "STABLE_DIFFUSION",
    "Components",
    "ConditioningContext",
    "Family",
    "default_family",
    "family_of",
    "load_components",
    "register_family",
]


def default_family(text_encoder: TextEncoder) -> Family:
    """The family of a pipeline put together in code rather than loaded from a folder, told
    by its text encoder."""
    if isinstance(text_encoder, SD3TextEncoder):
        return SD3
    if isinstance(text_encoder, SDXLTextEncoder):
        return SDXL
    if isinstance(text_encoder, CLIPTextEncoder):
        return STABLE_DIFFUSION
    return OWN
