"""Pipelines: the only layer that knows all the others (DESIGN.md, "Layers")."""

from destatic.pipelines.load import load, save
from destatic.pipelines.text_to_image import Pipeline

__all__ = ["Pipeline", "load", "save"]
