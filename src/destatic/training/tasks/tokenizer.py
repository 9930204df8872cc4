"""Tokenizer training (``[train] task = "tokenizer"``): the VQ autoencoder of token models.

The network is :class:`~destatic.models.vq.VQModel`: z = E(x), codes k = argmin_k ‖z − e_k‖,
x̂ = G(e_k). The loss per image (VQ-VAE, van den Oord et al. 2017) is

    L = rec(x̂, x) + β · mean ‖z − sg(e_k)‖²                          (rec: L1 or MSE)

with the straight-through estimator z_q = z + sg(e_k − z), so the decoder's gradient reaches the
encoder as if quantisation were the identity. With ``adversarial_weight`` > 0 the PatchGAN terms
of the autoencoder task are added unchanged (VQGAN, Esser et al. 2021, with a fixed weight).

The codebook is not trained by gradients (its ``requires_grad`` is False) but by exponential
moving averages, online k-means (VQ-VAE appendix; VQ-VAE-2, Razavi et al. 2019): with n_k the
number of vectors assigned to code k in a batch and s_k their sum,

    N_k ← γ·N_k + (1−γ)·n_k,    m_k ← γ·m_k + (1−γ)·s_k,
    e_k = m_k / Ñ_k,            Ñ_k = (N_k + ε) / (Σ_j N_j + K·ε) · Σ_j N_j     (Laplace smoothing).

N and m start at (1, e), as if each code had seen itself once. A code that no vector chose for
``restart_after`` consecutive updates is dead: it is restarted at one of the batch's encoder
outputs with the largest quantisation error ‖z − e_k‖² (the dead codes in index order take the
vectors in decreasing error order; no random numbers), with N = 1 and m = that vector. The
codes start dead, so the first update spreads the codebook over the first batch's encodings.

N, m and the idle counters are buffers of the trained module, so checkpoints hold them and a
resumed run continues exactly. One update is made per micro-batch, in the forward pass (training
mode, gradients enabled); with several processes the counts, sums and restart candidates are
gathered over all of them first, so every copy of the codebook stays identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from destatic.models.discriminator import adversarial_loss, critic_logits
from destatic.models.registry import save_component
from destatic.models.vq import VQConfig, VQModel
from destatic.training.config import Config, ConfigError, choice, require
from destatic.training.data import load_training_images, pixels
from destatic.training.tasks.autoencoder import AdversarialOptions, reconstruction_grid
from destatic.training.tasks.base import Batch, Task, network_config, register

__all__ = ["CodebookEMA", "TokenizerTask", "TokenizerTrainConfig"]

#: ε of the Laplace smoothing of the EMA cluster sizes.
SMOOTHING = 1e-5


@dataclass
class TokenizerTrainConfig(AdversarialOptions):
    """The ``[tokenizer]`` table."""

    config: dict[str, Any] = field(default_factory=dict)  # VQConfig fields
    reconstruction: str = "l1"  # l1 | mse
    commitment: float = 0.25  # β
    codebook_decay: float = 0.99  # γ of the EMA k-means codebook updates
    restart_after: int = 32  # updates without a vector before a code restarts; 0 = never

    def check(self) -> None:
        choice("tokenizer.reconstruction", self.reconstruction, ("l1", "mse"))
        require(self.commitment >= 0, f"tokenizer.commitment = {self.commitment}: use ≥ 0")
        require(
            0 <= self.codebook_decay < 1,
            f"tokenizer.codebook_decay = {self.codebook_decay}: use [0, 1)",
        )
        require(
            self.restart_after >= 0,
            f"tokenizer.restart_after = {self.restart_after}: use ≥ 0 (0 = never)",
        )
        self.check_adversarial("tokenizer")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CodebookEMA(nn.Module):
    """A VQModel (and optional critic) in training: the forward pass quantises with the
    straight-through estimator and, in training mode, moves the codebook (module doc).

    forward(x) → (x̂, commitment per sample mean ‖z − sg(e_k)‖², None or the critic's logits).
    """

    def __init__(
        self,
        vq: VQModel,
        discriminator: nn.Module | None = None,
        *,
        decay: float = 0.99,
        restart_after: int = 32,
    ) -> None:
        super().__init__()
        self.vq = vq
        self.discriminator = discriminator
        self.decay = decay
        self.restart_after = restart_after
        codebook = vq.quantize.embedding.weight
        codebook.requires_grad_(False)
        k = codebook.shape[0]
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("embed_sum", codebook.detach().float().clone())
        self.register_buffer("idle", torch.full((k,), restart_after, dtype=torch.long))

    def forward(self, x: torch.Tensor):
        z = self.vq.encode(x)  # [B, D, h, w]
        b, d, h, w = z.shape
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, d)
        learn = self.training and torch.is_grad_enabled()
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            codes = self.vq.quantize.nearest(flat)
            e = self.vq.quantize.embedding.weight.float()[codes]  # a copy: [B·h·w, D]
            if learn:
                self._update(flat, codes, (flat - e).pow(2).sum(1))
        e = e.view(b, h, w, d).permute(0, 3, 1, 2)
        commitment = (z.float() - e).pow(2).flatten(1).mean(1)
        z_q = z + (e.to(z.dtype) - z).detach()  # straight-through: ∂z_q/∂z = I
        recon = self.vq.decode_latents(z_q)
        if self.discriminator is None:
            return recon, commitment, None
        return recon, commitment, critic_logits(self.discriminator, x, recon)

    def _update(self, flat: torch.Tensor, codes: torch.Tensor, error: torch.Tensor) -> None:
        """One EMA k-means step on encodings ``flat`` [N, D] assigned ``codes`` [N]."""
        k = self.cluster_size.shape[0]
        onehot = F.one_hot(codes, k).float()  # [N, K]: sums by a (deterministic) matmul
        counts, sums = onehot.sum(0), onehot.T @ flat
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + SMOOTHING) / (total + k * SMOOTHING) * total
        weight = self.vq.quantize.embedding.weight
        weight.copy_((self.embed_sum / smoothed[:, None]).to(weight.dtype))
        self.idle.add_(1).masked_fill_(counts > 0, 0)
        if self.restart_after > 0:
            self._restart(flat, error)

    def _restart(self, flat: torch.Tensor, error: torch.Tensor) -> None:
        """Move the dead codes onto the encodings of largest quantisation error."""
        dead = torch.nonzero(self.idle >= self.restart_after).squeeze(1)
        m = min(len(dead), len(flat))
        if m == 0:
            return
        top = torch.sort(error, descending=True, stable=True).indices[:m]
        vectors, error = flat[top], error[top]
        if _distributed():  # every process's candidates, best first (ties: lower rank first)
            world = dist.get_world_size()
            all_vectors = [torch.empty_like(vectors) for _ in range(world)]
            all_errors = [torch.empty_like(error) for _ in range(world)]
            dist.all_gather(all_vectors, vectors)
            dist.all_gather(all_errors, error)
            top = torch.sort(torch.cat(all_errors), descending=True, stable=True).indices[:m]
            vectors = torch.cat(all_vectors)[top]
        dead = dead[:m]
        weight = self.vq.quantize.embedding.weight
        weight[dead] = vectors.to(weight.dtype)
        self.embed_sum[dead] = vectors
        self.cluster_size[dead] = 1.0
        self.idle[dead] = 0


@register
class TokenizerTask(Task):
    """VQ tokenizer with EMA codebook, dead-code restarts and an optional critic (module doc)."""

    name = "tokenizer"
    section = TokenizerTrainConfig

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.cfg = cfg
        if cfg.optim.ema_decay > 0:
            raise ConfigError(
                f"optim.ema_decay = {cfg.optim.ema_decay}: the tokenizer task needs 0 (its "
                "codebook is already an EMA, and averaging restarted codes would blur them)"
            )
        data = load_training_images(cfg.data, progress=progress)
        self.images = torch.from_numpy(data.images)
        t = cfg.tokenizer
        fields = {"sample_size": cfg.data.size, **t.config}
        config = network_config(VQConfig, fields, "tokenizer.config")
        factor = 2 ** (len(config.block_out_channels) - 1)
        if cfg.data.size % factor:
            raise ConfigError(
                f"data.size = {cfg.data.size} is not a multiple of the tokenizer's factor {factor}"
            )
        self.trainable = CodebookEMA(
            VQModel(config),
            t.discriminator(config.in_channels),
            decay=t.codebook_decay,
            restart_after=t.restart_after,
        )

    @property
    def num_items(self) -> int:
        return len(self.images)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        return {"x": pixels(self.images[index])}

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        t = self.cfg.tokenizer
        x = batch["x"].to(device)
        recon, commitment, critic = model(x)
        diff = recon.float() - x
        per = diff.abs() if t.reconstruction == "l1" else diff.pow(2)
        loss = per.flatten(1).mean(1) + t.commitment * commitment
        if critic is None:
            return loss
        on = float(self.step >= t.adversarial_start)  # 0: the terms (and D's updates) wait
        return loss + on * adversarial_loss(critic, t.adversarial_weight)

    def export(self, trainable: nn.Module, folder: Path) -> None:
        """The VQModel alone, as a ``VQModel`` component folder."""
        vq = trainable.vq
        save_component(vq, folder, class_name="VQModel", config=vq.config.to_dict())

    def sample_grid(self, trainable: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """Originals (top row) above their reconstructions through the codes."""
        return reconstruction_grid(trainable.vq, self.images)
