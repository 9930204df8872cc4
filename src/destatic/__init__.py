"""destatic: diffusion models in one σ-space core. See docs/architecture.md for the map."""

from __future__ import annotations

import os

from destatic.bundled import (
    BUNDLED,
    DEFAULT_CONTROLNET,
    DEFAULT_EVALUATOR,
    DEFAULT_INPAINT_MODEL,
    DEFAULT_LCM_MODEL,
    DEFAULT_MODEL,
)

__version__ = "0.1.0"

__all__ = [
    "BUNDLED",
    "DEFAULT_CONTROLNET",
    "DEFAULT_EVALUATOR",
    "DEFAULT_INPAINT_MODEL",
    "DEFAULT_LCM_MODEL",
    "DEFAULT_MODEL",
    "load",
]


def load(path: str | os.PathLike | None = None, **options):
    """A :class:`destatic.pipelines.Pipeline` from a destatic or diffusers-layout folder, a
    bundled pipeline by name (``emoji``, ``emoji_inpaint``, ``emoji_lcm``), a repo id in the
    local Hugging Face cache or a single-file ``.safetensors`` checkpoint (SD 1.x/2.x); without a
    path, the bundled default model. ``options``: ``vae=`` (another autoencoder), ``config=``
    and ``tokenizer=`` for single files (:func:`destatic.pipelines.load.load`)."""
    from destatic.pipelines import load as load_pipeline

    return load_pipeline(path, **options)
