"""Model families (:mod:`destatic.pipelines.families.base`): importing this package registers
every family in :data:`FAMILIES`, in matching order."""

from destatic.models.text import (
    ClassLabelEncoder,
    CLIPTextEncoder,
    SD3TextEncoder,
    SDXLTextEncoder,
    T5TextEncoder,
    TextEncoder,
)
from destatic.models.wan_text import UMT5TextEncoder, WanImagePromptEncoder
from destatic.pipelines.families.animatediff import ANIMATEDIFF
from destatic.pipelines.families.audio import AUDIO, is_audio_network
from destatic.pipelines.families.audioldm import AUDIOLDM, CLAPTextEncoder
from destatic.pipelines.families.base import (
    FAMILIES,
    Components,
    ConditioningContext,
    Family,
    family_of,
    load_components,
    register_family,
)
from destatic.pipelines.families.dit import DIT
from destatic.pipelines.families.flux import FLUX  # noqa: F401 (registers the family)
from destatic.pipelines.families.own import OWN
from destatic.pipelines.families.pixart import PIXART, PIXART_SIGMA
from destatic.pipelines.families.pixart import TOKENS as T5_TOKENS
from destatic.pipelines.families.sd3 import SD3
from destatic.pipelines.families.sdxl import SDXL
from destatic.pipelines.families.stable_audio import STABLE_AUDIO
from destatic.pipelines.families.stable_diffusion import STABLE_DIFFUSION
from destatic.pipelines.families.tokens import TOKEN_PIPELINE, TOKENS
from destatic.pipelines.families.video import VIDEO, is_video_network
from destatic.pipelines.families.wan import WAN, WAN_I2V

__all__ = [
    "ANIMATEDIFF",
    "AUDIO",
    "AUDIOLDM",
    "DIT",
    "FAMILIES",
    "OWN",
    "PIXART",
    "PIXART_SIGMA",
    "SD3",
    "SDXL",
    "STABLE_AUDIO",
    "STABLE_DIFFUSION",
    "TOKENS",
    "TOKEN_PIPELINE",
    "VIDEO",
    "WAN",
    "WAN_I2V",
    "Components",
    "ConditioningContext",
    "Family",
    "default_family",
    "family_of",
    "load_components",
    "register_family",
]


def default_family(text_encoder: TextEncoder, network: object = None) -> Family:
    """The family of a pipeline put together in code rather than loaded from a folder, told
    by its text encoder (and a video network by its frame count, an audio network by its
    class)."""
    if is_audio_network(network):  # Stable Audio's on T5, ours on MiniLM
        return STABLE_AUDIO if isinstance(text_encoder, T5TextEncoder) else AUDIO
    if isinstance(text_encoder, CLAPTextEncoder):
        return AUDIOLDM
    if isinstance(text_encoder, WanImagePromptEncoder):
        return WAN_I2V
    if isinstance(text_encoder, UMT5TextEncoder):
        return WAN
    if is_video_network(network):  # an SD U-Net with motion modules on CLIP is AnimateDiff
        return ANIMATEDIFF if isinstance(text_encoder, CLIPTextEncoder) else VIDEO
    if isinstance(text_encoder, SD3TextEncoder):
        return SD3
    if isinstance(text_encoder, ClassLabelEncoder):
        return DIT
    if isinstance(text_encoder, T5TextEncoder):  # Σ's 300 tokens, else α
        sigma = text_encoder.max_length == T5_TOKENS[PIXART_SIGMA.diffusers_pipeline]
        return PIXART_SIGMA if sigma else PIXART
    if isinstance(text_encoder, SDXLTextEncoder):
        return SDXL
    if isinstance(text_encoder, CLIPTextEncoder):
        return STABLE_DIFFUSION
    return OWN
