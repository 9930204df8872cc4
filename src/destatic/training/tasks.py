"""What is being trained: a text-conditioned denoiser, the autoencoder of a latent space, or the
image–text evaluator that scores prompt adherence (:mod:`destatic.metrics.evaluator`).

A task owns its model and data and answers three questions for the loop in
:mod:`destatic.training.trainer`: what a step's global batch is (:meth:`Task.draw`, every random
number drawn up front from one generator, so any split over processes and accumulation steps
sees the same batch), what the per-sample loss of a slice of it is (:meth:`Task.loss`), and how
the trained weights are exported for inference (:meth:`Task.export`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.models.autoencoder import AutoencoderConfig, AutoencoderKL
from destatic.models.mmdit import MMDiT, MMDiTConfig
from destatic.models.text import MiniLMTextEncoder
from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.pipelines.text_to_image import Pipeline
from destatic.training.config import Config, ConfigError
from destatic.training.data import CaptionBank, LatentCache, load_training_images, pixels
from destatic.training.objectives import OBJECTIVES

__all__ = [
    "AutoencoderTask",
    "ControlTask",
    "DenoiserTask",
    "EvaluatorTask",
    "Task",
    "make_task",
]

Batch = dict[str, torch.Tensor]


class Task(ABC):
    model: nn.Module
    step: int = 0  # the optimizer step being taken; the loop sets it before each draw()

    @abstractmethod
    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        """The global batch for dataset rows ``index`` (CPU tensors, one row per sample)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        """Per-sample loss [b] for a slice of a batch from :meth:`draw`."""

    @abstractmethod
    def export(self, weights: nn.Module, folder: Path) -> None:
        """Write ``weights`` (the EMA or raw model) as an inference folder."""

    @property
    @abstractmethod
    def num_items(self) -> int: ...

    @abstractmethod
    def sample_grid(self, weights: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """Images [B, 3, H, W] in [0, 1] and their labels, for progress grids."""


def _parse_config(cls: Any, fields: dict[str, Any], where: str) -> Any:
    try:
        return cls.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{where}]: {e}") from e


