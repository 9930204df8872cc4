"""destatic: diffusion models in one σ-space core. See DESIGN.md for the map."""

from __future__ import annotations

import os

__version__ = "0.1.0"


def load(path: str | os.PathLike):
    """A :class:`destatic.pipelines.Pipeline` from a destatic or diffusers-layout folder."""
    from destatic.pipelines import load as load_pipeline

    return load_pipeline(path)
