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


def load(path: str | os.PathLike | None = None):
    """A :class:`destatic.pipelines.Pipeline` from a destatic or diffusers-layout folder, or a
    bundled pipeline by name (``emoji``, ``emoji_inpaint``, ``emoji_lcm``); without a path,
    the bundled default model."""
    from destatic.pipelines import load as load_pipeline

    return load_pipeline(path)