class DenoiserTask(Task):
    """Text → image denoiser in pixel space or in a frozen autoencoder's latent space."""

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
        self.model = self._network(channels, side, device)
        self.pipeline = Pipeline(
            self.model,
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
        from destatic.checkpoints import load_component

        return load_component(self.cfg.model.autoencoder).to(device).eval()

    def _network(self, channels: int, side: int, device: torch.device) -> nn.Module:
        m = self.cfg.model
        inputs = 2 * channels + 1 if m.inpainting else channels
        dims = {"in_channels": inputs, "sample_size": side}
        if m.kind == "unet":
            fields = {**m.unet, **dims, "out_channels": channels}
            fields.setdefault("cross_attention_dim", self.text_encoder.dim)
            net: nn.Module = UNet2DCondition(_parse_config(UNetConfig, fields, "model.unet"))
        else:
            fields = {**m.mmdit, **dims, "out_channels": channels}
            fields.setdefault("joint_attention_dim", self.text_encoder.dim)
            fields.setdefault("pooled_projection_dim", self.text_encoder.pooled_dim)
            net = MMDiT(_parse_config(MMDiTConfig, fields, "model.mmdit"))
        if m.init:
            _initialise_from(net, m.init)
        return net

    @property
    def num_items(self) -> int:
        return len(self.caption_ids)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        n = len(index)
        choice = torch.rand(n, generator=generator)
        captions = torch.stack(
            [ids[int(c * len(ids))] for ids, c in zip(self._ids(index), choice, strict=True)]
        )
        drop = torch.rand(n, generator=generator) < self.cfg.data.caption_dropout
        captions = torch.where(drop, torch.zeros_like(captions), captions)  # 0 = ""
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
        if isinstance(self.model, MMDiT):
            cond["pooled"] = self.bank.pooled[caption].to(device)
        return cond

    def _denoiser_net(self, model: nn.Module, batch: Batch, device: torch.device):
        """The network the objective regresses: the trained model, with an inpainting model's
        mask and masked-image inputs bound."""
        if not self.cfg.model.inpainting:
            return model
        from destatic.pipelines.text_to_image import InpaintingInputs

        image = batch["pixels"].to(device) / 2 + 0.5  # [0, 1]
        mask = batch["mask"].to(device)
        extra = self.pipeline._inpainting_inputs(image, mask, len(image), image.shape[-2:])
        return InpaintingInputs(model, extra.float())

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        return self.objective.loss(
            self._denoiser_net(model, batch, device),
            batch["x0"].to(device),
            self.conditioning(batch["caption"], device),
            sigma=batch["sigma"],
            noise=batch["noise"],
        )

    def _pipeline(self, weights: nn.Module) -> Pipeline:
        p = self.pipeline
        # the scale the sample grids were drawn at becomes the model's default guidance, so the
        # Python API and the CLI agree on it (without one they fall back to 5 and 3)
        defaults = {"guidance": self.cfg.sample.guidance}
        return Pipeline(weights, p.autoencoder, p.text_encoder, p.process, p.target, defaults)

    def export(self, weights: nn.Module, folder: Path) -> None:
        from destatic.pipelines.load import save

        save(self._pipeline(weights), folder)

    def sample_grid(self, weights: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        s = cfg.sample
        was_training = weights.training
        weights.eval()
        try:
            images = self._pipeline(weights).generate(s.prompts, **s.settings(), seed=s.seed)
        finally:
            weights.train(was_training)
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
    import destatic

    source = destatic.load(folder).network.state_dict()
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


class ControlTask(DenoiserTask):
    """A ControlNet for a trained pipeline (``control.base``), on Canny edge maps of the
    training images: the base network is frozen and only the ControlNet (initialised as a copy
    of its encoder, zero convolutions out) learns, with the base's own objective."""

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        import destatic

        self.base = destatic.load(cfg.control.base or None)
        if not isinstance(self.base.network, UNet2DCondition):
            raise ConfigError("control.base must be a U-Net pipeline (ControlNets steer U-Nets)")
        self.base.network.to(device).requires_grad_(False).eval()
        super().__init__(cfg, device, progress)
        from destatic.data.edges import canny_edges

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
        from destatic.models.controlnet import ControlNet

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

    def export(self, weights: nn.Module, folder: Path) -> None:
        from destatic.checkpoints import save_component

        save_component(
            weights, folder, class_name="ControlNetModel", config=weights.config.to_dict()
        )

    def sample_grid(self, weights: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """Held-out edge maps (top row) above what the base draws from them and their captions."""
        from destatic.data.edges import canny_edges

        held = load_training_images(cfg.data, progress=False, split="heldout")
        n = min(8, len(held))
        edges = torch.from_numpy(canny_edges(held.images[:n], sigma=cfg.control.edges_sigma))
        edges = edges.permute(0, 3, 1, 2).float() / 255
        prompts = [caps[0] for caps in held.captions[:n]]
        s = cfg.sample
        was_training = weights.training
        weights.eval()
        try:
            images = self.base.generate(
                prompts, **s.settings(), seed=s.seed, controlnet=weights, control_image=edges
            )
        finally:
            weights.train(was_training)
        return torch.cat([edges, images.cpu()]), ["edges"] * n + prompts


class AutoencoderTask(Task):
    """KL autoencoder: reconstruction (L1 or MSE) + kl_weight · KL(q(z|x) ‖ N(0, I)), and with
    ``adversarial_weight`` > 0 from step ``adversarial_start`` on, a PatchGAN (LDM's recipe with
    a fixed weight instead of its adaptive one):

        L_AE = rec + kl_weight · KL − adversarial_weight · mean D(x̂),
        L_D = ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂))),

    both in one loss, one backward and one optimizer: D sees x̂ detached in L_D, and L_AE sees D
    through detached parameters, so each term only trains its own network.

    The KL term is summed over latent elements and divided by the number of pixel values, so
    kl_weight is comparable across sizes (LDM's weights are of order 1e-6 with summed terms).
    """

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.cfg = cfg
        data = load_training_images(cfg.data, progress=progress)
        self.images = torch.from_numpy(data.images)
        fields = {"sample_size": cfg.data.size, **cfg.autoencoder.config}
        config = _parse_config(AutoencoderConfig, fields, "autoencoder.config")
        factor = 2 ** (len(config.block_out_channels) - 1)
        if cfg.data.size % factor:
            raise ConfigError(
                f"data.size = {cfg.data.size} is not a multiple of the autoencoder's factor "
                f"{factor}"
            )
        a = cfg.autoencoder
        discriminator = None
        if a.adversarial_weight > 0:
            from destatic.models.discriminator import PatchDiscriminator

            discriminator = PatchDiscriminator(3, a.discriminator_channels, a.discriminator_layers)
        self.model = _Reconstruction(AutoencoderKL(config), discriminator)

    @property
    def num_items(self) -> int:
        return len(self.images)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        x = pixels(self.images[index])
        config = self.model.autoencoder.config
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
        from destatic.models.discriminator import hinge_discriminator_loss

        on = float(self.step >= a.adversarial_start)  # 0: the terms (and D's updates) wait
        fake_for_ae, real, fake = (c.float() for c in critic)
        loss = loss - on * a.adversarial_weight * fake_for_ae.flatten(1).mean(1)
        return loss + on * hinge_discriminator_loss(real, fake)

    @torch.no_grad()
    def export(self, weights: nn.Module, folder: Path) -> None:
        """Save with ``scaling_factor`` = 1/std of the latent means over the data (as SD did)."""
        from destatic.checkpoints import save_component

        weights = weights.autoencoder
        was_training = weights.training
        weights.eval()
        device = next(weights.parameters()).device
        means = [
            weights.encode(pixels(self.images[i : i + 64]).to(device)).mean.float().cpu()
            for i in range(0, min(len(self.images), 1024), 64)
        ]
        std = float(torch.cat(means).std())
        config = weights.config.to_dict()
        config["scaling_factor"] = 1.0 / std if std > 0 and math.isfinite(std) else 1.0
        save_component(weights, folder, class_name="AutoencoderKL", config=config)
        weights.train(was_training)

    def sample_grid(self, weights: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """Originals (top row) above their reconstructions."""
        ae = weights.autoencoder
        was_training = ae.training
        ae.eval()
        n = min(8, len(self.images))
        with torch.no_grad():
            device = next(ae.parameters()).device
            x = pixels(self.images[:n]).to(device)
            recon = ae(x).float().cpu()
        ae.train(was_training)
        images = torch.cat([x.cpu(), recon]) / 2 + 0.5
        return images.clamp(0, 1), ["original"] * n + ["reconstruction"] * n


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
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        fake_for_ae = torch.func.functional_call(self.discriminator, frozen, (recon,))
        real = self.discriminator(x)
        fake = self.discriminator(recon.detach())
        return recon, post.kl(), (fake_for_ae, real, fake)


class EvaluatorTask(Task):
    """Contrastive image–text model: each image against every train caption (see
    :func:`destatic.metrics.evaluator.caption_loss`), images shifted by up to
    ``evaluator.shift`` pixels (padding with the corner colour, the background)."""

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        from destatic.metrics.evaluator import EvaluatorConfig, ImageTextModel

        self.cfg = cfg
        data = load_training_images(cfg.data, progress=progress)
        self.images = torch.from_numpy(data.images)
        fields = {"image_size": cfg.data.size, **cfg.evaluator.config}
        config = _parse_config(EvaluatorConfig, fields, "evaluator.config")
        self.text_encoder = MiniLMTextEncoder.from_package(max_length=config.text_max_length)
        flat = [c for caps in data.captions for c in caps]
        self.bank = CaptionBank(self.text_encoder, flat, progress=progress)
        ids = [self.bank.ids(caps) for caps in data.captions]
        # positives[i, k]: caption k (bank index k + 1; 0 is "") belongs to image i
        self.positives = torch.zeros(len(ids), len(self.bank) - 1, dtype=torch.bool)
        for i, row in enumerate(ids):
            self.positives[i, row - 1] = True
        self.heldout = load_training_images(cfg.data, progress=progress, split="heldout")
        config_side = config.image_size
        if config_side != cfg.data.size:
            raise ConfigError(
                f"evaluator.config.image_size = {config_side} differs from data.size = "
                f"{cfg.data.size}; train the evaluator at the data's size"
            )
        self.model = ImageTextModel(config)

    @property
    def num_items(self) -> int:
        return len(self.images)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        s = self.cfg.evaluator.shift
        shifts = torch.randint(-s, s + 1, (len(index), 2), generator=generator)
        return {"x": _shifted(pixels(self.images[index]), shifts), "index": index}

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        from destatic.metrics.evaluator import caption_loss

        logits = model(batch["x"].to(device), self.bank.pooled[1:].to(device))
        return caption_loss(logits, self.positives[batch["index"]].to(device))

    def export(self, weights: nn.Module, folder: Path) -> None:
        from destatic.metrics.evaluator import save_evaluator

        save_evaluator(weights, folder)

    def sample_grid(self, weights: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """Held-out images labelled with the best of the held-out captions ("ok" when right)."""
        from destatic.metrics.evaluator import Evaluator

        n = min(16, len(self.heldout))
        if n == 0:
            return torch.zeros(0, 3, cfg.data.size, cfg.data.size), []
        images = torch.from_numpy(self.heldout.images[:n]).permute(0, 3, 1, 2).float() / 255
        candidates = list(dict.fromkeys(caps[0] for caps in self.heldout.captions))
        was_training = weights.training
        evaluator = Evaluator(weights, self.text_encoder)
        scores = evaluator.image_features(images) @ evaluator.text_features(candidates).T
        weights.train(was_training)
        best = [candidates[int(i)] for i in scores.argmax(dim=1)]
        own = [caps[0] for caps in self.heldout.captions[:n]]
        labels = [f"ok: {b}" if b == o else f"{b} (is {o})" for b, o in zip(best, own, strict=True)]
        return images, labels


def _shifted(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each image [C, H, W] by (dy, dx) pixels, filling with its top-left colour."""
    out = x[:, :, :1, :1].expand_as(x).clone()
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(shifts.tolist()):
        src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
        src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
        out[i, :, dst_y, dst_x] = x[i, :, src_y, src_x]
    return out


def make_task(cfg: Config, device: torch.device, progress: bool = True) -> Task:
    if cfg.train.task == "autoencoder":
        return AutoencoderTask(cfg, device, progress)
    if cfg.train.task == "evaluator":
        return EvaluatorTask(cfg, device, progress)
    if cfg.train.task == "control":
        return ControlTask(cfg, device, progress)
    if cfg.train.task in ("lcm", "reflow"):
        from destatic.training.distill import LCMTask, ReflowTask

        return (LCMTask if cfg.train.task == "lcm" else ReflowTask)(cfg, device, progress)
    if cfg.train.task == "lora":
        from destatic.training.lora import LoraTask

        return LoraTask(cfg, device, progress)
    return DenoiserTask(cfg, device, progress)
