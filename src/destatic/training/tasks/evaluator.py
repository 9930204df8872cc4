"""Evaluator training (``[train] task = "evaluator"``): the contrastive image–text model that
scores prompt adherence (:mod:`destatic.models.evaluator`; its scores:
:mod:`destatic.metrics.evaluator`). Each image is scored against every train caption
(:func:`~destatic.models.evaluator.caption_loss`), shifted by up to ``[evaluator] shift`` pixels
(padding with the corner colour, the background)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.models.evaluator import CLASS_NAME, EvaluatorConfig, ImageTextModel, caption_loss
from destatic.models.registry import save_component
from destatic.models.text import MiniLMTextEncoder
from destatic.training.config import Config, ConfigError, require
from destatic.training.data import CaptionBank, load_training_images, pixels
from destatic.training.tasks.base import Batch, Task, evaluating, network_config, register

__all__ = ["EvaluatorTask", "EvaluatorTrainConfig"]


@dataclass
class EvaluatorTrainConfig:
    """The ``[evaluator]`` table."""

    config: dict[str, Any] = field(default_factory=dict)  # EvaluatorConfig fields
    shift: int = 2  # augmentation: random translation by up to this many pixels

    def check(self) -> None:
        require(0 <= self.shift <= 16, f"evaluator.shift = {self.shift}: use 0 … 16 pixels")


@register
class EvaluatorTask(Task):
    """Contrastive image–text model on the train split's images and captions (module doc)."""

    name = "evaluator"
    section = EvaluatorTrainConfig

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.cfg = cfg
        data = load_training_images(cfg.data, progress=progress)
        self.images = torch.from_numpy(data.images)
        fields = {"image_size": cfg.data.size, **cfg.evaluator.config}
        config = network_config(EvaluatorConfig, fields, "evaluator.config")
        self.text_encoder = MiniLMTextEncoder.from_package(max_length=config.text_max_length)
        flat = [c for caps in data.captions for c in caps]
        self.bank = CaptionBank(self.text_encoder, flat, progress=progress)
        ids = [self.bank.ids(caps) for caps in data.captions]
        # positives[i, k]: caption k (bank index k + 1; 0 is "") belongs to image i
        self.positives = torch.zeros(len(ids), len(self.bank) - 1, dtype=torch.bool)
        for i, row in enumerate(ids):
            self.positives[i, row - 1] = True
        self.heldout = load_training_images(cfg.data, progress=progress, split="heldout")
        # the held-out main captions: the candidates the sample grids pick from
        self.candidates = list(dict.fromkeys(caps[0] for caps in self.heldout.captions))
        self.heldout_bank = CaptionBank(self.text_encoder, self.candidates, progress=progress)
        config_side = config.image_size
        if config_side != cfg.data.size:
            raise ConfigError(
                f"evaluator.config.image_size = {config_side} differs from data.size = "
                f"{cfg.data.size}; train the evaluator at the data's size"
            )
        self.trainable = ImageTextModel(config)

    @property
    def num_items(self) -> int:
        return len(self.images)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        s = self.cfg.evaluator.shift
        shifts = torch.randint(-s, s + 1, (len(index), 2), generator=generator)
        return {"x": _shifted(pixels(self.images[index]), shifts), "index": index}

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        logits = model(batch["x"].to(device), self.bank.pooled[1:].to(device))
        return caption_loss(logits, self.positives[batch["index"]].to(device))

    def export(self, trainable: nn.Module, folder: Path) -> None:
        save_component(trainable, folder, class_name=CLASS_NAME, config=trainable.config.to_dict())

    @torch.no_grad()
    def sample_grid(self, trainable: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """Held-out images labelled with the best of the held-out captions ("ok" when right)."""
        n = min(16, len(self.heldout))
        if n == 0:
            return torch.zeros(0, 3, cfg.data.size, cfg.data.size), []
        held = torch.from_numpy(self.heldout.images[:n])
        with evaluating(trainable):
            device = next(trainable.parameters()).device
            images = trainable.encode_images(pixels(held).to(device))
            captions = self.heldout_bank.pooled[self.heldout_bank.ids(self.candidates)]
            texts = trainable.encode_text(captions.to(device))
        best = [self.candidates[int(i)] for i in (images @ texts.T).argmax(dim=1)]
        own = [caps[0] for caps in self.heldout.captions[:n]]
        labels = [f"ok: {b}" if b == o else f"{b} (is {o})" for b, o in zip(best, own, strict=True)]
        return held.permute(0, 3, 1, 2).float() / 255, labels


def _shifted(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each image [C, H, W] by (dy, dx) pixels, filling with its top-left colour."""
    out = x[:, :, :1, :1].expand_as(x).clone()
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(shifts.tolist()):
        src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
        src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
        out[i, :, dst_y, dst_x] = x[i, :, src_y, src_x]
    return out
