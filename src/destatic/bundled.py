"""The models that ship inside the package (``src/destatic/assets``), in one table.

Each was trained from scratch on this project's CPU by ``destatic train configs/<name>.toml``
and exported in fp16 safetensors. Names resolve anywhere a model folder is accepted
(``destatic.load("emoji_lcm")``, ``destatic generate --model emoji_lcm``); a path that exists
on disk always wins over a bundled name.

This module imports nothing from destatic: every layer may ask it where a bundled model is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ASSETS",
    "BUNDLED",
    "DEFAULT_AUDIO_EVALUATOR",
    "DEFAULT_CONTROLNET",
    "DEFAULT_EVALUATOR",
    "DEFAULT_INPAINT_MODEL",
    "DEFAULT_LCM_MODEL",
    "DEFAULT_MODEL",
    "BundledModel",
    "companions",
    "resolve",
]

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class BundledModel:
    name: str  # the folder name under assets/, also the name users type
    kind: str  # "pipeline" (model_index.json) or "component" (config.json)
    config: str  # the training config that made it
    description: str

    @property
    def folder(self) -> Path:
        return ASSETS / self.name

    @property
    def present(self) -> bool:
        """Whether its files are installed (a trimmed install may lack a companion)."""
        marker = "model_index.json" if self.kind == "pipeline" else "config.json"
        return (self.folder / marker).is_file()


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel("emoji", "pipeline", "configs/emoji.toml", "text → 32×32 emoji (default)"),
        BundledModel(
            "emoji64", "pipeline", "configs/emoji64.toml", "text → 64×64 emoji (pixel U-Net)"
        ),
        BundledModel(
            "emoji_inpaint", "pipeline", "configs/emoji_inpaint.toml", "inpainting variant"
        ),
        BundledModel(
            "emoji_control", "component", "configs/emoji_control.toml", "ControlNet, Canny edges"
        ),
        BundledModel(
            "emoji_lcm", "pipeline", "configs/emoji_lcm.toml", "4-step LCM student, guidance in"
        ),
        BundledModel(
            "emoji_video",
            "pipeline",
            "configs/emoji_video.toml",
            "text → 8-frame 32×32 emoji clips (the emoji U-Net + AnimateDiff motion modules)",
        ),
        BundledModel(
            "notes",
            "pipeline",
            "configs/notes.toml",
            "text → 1 s instrument notes at 16 kHz (an audio DiT on mel frames)",
        ),
        BundledModel(
            "emoji_ar",
            "pipeline",
            "configs/emoji_ar.toml",
            "text → 32×32 emoji as 8×8 VQ codes, next-token autoregressive (beam search too)",
        ),
        BundledModel(
            "emoji_evaluator",
            "component",
            "configs/emoji_evaluator.toml",
            "prompt-adherence scorer",
        ),
        BundledModel(
            "notes_evaluator",
            "component",
            "configs/notes_evaluator.toml",
            "audio scorer: a notes' instrument, pitch class and octave; FAD embedding",
        ),
    )
}

#: The bundled default model: text → 32×32 emoji (configs/emoji.toml).
DEFAULT_MODEL = BUNDLED["emoji"].folder
#: Its inpainting variant, used for masked requests to the default model.
DEFAULT_INPAINT_MODEL = BUNDLED["emoji_inpaint"].folder
#: Its ControlNet on Canny edges, used for control requests to the default model.
DEFAULT_CONTROLNET = BUNDLED["emoji_control"].folder
#: Its LCM student: 1-4 steps, guidance folded in.
DEFAULT_LCM_MODEL = BUNDLED["emoji_lcm"].folder
#: The prompt-adherence scorer for emoji.
DEFAULT_EVALUATOR = BUNDLED["emoji_evaluator"].folder
#: The scorer of sounds (destatic.metrics.audio), trained on the notes.
DEFAULT_AUDIO_EVALUATOR = BUNDLED["notes_evaluator"].folder


def resolve(path: str | os.PathLike | None) -> Path:
    """``path``; the bundled folder of that name when no such path exists; the default model
    for ``None``."""
    if path is None:
        return DEFAULT_MODEL
    path = Path(path)
    entry = BUNDLED.get(path.name) if len(path.parts) == 1 else None
    if not path.exists() and entry is not None and entry.present:
        return entry.folder
    return path


def companions(model: str | os.PathLike | None) -> dict[str, Path]:
    """The installed companions of ``model`` when it is the bundled default model:
    ``"inpaint"`` (its inpainting variant, for masked requests) and ``"control"`` (its
    ControlNet, for control images given without one); ``{}`` for any other model."""
    if resolve(model or None).resolve() != DEFAULT_MODEL.resolve():
        return {}
    pairs = {"inpaint": BUNDLED["emoji_inpaint"], "control": BUNDLED["emoji_control"]}
    return {role: m.folder for role, m in pairs.items() if m.present}
