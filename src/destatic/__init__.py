"""destatic: diffusion models in one σ-space core. See DESIGN.md for the map."""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"

#: The bundled default model: text → 32×32 emoji (configs/emoji.toml), fp16 safetensors.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "emoji"
#: The bundled prompt-adherence scorer for emoji (configs/emoji_evaluator.toml).
DEFAULT_EVALUATOR = Path(__file__).parent / "assets" / "emoji_evaluator"
#: The bundled inpainting variant of the default model (configs/emoji_inpaint.toml).
DEFAULT_INPAINT_MODEL = Path(__file__).parent / "assets" / "emoji_inpaint"
#: The bundled ControlNet for the default model, on Canny edges (configs/emoji_control.toml).
DEFAULT_CONTROLNET = Path(__file__).parent / "assets" / "emoji_control"
#: The bundled LCM student of the default model: 1-4 steps, guidance folded in
#: (configs/emoji_lcm.toml); ``load("emoji_lcm")``.
LCM_MODEL = Path(__file__).parent / "assets" / "emoji_lcm"


def load(path: str | os.PathLike | None = None):
    """A :class:`destatic.pipelines.Pipeline` from a destatic or diffusers-layout folder, or a
    bundled pipeline by name (``emoji``, ``emoji_inpaint``, ``emoji_lcm``); without a path,
    the bundled default model."""
    from destatic.pipelines import load as load_pipeline

    return load_pipeline(DEFAULT_MODEL if path is None else bundled(path))


def bundled(path: str | os.PathLike) -> Path:
    """``path``, or the bundled pipeline folder of that name when no such path exists."""
    path = Path(path)
    folder = Path(__file__).parent / "assets" / path.name
    if not path.exists() and len(path.parts) == 1 and (folder / "model_index.json").is_file():
        return folder
    return path
