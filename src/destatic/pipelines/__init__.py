"""Pipelines: a generation request → stages → media; the family registry; load and save
folders (docs/architecture.md, "Layers")."""

from destatic.pipelines.families import FAMILIES, Family, register_family
from destatic.pipelines.load import load, save
from destatic.pipelines.pipeline import Pipeline, to_pil
from destatic.pipelines.request import GenerationRequest, RequestError
from destatic.pipelines.tokens import TokenPipeline

__all__ = [
    "FAMILIES",
    "Family",
    "GenerationRequest",
    "Pipeline",
    "RequestError",
    "TokenPipeline",
    "load",
    "register_family",
    "save",
    "to_pil",
]
