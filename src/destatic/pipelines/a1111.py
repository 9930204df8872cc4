"""AUTOMATIC1111's ``parameters`` text (the PNG text chunk A1111, Forge and many viewers write):
parsed into the prompt, the negative prompt and the ``Key: value`` pairs of its last line.

    a red cat
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768

This is A1111's own rule (``parse_generation_parameters``): the last line holds the settings
when it has at least three ``Key: value`` pairs; values may be JSON-quoted (``"a, b"``); the
lines before it are the prompt, up to the line that starts with ``Negative prompt:``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

__all__ = ["A1111Parameters", "parse_parameters"]

# A1111's re_param_code: a key, a colon, then a quoted value or anything up to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


@dataclass
class A1111Parameters:
    """The parts of one ``parameters`` text."""

    prompt: str = ""
    negative_prompt: str = ""
    settings: dict[str, str] = field(default_factory=dict)  # "Steps" -> "20", …


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value[1:-1]
    return value


def parse_parameters(text: str) -> A1111Parameters:
    """The prompt, negative prompt and settings of an A1111 ``parameters`` text."""
    lines = text.strip().split("\n")
    out = A1111Parameters()
    if lines and len(_PAIR.findall(lines[-1])) >= 3:
        out.settings = {k.strip(): _unquote(v) for k, v in _PAIR.findall(lines.pop())}
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        if negative is None and line.strip().startswith(_NEGATIVE):
            negative = [line.strip()[len(_NEGATIVE) :].strip()]
        elif negative is None:
            prompt.append(line)
        else:
            negative.append(line)
    out.prompt = "\n".join(prompt).strip()
    out.negative_prompt = "\n".join(negative or []).strip()
    return out


# A1111 setting -> (GenerationRequest field, type). "Denoising strength" is the hires pass's
# when there is one (an img2img PNG's input image is not in the PNG, so it is dropped then).
_FIELDS: dict[str, tuple[str, type]] = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("grid", str),
    "CFG scale": ("guidance", float),
    "Seed": ("seed", int),
    "Variation seed": ("variation_seed", int),
    "Variation seed strength": ("variation_strength", float),
    "Hires upscale": ("hires_scale", float),
    "Denoising strength": ("hires_strength", float),
}
_UNSET = ("", "default", "none")


def request_fields(params: A1111Parameters) -> dict:
    """:class:`~destatic.pipelines.GenerationRequest` fields for parsed A1111 parameters (the
    sampler and grid still in A1111's words); a ValueError names a malformed value."""
    fields: dict = {"prompt": params.prompt, "negative_prompt": params.negative_prompt}
    settings = params.settings
    for key, (name, kind) in _FIELDS.items():
        value = settings.get(key, "")
        if value.strip().lower() in _UNSET:
            continue
        try:
            fields[name] = kind(value)
        except ValueError:
            raise ValueError(f"{key}: {value!r} is not a valid {kind.__name__}") from None
    if "hires_scale" not in fields:
        fields.pop("hires_strength", None)
    if settings.get("Size"):
        width, sep, height = settings["Size"].lower().partition("x")
        if not (sep and width.strip().isdigit() and height.strip().isdigit()):
            raise ValueError(f"Size: {settings['Size']!r} is not WIDTHxHEIGHT")
        fields["width"], fields["height"] = int(width), int(height)
    return fields
