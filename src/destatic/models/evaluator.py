"""The evaluator's network: a small contrastive image–text model, trained here instead of CLIP.

An image encoder (a residual CNN) and a text head (an MLP on the frozen MiniLM sentence
embedding) map both sides into one unit sphere, CLIP-style (Radford et al. 2021). Training
(:class:`destatic.training.tasks.EvaluatorTask`) scores every image against *every* caption of
the train split rather than against the other images of its batch (:func:`caption_loss`):

    p(c | x) = softmax_c(s · ⟨f(x), g(c)⟩),   loss(x) = −log Σ_{c ∈ captions(x)} p(c | x),

with a learned temperature s. An image may have several captions (the emoji's alternative
names), so the loss is the log of the total probability of its own captions. With all captions
as negatives the loss of a sample does not depend on which other samples share its batch, so
processes and gradient accumulation compute the same update as one big batch.

What it is used for, prompt adherence scores, is :mod:`destatic.metrics.evaluator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.config import JsonConfig
from destatic.models.layers import Downsample, GroupNorm, ResnetBlock

__all__ = ["CLASS_NAME", "EvaluatorConfig", "ImageTextModel", "caption_loss"]

#: ``_class_name`` of a saved evaluator's ``config.json``.
CLASS_NAME = "ImageTextModel"


@dataclass
class EvaluatorConfig(JsonConfig):
    image_size: int = 32  # images are resized to this side before encoding
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    layers_per_block: int = 1
    norm_num_groups: int = 16
    embed_dim: int = 256
    text_dim: int = 384  # width of the text encoder's pooled vector
    text_hidden: int = 512
    text_max_length: int = 32  # MiniLM tokens (prompts are truncated to it)

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels needs at least one stage")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block_out_channels entry must be a multiple of norm_num_groups "
                f"({self.norm_num_groups}), got {self.block_out_channels}"
            )
        if self.image_size < 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"image_size {self.image_size} is too small for the stages")


class ImageTextModel(nn.Module):
    """f(x): residual CNN → global mean → linear; g(c): MLP on the pooled text vector.

    Both are L2-normalised; ``logit_scale`` holds log s (initialised to log 1/0.07 as in CLIP).
    """

    def __init__(self, config: EvaluatorConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        g = config.norm_num_groups
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        prev = ch[0]
        for i, c in enumerate(ch):
            for _ in range(config.layers_per_block):
                blocks.append(ResnetBlock(prev, c, temb_channels=None, groups=g))
                prev = c
            if i < len(ch) - 1:
                blocks.append(Downsample(c))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = GroupNorm(g, prev)
        self.image_proj = nn.Linear(prev, config.embed_dim)
        self.text_proj = nn.Sequential(
            nn.Linear(config.text_dim, config.text_hidden),
            nn.SiLU(),
            nn.Linear(config.text_hidden, config.embed_dim),
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] → unit vectors [B, E]."""
        h = self.blocks(self.conv_in(x))
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return F.normalize(self.image_proj(h), dim=-1)

    def encode_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled text vectors [K, text_dim] → unit vectors [K, E]."""
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] = s · ⟨f(x_b), g(c_k)⟩ of every image against every caption."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return scale * self.encode_images(x) @ self.encode_text(pooled).T


def caption_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per-sample −log Σ_{c positive} softmax(logits)_c; ``positives`` is a bool [B, K] mask."""
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every image needs at least one positive caption")
    log_p = logits.float().log_softmax(dim=1)
    return -log_p.masked_fill(~positives, float("-inf")).logsumexp(dim=1)
