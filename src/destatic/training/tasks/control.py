"""ControlNet training (``[train] task = "control"``): a ControlNet for a trained pipeline
(``[control] base``), on Canny edge maps of the training images. The base network is frozen and
only the ControlNet (:mod:`destatic.models.controlnet`, initialised as a copy of its encoder,
zero convolutions out) learns, with the base's own objective."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from destatic.data.edges import canny_edges
from destatic.models.controlnet import ControlNet
from destatic.models.registry import save_component
from destatic.models.unet import UNet2DCondition
from destatic.pipelines import load
from destatic.training.config import Config, ConfigError, require
from destatic.training.data import load_training_images
from destatic.training.tasks.base import Batch, evaluating, register
from destatic.training.tasks.denoiser import DenoiserTask

__all__ = ["ControlTask", "ControlTrainConfig"]


@dataclass
class ControlTrainConfig:
    """The ``[control]`` table."""

    base: str = ""  # the pipeline folder it steers ("" = the bundled default model)
    conditioning_embedding_out_channels: list[int] = field(default_factory=lambda: [16])
    edges_sigma: float = 1.0  # Canny's Gaussian blur, in pixels

    def check(self) -> None:
        require(
            len(self.conditioning_embedding_out_channels) >= 1
            and all(c >= 1 for c in self.conditioning_embedding_out_channels),
            "control.conditioning_embedding_out_channels needs positive widths",
        )
        require(self.edges_sigma > 0, f"control.edges_sigma = {self.edges_sigma}: use > 0")


@register
class ControlTask(DenoiserTask):
    """A ControlNet steering the frozen U-Net of ``[control] base`` (module doc)."""

    name = "control"
    section = ControlTrainConfig

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.base = load(cfg.control.base or None)
        if not isinstance(self.base.network, UNet2DCondition):
            raise ConfigError("control.base must be a U-Net pipeline (ControlNets steer U-Nets)")
        self.base.network.to(device).requires_grad_(False).eval()
        super().__init__(cfg, device, progress)
        if self.autoencoder is None and cfg.data.size != self.base.default_size:
            raise ConfigError(
                f"data.size = {cfg.data.size} but the base model draws {self.base.default_size}²"
            )
        edges = canny_edges(self.data.images, sigma=cfg.control.edges_sigma)
        self.edges = torch.from_numpy(edges)  # uint8 NHWC
        self.pipeline = self.base

    def _text_encoder(self):
        return self.base.text_encoder

    def _autoencoder(self, device: torch.device):
        return self.base.autoencoder

    def _network(self, channels: int, side: int, device: torch.device) -> nn.Module:
        widths = tuple(self.cfg.control.conditioning_embedding_out_channels)
        factor = 2 ** (len(widths) - 1)
        if factor != self.base.latent_factor:
            raise ConfigError(
                f"control.conditioning_embedding_out_channels has {len(widths)} entries "
                f"({factor}× down) but the base's latents are {self.base.latent_factor}× smaller "
                f"than its images: use {int(math.log2(self.base.latent_factor)) + 1} entries"
            )
        return ControlNet.from_unet(self.base.network, conditioning_embedding_out_channels=widths)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        batch = super().draw(index, generator)
        batch["control"] = self.edges[index].permute(0, 3, 1, 2).float() / 255
        return batch

    def _denoiser_net(self, model: nn.Module, batch: Batch, device: torch.device):
        unet, control = self.base.network, batch["control"].to(device)

        def steered(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return unet(x, t, context, control=model(x, t, context, control))

        return steered

    def export(self, trainable: nn.Module, folder: Path) -> None:
        save_component(
            trainable, folder, class_name="ControlNetModel", config=trainable.config.to_dict()
        )

    def sample_grid(self, trainable: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """Held-out edge maps (top row) above what the base draws from them and their captions."""
        held = load_training_images(cfg.data, progress=False, split="heldout")
        n = min(8, len(held))
        edges = torch.from_numpy(canny_edges(held.images[:n], sigma=cfg.control.edges_sigma))
        edges = edges.permute(0, 3, 1, 2).float() / 255
        prompts = [caps[0] for caps in held.captions[:n]]
        s = cfg.sample
        with evaluating(trainable):
            request = s.request(prompt=prompts, controlnet=trainable, control_image=edges)
            images = self.base.run(request)
        return torch.cat([edges, images.cpu()]), ["edges"] * n + prompts
