"""The text → image denoiser task (``[train] task = "denoiser"``): a U-Net or MMDiT in pixel
space or in a frozen autoencoder's latent space, optionally an inpainting model, trained with
the objective of ``[objective]``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from destatic.models.autoencoder import AutoencoderKL
from destatic.models.mmdit import MMDiT, MMDiTConfig
from destatic.models.registry import load_component
from destatic.models.text import MiniLMTextEncoder
from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.pipelines import Pipeline, load, save
from destatic.training.config import Config, ConfigError
from destatic.training.data import (
    CaptionBank,
    LatentCache,
    draw_captions,
    load_training_images,
    pixels,
)
from destatic.training.objectives import OBJECTIVES
from destatic.training.tasks.base import Batch, Task, evaluating, network_config, register

__all__ = ["DenoiserTask", "random_masks"]


@register
class DenoiserTask(Task):
    """Text → image denoiser in pixel space or in a frozen autoencoder's latent space."""

    name = "denoiser"

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.cfg = cfg
        data = self.data = load_training_images(cfg.data, progress=progress)
        self.text_encoder = self._text_encoder()
        flat = [c for caps in data.captions for c in caps]
        self.bank = CaptionBank(self.text_encoder, flat, progress=progress)
        self.caption_ids = [self.bank.ids(caps) for caps in data.captions]
        self.autoencoder = self._autoencoder(device)
        if self.autoencoder is not None:
            self.autoencoder.requires_grad_(False)
            self.latents: LatentCache | None = LatentCache(
                self.autoencoder, data.images, progress=progress
            )
            self.images = None
            channels, side = self.latents.mean.shape[1], self.latents.mean.shape[-1]
        else:
            self.latents = None
            self.images = torch.from_numpy(data.images)
            channels, side = 3, cfg.data.size
        objective_cls = OBJECTIVES[cfg.objective.kind]
        try:
            self.objective = objective_cls(**cfg.objective.options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[objective]: {e}") from e
        self.trainable = self._network(channels, side, device)
        self.pipeline = Pipeline(
            self.trainable,
            self.autoencoder,
            self.text_encoder,
            self.objective.process,
            self.objective.target,
        )

    def _text_encoder(self) -> MiniLMTextEncoder:
        return MiniLMTextEncoder.from_package(max_length=self.cfg.model.text_max_length)

    def _autoencoder(self, device: torch.device) -> AutoencoderKL | None:
        if not self.cfg.model.autoencoder:
            return None
        return load_component(self.cfg.model.autoencoder).to(device).eval()

    def _network(self, channels: int, side: int, device: torch.device) -> nn.Module:
        m = self.cfg.model
        inputs = 2 * channels + 1 if m.inpainting else channels
        dims = {"in_channels": inputs, "sample_size": side}
        if m.kind == "unet":
            fields = {**m.unet, **dims, "out_channels": channels}
            fields.setdefault("cross_attention_dim", self.text_encoder.dim)
            net: nn.Module = UNet2DCondition(network_config(UNetConfig, fields, "model.unet"))
        else:
            fields = {**m.mmdit, **dims, "out_channels": channels}
            fields.setdefault("joint_attention_dim", self.text_encoder.dim)
            fields.setdefault("pooled_projection_dim", self.text_encoder.pooled_dim)
            net = MMDiT(network_config(MMDiTConfig, fields, "model.mmdit"))
        if m.init:
            _initialise_from(net, m.init)
        return net

    @property
    def num_items(self) -> int:
        return len(self.caption_ids)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        n = len(index)
        captions = draw_captions(self._ids(index), generator, self.cfg.data.caption_dropout)
        sigma = self.objective.sample_sigma(n, generator)
        if self.latents is not None:
            shape = (n, *self.latents.mean.shape[1:])
            x0 = self.latents.draw(index, torch.randn(shape, generator=generator))
        else:
            assert self.images is not None
            x0 = pixels(self.images[index])
        noise = torch.randn(x0.shape, generator=generator)
        batch = {"x0": x0, "caption": captions, "sigma": sigma, "noise": noise}
        if self.cfg.model.inpainting:
            size = self.cfg.data.size
            batch["mask"] = random_masks(n, size, generator)
            pixel_images = self.data.images[index.numpy()]
            batch["pixels"] = pixels(torch.from_numpy(pixel_images))
        return batch

    def _ids(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [self.caption_ids[int(i)] for i in index]

    def conditioning(self, caption: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        cond = {"context": self.bank.tokens[caption].to(device)}
        if isinstance(self.trainable, MMDiT):
            cond["pooled"] = self.bank.pooled[caption].to(device)
        return cond

    def _denoiser_net(self, model: nn.Module, batch: Batch, device: torch.device):
        """The network the objective regresses: the trained model, with an inpainting model's
        mask and masked-image inputs bound."""
        if not self.cfg.model.inpainting:
            return model
        from destatic.pipelines.stages import InpaintingInputs

        image = batch["pixels"].to(device) / 2 + 0.5  # [0, 1]
        mask = batch["mask"].to(device)
        extra = self.pipeline.inpainting_inputs(image, mask, len(image), image.shape[-2:])
        return InpaintingInputs(model, extra.float())

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        return self.objective.loss(
            self._denoiser_net(model, batch, device),
            batch["x0"].to(device),
            self.conditioning(batch["caption"], device),
            sigma=batch["sigma"],
            noise=batch["noise"],
        )

    def _pipeline(self, trainable: nn.Module) -> Pipeline:
        p = self.pipeline
        # the scale and steps the sample grids were drawn at become the model's defaults, so the
        # Python API and the CLI agree on them (without them they fall back to the family's)
        defaults = {"guidance": self.cfg.sample.guidance, "steps": self.cfg.sample.steps}
        return Pipeline(trainable, p.autoencoder, p.text_encoder, p.process, p.target, defaults)

    def export(self, trainable: nn.Module, folder: Path) -> None:
        save(self._pipeline(trainable), folder)

    def sample_grid(self, trainable: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        s = cfg.sample
        with evaluating(trainable):
            images = self._pipeline(trainable).run(s.request())
        return images, list(s.prompts)


def random_masks(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Inpainting training masks [n, 1, size, size] (1 = repaint): a quarter of them everything
    (so the model still draws from text alone, as SD's inpainting model was trained), the rest
    one rectangle with sides of 25–75% of the image at a random place."""
    masks = torch.zeros(n, 1, size, size)
    full = torch.rand(n, generator=generator) < 0.25
    sides = (torch.rand(n, 2, generator=generator) * 0.5 + 0.25) * size
    corner = torch.rand(n, 2, generator=generator)
    for i in range(n):
        if full[i]:
            masks[i] = 1
            continue
        h, w = (int(v) for v in sides[i].round().clamp(min=1))
        top, left = int(corner[i, 0] * (size - h)), int(corner[i, 1] * (size - w))
        masks[i, :, top : top + h, left : left + w] = 1
    return masks


def _initialise_from(net: nn.Module, folder: str) -> None:
    """Copy a pipeline's network weights into ``net``; input channels ``net`` has beyond the
    source's (an inpainting model's mask and masked image) start at zero, so the copy begins
    as the source model."""
    source = load(folder).network.state_dict()
    own = net.state_dict()
    for key, value in source.items():
        if key not in own:
            raise ConfigError(f"model.init = {folder!r}: its network has no {key!r} here")
        target = own[key]
        if target.shape == value.shape:
            target.copy_(value)
        elif key.endswith("weight") and target.ndim == 4 and target.shape[1] > value.shape[1]:
            target.zero_()
            target[:, : value.shape[1]].copy_(value)  # the new input channels stay at zero
        else:
            raise ConfigError(
                f"model.init = {folder!r}: {key} is {tuple(value.shape)} there but "
                f"{tuple(target.shape)} here; use the same [model] sizes"
            )
