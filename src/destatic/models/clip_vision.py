"""CLIP's vision tower as an image encoder for conditioning (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision"): the image-prompt tokens of Wan
2.1 image→video, as diffusers' ``WanImageToVideoPipeline.encode_image`` takes them.

The folder's ``CLIPImageProcessor`` (``image_processor/``: resize the short side, centre crop,
per-channel mean/std) prepares each image; transformers' ``CLIPVisionModel`` (``image_encoder/``)
runs it and the tokens are the hidden states of its **penultimate** layer (all 1 + patches
positions, before the final layer norm): ``hidden_states[-2]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from destatic.models.text import _WEIGHTS, _check_dir, _offline

__all__ = ["CLIPImageEncoder"]


class CLIPImageEncoder(nn.Module):
    """``encode(images)``: images (B, 3, H, W) in [0, 1] → penultimate-layer tokens (B, N, D)
    of ``model`` (a transformers ``CLIPVisionModel``), each image prepared by ``processor``."""

    def __init__(self, model: nn.Module, processor):
        super().__init__()
        self.model = model
        self.processor = processor

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def from_folders(cls, folder: str | Path, torch_dtype: torch.dtype | None = None):
        """Load ``image_encoder/`` (``CLIPVisionModel``) and ``image_processor/`` of a diffusers
        pipeline folder, local files only."""
        from transformers import CLIPImageProcessor, CLIPVisionModel

        folder = Path(folder)
        model_dir = _check_dir(folder / "image_encoder", "CLIP image encoder", _WEIGHTS)
        processor_dir = _check_dir(
            folder / "image_processor", "CLIP image processor", [["preprocessor_config.json"]]
        )
        kwargs = {"local_files_only": True} | ({"dtype": torch_dtype} if torch_dtype else {})
        with _offline():
            model = CLIPVisionModel.from_pretrained(str(model_dir), **kwargs)
            processor = CLIPImageProcessor.from_pretrained(
                str(processor_dir), local_files_only=True
            )
        return cls(model.eval(), processor)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """The processor's input to the tower: each image as 8-bit RGB (as a PIL image holds it)
        resized, cropped and normalised by the folder's ``CLIPImageProcessor``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        rgb = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = [np.ascontiguousarray(x.permute(1, 2, 0).cpu().numpy()) for x in rgb]
        return self.processor(images=arrays, return_tensors="pt").pixel_values

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer hidden states (B, 1 + patches, D) of ``images`` (module doc)."""
        p = next(self.model.parameters())
        pixels = self.pixel_values(images).to(p.device, p.dtype)
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
