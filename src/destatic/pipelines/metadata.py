"""Generation parameters stored in the PNG itself, so an image says how to make it again.

Two text chunks, as AUTOMATIC1111 and ComfyUI do:

* ``parameters``: the A1111 text (prompt, ``Negative prompt: …``, then ``Steps: 20, Sampler:
  …, CFG scale: …, Seed: …, Size: WxH, Model: …``), which other tools and image viewers show;
* ``destatic``: the same as JSON, which :func:`read_params` reads back exactly
  (``destatic generate --from image.png``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GenerationParams", "png_info", "read_params"]

CHUNK = "destatic"


@dataclass
class GenerationParams:
    """Everything that determines one generated image (with the model's weights)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "dpmpp_2m"
    grid: str | None = None
    guidance: float = 3.0
    seed: int = 0
    width: int | None = None
    height: int | None = None
    model: str = ""  # the folder it came from ("" = the bundled default model)
    image: str = ""  # image → image / inpainting: the input image's path
    strength: float = 1.0
    mask: str = ""  # inpainting: the mask's path (white = repaint)
    variation_seed: int | None = None  # A1111's "variation seed"
    variation_strength: float = 0.0
    controlnet: str = ""  # structural control: the ControlNet folder
    control_image: str = ""  # its control image (or, with control_canny, the image to trace)
    control_canny: bool = False  # trace Canny edges of control_image first
    control_scale: float = 1.0
    control_start: float = 0.0
    control_end: float = 1.0
    loras: list = field(default_factory=list)  # [[file or folder, scale], …] LoRA adapters

    def a1111(self) -> str:
        """The A1111 ``parameters`` text."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.sampler}",
            f"Schedule type: {self.grid or 'default'}",
            f"CFG scale: {self.guidance:g}",
            f"Seed: {self.seed}",
        ]
        if self.width and self.height:
            fields.append(f"Size: {self.width}x{self.height}")
        if self.variation_strength:
            fields.append(f"Variation seed: {self.variation_seed}")
            fields.append(f"Variation seed strength: {self.variation_strength:g}")
        if self.image:
            fields.append(f"Denoising strength: {self.strength:g}")
        if self.controlnet:
            fields.append(
                f"ControlNet: {Path(self.controlnet).name} (weight {self.control_scale:g}, "
                f"steps {self.control_start:g}-{self.control_end:g}"
                + (", canny)" if self.control_canny else ")")
            )
        if self.loras:
            named = ", ".join(f"{Path(p).stem}:{float(s):g}" for p, s in self.loras)
            fields.append(f"LoRA: {named}")
        fields.append(f"Model: {Path(self.model).name if self.model else 'destatic default'}")
        return "\n".join([*lines, ", ".join(fields)])

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`Pipeline.__call__` that reproduce the image (input
        image and mask read from their paths)."""
        extra: dict[str, Any] = {}
        if self.image:
            extra = {"image": _open(self.image, "RGB"), "strength": self.strength}
            if self.mask:
                extra["mask"] = _open(self.mask, "L")
                extra["keep_unmasked"] = True  # the kept pixels come back as they were
        if self.controlnet:
            from destatic.checkpoints import load_component

            image = _open(self.control_image, "RGB")
            if self.control_canny:
                import numpy as np
                from PIL import Image

                from destatic.data.edges import canny_edges

                image = Image.fromarray(canny_edges(np.asarray(image)))
            extra.update(
                controlnet=load_component(self.controlnet),
                control_image=image,
                control_scale=self.control_scale,
                control_start=self.control_start,
                control_end=self.control_end,
            )
        if self.variation_strength:
            extra["variation_seed"] = self.variation_seed
            extra["variation_strength"] = self.variation_strength
        return {
            **extra,
            "negative_prompt": self.negative_prompt or None,
            "steps": self.steps,
            "sampler": self.sampler,
            "grid": self.grid,
            "guidance": self.guidance,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
        }


def _open(path: str, mode: str):
    """A PIL image in ``mode``, or a ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e})") from None


def png_info(params: GenerationParams):
    """A ``PIL.PngImagePlugin.PngInfo`` holding both chunks; pass it as ``pnginfo=``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("parameters", params.a1111())
    info.add_itxt(CHUNK, json.dumps(dataclasses.asdict(params), sort_keys=True))
    return info


def read_params(path: str | Path) -> GenerationParams:
    """The parameters a destatic PNG was generated with; a clear ValueError otherwise."""
    path = Path(path)
    text = _open(str(path), "RGB").info.get(CHUNK)
    if text is None:
        raise ValueError(
            f"{path} carries no destatic generation parameters (only PNGs written by "
            "destatic generate do)"
        )
    try:
        raw = json.loads(text)
        names = {f.name for f in dataclasses.fields(GenerationParams)}
        return GenerationParams(**{k: v for k, v in raw.items() if k in names})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: its destatic parameters are damaged ({e})") from None
