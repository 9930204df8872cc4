"""Prompt adherence without CLIP weights: scores from the small contrastive image–text model
trained here (the network and its loss: :mod:`destatic.models.evaluator`).

Its uses, on images in [0, 1]:

* ``clip_score``: 100 · max(cos(f(x), g(prompt)), 0), the CLIPScore of Hessel et al. (2021)
  with this model in place of CLIP;
* ``retrieval``: is an image's own prompt the best match among a set of candidate prompts (top-1
  and top-5 accuracy). On real held-out images this is the ceiling a generator can reach.

An evaluator is saved as a component folder (``config.json`` + safetensors weights).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from destatic.bundled import DEFAULT_EVALUATOR
from destatic.models.evaluator import CLASS_NAME, EvaluatorConfig, ImageTextModel, caption_loss

__all__ = [
    "Evaluator",
    "EvaluatorConfig",
    "ImageTextModel",
    "Retrieval",
    "caption_loss",
    "is_evaluator_folder",
    "load_evaluator",
    "load_image_text_model",
    "save_evaluator",
]


@dataclass
class Retrieval:
    """Prompt retrieval: how often an image's own prompt is the best (top-k) candidate."""

    top1: float
    top5: float
    chance: float  # top-1 accuracy of a random guess: 1 / number of candidates
    n: int


def _as_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] → [-1, 1] at ``size``², quantised to 8 bits like a saved PNG."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    x = (images.float().clamp(0, 1) * 255).round() / 255
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x * 2 - 1


class Evaluator:
    """An :class:`ImageTextModel` with its text encoder: the user-facing scorer."""

    def __init__(self, model: ImageTextModel, text_encoder: nn.Module | None = None):
        if text_encoder is None:
            from destatic.models.text import MiniLMTextEncoder

            text_encoder = MiniLMTextEncoder.from_package(max_length=model.config.text_max_length)
        self.model = model.eval()
        self.text_encoder = text_encoder.to(next(model.parameters()).device)
        if text_encoder.pooled_dim != model.config.text_dim:
            raise ValueError(
                f"the text encoder's pooled width {text_encoder.pooled_dim} does not match the "
                f"evaluator's text_dim {model.config.text_dim}"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Unit image vectors [B, E] for images [B, 3, H, W] in [0, 1] (any size)."""
        size = self.model.config.image_size
        out = [
            self.model.encode_images(_as_pixels(images[i : i + batch_size], size).to(self.device))
            for i in range(0, len(images), batch_size)
        ]
        if not out:
            raise ValueError("no images to score")
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unit text vectors [K, E] for prompts."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts to score")
        out = []
        for i in range(0, len(prompts), batch_size):
            pooled = self.text_encoder.encode(prompts[i : i + batch_size]).pooled
            out.append(self.model.encode_text(pooled.to(self.device).float()))
        return torch.cat(out).float().cpu()

    def similarity(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity [B] of each image with its own prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)

    def clip_score(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        """Mean of 100 · max(cos, 0) over image–prompt pairs (CLIPScore, Hessel et al. 2021)."""
        return float(100 * self.similarity(images, prompts).clamp(min=0).mean())

    def ranks(
        self, images: torch.Tensor, prompts: Sequence[str], candidates: Sequence[str]
    ) -> torch.Tensor:
        """Rank [B] of each image's own prompt among ``candidates`` by similarity (0: best)."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        names = list(dict.fromkeys(candidates))
        index = {c: i for i, c in enumerate(names)}
        missing = [p for p in prompts if p not in index]
        if missing:
            raise ValueError(f"prompt {missing[0]!r} is not among the candidates")
        scores = self.image_features(images) @ self.text_features(names).T
        own = scores[torch.arange(len(prompts)), torch.tensor([index[p] for p in prompts])]
        return (scores > own[:, None]).sum(dim=1)

    def retrieval(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        candidates: Sequence[str] | None = None,
    ) -> Retrieval:
        """Top-1 / top-5 accuracy of finding each image's prompt among ``candidates`` (default:
        the distinct prompts given)."""
        names = list(dict.fromkeys(candidates if candidates is not None else prompts))
        rank = self.ranks(images, prompts, names)
        return Retrieval(
            top1=float((rank < 1).float().mean()),
            top5=float((rank < 5).float().mean()),
            chance=1 / len(names),
            n=len(prompts),
        )


def save_evaluator(
    model: ImageTextModel, folder: str | Path, dtype: torch.dtype | None = None
) -> None:
    """``config.json`` + safetensors weights, in the component-folder layout."""
    from destatic.models.registry import save_component

    save_component(model, folder, class_name=CLASS_NAME, config=model.config.to_dict(), dtype=dtype)


def is_evaluator_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved :class:`ImageTextModel`."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("_class_name") == CLASS_NAME
    except (OSError, ValueError, AttributeError):
        return False


def load_evaluator(
    folder: str | Path | None = None, device: str | torch.device = "cpu"
) -> Evaluator:
    """The evaluator in ``folder`` (default: the bundled emoji evaluator)."""
    folder = DEFAULT_EVALUATOR if folder is None else folder
    return Evaluator(load_image_text_model(folder).to(device))


def load_image_text_model(folder: str | Path) -> ImageTextModel:
    """The bare :class:`ImageTextModel` of an evaluator folder, in float32."""
    from destatic.io import CheckpointError, load_weights, read_json
    from destatic.models.registry import load_into

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} is not an evaluator folder (no config.json)")
    raw = read_json(config_path)
    if raw.pop("_class_name", None) != CLASS_NAME:
        raise CheckpointError(f"{config_path} is not an {CLASS_NAME} config")
    try:
        config = EvaluatorConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    model = ImageTextModel(config)
    load_into(model, load_weights(folder), where=str(folder))
    return model.eval()
