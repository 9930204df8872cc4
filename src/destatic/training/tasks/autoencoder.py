"""Autoencoder training (``[train] task = "autoencoder"``): the KL autoencoder of a latent space.

Reconstruction (L1 or MSE) + kl_weight · KL(q(z|x) ‖ N(0, I)), and with ``adversarial_weight``
> 0 from step ``adversarial_start`` on, a PatchGAN (LDM's recipe with a fixed weight instead of
its adaptive one):

    L_AE = rec + kl_weight · KL − adversarial_weight · mean D(x̂),
    L_D = ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂))),

both in one loss, one backward and one optimizer: D sees x̂ detached in L_D, and L_AE sees D
through detached parameters, so each term only trains its own network.

The KL term is summed over latent elements and divided by the number of pixel values, so
kl_weight is comparable across sizes (LDM's weights are of order 1e-6 with summed terms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.models.autoencoder import AutoencoderConfig, AutoencoderKL
from destatic.models.discriminator import PatchDiscriminator, adversarial_loss, critic_logits
from destatic.models.registry import save_component
from destatic.training.config import Config, ConfigError, choice, require
from destatic.training.data import load_training_images, pixels
from destatic.training.tasks.base import Batch, Task, evaluating, network_config, register

__all__ = [
    "AdversarialOptions",
    "AutoencoderTask",
    "AutoencoderTrainConfig",
    "reconstruction_grid",
]


@dataclass
class AdversarialOptions:
    """The optional PatchGAN term of a reconstruction task's table (``[autoencoder]``,
    ``[tokenizer]``)."""

    adversarial_weight: float = 0.0  # weight of the PatchGAN generator term; 0 = off
    adversarial_start: int = 0  # step from which the adversarial terms count (LDM: disc_start)
    discriminator_channels: int = 64
    discriminator_layers: int = 3  # stride-2 convolutions: patches of about 2^(layers+2) px

    def check_adversarial(self, table: str) -> None:
        require(
            self.adversarial_weight >= 0,
            f"{table}.adversarial_weight = {self.adversarial_weight}: use ≥ 0 (0 = off)",
        )
        require(
            self.adversarial_start >= 0,
            f"{table}.adversarial_start = {self.adversarial_start}: use ≥ 0",
        )
        require(
            self.discriminator_channels >= 1 and 1 <= self.discriminator_layers <= 6,
            f"{table}.discriminator_channels must be ≥ 1 and discriminator_layers 1 … 6",
        )

    def discriminator(self, in_channels: int = 3) -> PatchDiscriminator | None:
        """The critic these options ask for (None when ``adversarial_weight`` is 0)."""
        if self.adversarial_weight <= 0:
            return None
        return PatchDiscriminator(
            in_channels, self.discriminator_channels, self.discriminator_layers
        )


@dataclass
class AutoencoderTrainConfig(AdversarialOptions):
    """The ``[autoencoder]`` table."""

    config: dict[str, Any] = field(default_factory=dict)  # AutoencoderConfig fields
    reconstruction: str = "l1"  # l1 | mse
    kl_weight: float = 1e-6

    def check(self) -> None:
        choice("autoencoder.reconstruction", self.reconstruction, ("l1", "mse"))
        require(self.kl_weight >= 0, f"autoencoder.kl_weight = {self.kl_weight}: use ≥ 0")
        self.check_adversarial("autoencoder")


@register
class AutoencoderTask(Task):
    """KL autoencoder, optionally with a PatchGAN critic (module doc)."""

    name = "autoencoder"
    section = AutoencoderTrainConfig

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.cfg = cfg
        data = load_training_images(cfg.data, progress=progress)
        self.images = torch.from_numpy(data.images)
        fields = {"sample_size": cfg.data.size, **cfg.autoencoder.config}
        config = network_config(AutoencoderConfig, fields, "autoencoder.config")
        factor = 2 ** (len(config.block_out_channels) - 1)
        if cfg.data.size % factor:
            raise ConfigError(
                f"data.size = {cfg.data.size} is not a multiple of the autoencoder's factor "
                f"{factor}"
            )
        discriminator = cfg.autoencoder.discriminator()
        self.trainable = _Reconstruction(AutoencoderKL(config), discriminator)

    @property
    def num_items(self) -> int:
        return len(self.images)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        x = pixels(self.images[index])
        config = self.trainable.autoencoder.config
        f = 2 ** (len(config.block_out_channels) - 1)
        c = config.latent_channels
        eps = torch.randn((len(index), c, x.shape[-2] // f, x.shape[-1] // f), generator=generator)
        return {"x": x, "eps": eps}

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        a = self.cfg.autoencoder
        x = batch["x"].to(device)
        recon, kl, critic = model(x, batch["eps"].to(device))
        diff = recon.float() - x
        per = diff.abs() if a.reconstruction == "l1" else diff.pow(2)
        loss = per.flatten(1).mean(1) + a.kl_weight * kl.float() / x[0].numel()
        if critic is None:
            return loss
        on = float(self.step >= a.adversarial_start)  # 0: the terms (and D's updates) wait
        return loss + on * adversarial_loss(critic, a.adversarial_weight)

    @torch.no_grad()
    def export(self, trainable: nn.Module, folder: Path) -> None:
        """Save with ``scaling_factor`` = 1/std of the latent means over the data (as SD did)."""
        trainable = trainable.autoencoder
        with evaluating(trainable):
            device = next(trainable.parameters()).device
            means = [
                trainable.encode(pixels(self.images[i : i + 64]).to(device)).mean.float().cpu()
                for i in range(0, min(len(self.images), 1024), 64)
            ]
            std = float(torch.cat(means).std())
            config = trainable.config.to_dict()
            config["scaling_factor"] = 1.0 / std if std > 0 and math.isfinite(std) else 1.0
            save_component(trainable, folder, class_name="AutoencoderKL", config=config)

    def sample_grid(self, trainable: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """Originals (top row) above their reconstructions."""
        return reconstruction_grid(trainable.autoencoder, self.images)


def reconstruction_grid(
    model: nn.Module, images: torch.Tensor, n: int = 8
) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` of ``images`` (uint8 NHWC) in a top row above ``model(x)``, their
    reconstructions, in [0, 1], with labels; ``model`` is run in eval mode."""
    n = min(n, len(images))
    with evaluating(model), torch.no_grad():
        device = next(model.parameters()).device
        x = pixels(images[:n]).to(device)
        recon = model(x).float().cpu()
    grid = torch.cat([x.cpu(), recon]) / 2 + 0.5
    return grid.clamp(0, 1), ["original"] * n + ["reconstruction"] * n


class _Reconstruction(nn.Module):
    """The autoencoder (and its discriminator) as one forward pass, so DDP sees every
    parameter: x, ε → (reconstruction, KL, None or the critic's logits (D(x̂) through detached
    D parameters, D(x), D(x̂ detached)))."""

    def __init__(self, autoencoder: AutoencoderKL, discriminator: nn.Module | None = None):
        super().__init__()
        self.autoencoder = autoencoder
        self.discriminator = discriminator

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        post = self.autoencoder.encode(x)
        z = post.mean + post.std * eps.to(post.mean.dtype)
        recon = self.autoencoder.decode(z)
        if self.discriminator is None:
            return recon, post.kl(), None
        return recon, post.kl(), critic_logits(self.discriminator, x, recon)
