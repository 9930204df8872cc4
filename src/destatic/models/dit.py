"""DiT: the class-conditional diffusion transformer, in one file.

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT): the latents are cut into
p×p patches, each a token with a fixed 2-D sin-cos position; N blocks of self-attention + MLP
are modulated by the timestep + class-label embedding c with adaLN-Zero (every modulation starts
at zero, so every block starts as the identity):

    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = W·SiLU(c)
    x ← x + gate·Attn(LN(x)(1+scale)+shift)
    x ← x + gate_mlp·MLP(LN(x)(1+scale_mlp)+shift_mlp)

and a final adaLN layer projects every token back to p·p·C_out channels.

**Classes.** ImageNet's 1000 classes embed through a table with one more row, the *null class*
(id ``num_embeds_ada_norm``) that training used for 10% of the samples: the unconditional branch
of classifier-free guidance.

**Learned variance.** DiT was trained as an improved DDPM (Nichol & Dhariwal 2021) with
``learn_sigma``: ``out_channels = 2·in_channels``, the noise ε in the first half and the
interpolation weights of the reverse-step variance in the second. A σ-space denoiser needs the
ε half alone, so :meth:`DiT.forward` returns it (``variance=True`` returns every channel).

The attribute names are those of diffusers' ``DiTTransformer2DModel`` (the checkpoints that call
themselves ``Transformer2DModel`` hold the same keys), so its weights load with
``load_state_dict(strict=True)``. diffusers copies the timestep and class embedders into every
block (``transformer_blocks.i.norm1.emb``) and the final layer reads block 0's; this model keeps
that layout. The code is written from the paper, reusing :mod:`destatic.models.mmdit`'s pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.config import JsonConfig, check_positive, check_sample_size
from destatic.models.layers import LayerNorm, TimestepEmbedding, timestep_embedding
from destatic.models.mmdit import (
    AdaLayerNormZero,
    FeedForward,
    JointAttention,
    modulate,
    sincos_1d,
    unpatchify,
)

__all__ = [
    "DIT_MODELS",
    "DiT",
    "DiTConfig",
    "DiT_B_2",
    "DiT_L_2",
    "DiT_S_2",
    "DiT_XL_2",
    "sincos_grid",
]

#: Width of the sinusoidal timestep features (DiT's ``frequency_embedding_size``).
FREQ_DIM = 256
#: diffusers config keys that change nothing here (GroupNorm groups of a non-patch input,
#: fp32 attention scores — SDPA computes them accurately anyway — and a 1×1-conv option).
IGNORED = ("norm_num_groups", "upcast_attention", "use_linear_projection")
#: diffusers options this model implements at one value only (the value DiT uses).
FIXED = {
    "norm_type": ("ada_norm_zero",),
    "activation_fn": ("gelu-approximate",),
    "attention_bias": (True,),
    "norm_elementwise_affine": (False,),
    "dropout": (0.0, 0),
    "cross_attention_dim": (None,),
    "num_vector_embeds": (None,),
    "only_cross_attention": (False,),
    "double_self_attention": (False,),
    "attention_type": ("default",),
    "caption_channels": (None,),
    "interpolation_scale": (None, 1, 1.0),
    "use_additional_conditions": (None, False),
}


#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass
class DiTConfig(JsonConfig):
    """Hyper-parameters; the names are those of diffusers' DiTTransformer2DModel config."""

    num_attention_heads: int = 16  # hidden size = heads · head_dim (DiT-XL: 16 · 72 = 1152)
    attention_head_dim: int = 72  # channels per head
    in_channels: int = 4  # latent channels in
    out_channels: int | None = None  # in_channels, or 2·in_channels (learned variance); None: in
    num_layers: int = 28  # DiT blocks
    sample_size: int = 32  # latent side of the training images (the sin-cos table's base)
    patch_size: int = 2  # side of a square patch, in latent pixels
    num_embeds_ada_norm: int = 1000  # classes; id num_embeds_ada_norm is the null class
    norm_eps: float = 1e-5  # epsilon of the LayerNorm before each MLP

    def __post_init__(self) -> None:
        if self.out_channels is None:
            self.out_channels = self.in_channels

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_classes(self) -> int:
        """The real classes (the label table has one more row: the null class)."""
        return self.num_embeds_ada_norm

    @property
    def learned_variance(self) -> bool:
        """Whether the network also predicts the variance (``out_channels = 2·in_channels``)."""
        return self.out_channels == 2 * self.in_channels

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working DiT: sizes and
        counts positive integers, ``sample_size`` a multiple of the patch within
        :data:`~destatic.models.config.MAX_SAMPLE_SIZE`, the width a multiple of 4 (2-D
        sin-cos table), ``out_channels`` in or 2·in (learned variance)."""
        check_positive(
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_layers=self.num_layers,
            patch_size=self.patch_size,
            num_embeds_ada_norm=self.num_embeds_ada_norm,
        )
        check_sample_size(self.sample_size)
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"sample_size={self.sample_size} must be a multiple of patch_size={self.patch_size}"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"num_attention_heads · attention_head_dim = {self.hidden_size} must be a "
                "multiple of 4 (the 2-D sin-cos positions)"
            )
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(
                f"out_channels={self.out_channels} must be in_channels ({self.in_channels}) or "
                f"twice it (ε and the learned variance)"
            )
        if not (isinstance(self.norm_eps, int | float) and 0 < self.norm_eps < 1):
            raise ValueError(f"norm_eps must be a number in (0, 1), got {self.norm_eps!r}")

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> DiTConfig:
        """Read a diffusers ``DiTTransformer2DModel`` config, or a ``Transformer2DModel`` one of
        a DiT (``norm_type="ada_norm_zero"``, patches; facebook/DiT-XL-2-*). Bookkeeping keys
        are ignored; an option this model does not implement raises a ValueError naming it
        (PixArt's ``norm_type="ada_norm_single"``, for one)."""
        d = {k: v for k, v in d.items() if k not in IGNORED}
        fields, _ = cls._read_diffusers(d, FIXED, "DiT")
        if fields.get("patch_size", 2) is None:
            raise ValueError("patch_size=None (a pixel or vector Transformer2DModel) is not a DiT")
        return cls.from_dict(fields)


#################################################################################
#               Embedding Layers for Patches, Timesteps and Class Labels        #
#################################################################################


def sincos_grid(
    dim: int, height: int, width: int, base_size: int, interpolation_scale: float = 1.0
) -> torch.Tensor:
    """The 2-D sin-cos table (height·width, dim) of an h × w patch grid, row-major: half the
    channels code x, half code y, each axis scaled so that it spans [0, base_size /
    interpolation_scale) (DiT's table at the training size; another size stretches or squeezes
    it, as diffusers does; PixArt at 1024 px halves the span with ``interpolation_scale`` 2)."""
    y = torch.arange(height, dtype=torch.float32) / (height / base_size) / interpolation_scale
    x = torch.arange(width, dtype=torch.float32) / (width / base_size) / interpolation_scale
    yy, xx = torch.meshgrid(y, x, indexing="ij")  # (h, w) each
    return torch.cat([sincos_1d(dim // 2, xx), sincos_1d(dim // 2, yy)], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv patchify + the fixed sin-cos positions (recomputed for another latent size)."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        patch_size: int,
        sample_size: int,
        interpolation_scale: float = 1.0,
    ):
        super().__init__()
        p = patch_size
        self.patch_size, self.base_size, self.scale = p, sample_size // p, interpolation_scale
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=p, stride=p, bias=True)
        n = self.base_size
        table = sincos_grid(dim, n, n, n, interpolation_scale)
        self.register_buffer("pos_embed", table[None], persistent=False)  # (1, n², D)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """The (1, h·w, D) table of an h × w patch grid."""
        if h == w == self.base_size:
            return self.pos_embed
        table = sincos_grid(self.pos_embed.shape[-1], h, w, self.base_size, self.scale)
        return table[None].to(self.pos_embed.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, h·w, D)
        return (x + self.positions(h, w)).to(x.dtype).contiguous()  # (B, h·w, D)


class LabelEmbedding(nn.Module):
    """A table of ``num_classes + 1`` vectors: the classes, then the null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)  # (B, D)


class TimestepLabelEmbed(nn.Module):
    """c = MLP(sinusoid(t)) + table[y]: the vector a block is modulated by."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(FREQ_DIM, dim)
        self.class_embedder = LabelEmbedding(num_classes, dim)

    def forward(self, t: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # DiT's sinusoid: cosines first, frequencies 10000^(-i/(half-1)) (downscale shift 1)
        t_freq = timestep_embedding(t, FREQ_DIM, flip_sin_to_cos=True, freq_shift=1).to(dtype)
        return self.timestep_embedder(t_freq) + self.class_embedder(labels)  # (B, D)


class AdaLayerNormZeroLabel(AdaLayerNormZero):
    """adaLN-Zero (:class:`~destatic.models.mmdit.AdaLayerNormZero`) with its own timestep +
    class embedding ``emb``, as diffusers lays DiT out (every block holds a copy)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(dim)
        self.emb = TimestepLabelEmbed(num_classes, dim)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (Peebles & Xie, Fig. 3)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = AdaLayerNormZeroLabel(d, cfg.num_classes)
        self.attn1 = JointAttention(d, cfg.num_attention_heads, None, True, joint=False)
        self.norm3 = LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.ff = FeedForward(d)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c = self.norm1.emb(t, labels, x.dtype)  # (B, D)
        h, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, c)  # (B, N, D)
        x = x + gate[:, None] * self.attn1(h)  # (B, N, D)
        return x + gate_mlp[:, None] * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
    """Class-conditional DiT: latents (B, C, H, W), timestep, class ids → ε (B, C, H, W)."""

    def __init__(self, config: DiTConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = cfg = config if config is not None else DiTConfig(**kwargs)
        d, p = cfg.hidden_size, cfg.patch_size
        self.pos_embed = PatchEmbed(cfg.in_channels, d, p, cfg.sample_size)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        # final layer: adaLN (shift, scale; no gate) → per-patch linear
        self.norm_out = LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(d, 2 * d)
        self.proj_out_2 = nn.Linear(d, p * p * cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, zero biases, N(0, 0.02) label table and timestep MLP,
        adaLN-Zero: every modulation and the output projection start at zero, so each block
        starts as the identity and a fresh model outputs exactly zero."""

        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        w = self.pos_embed.proj.weight  # initialise the patch conv like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        for block in self.transformer_blocks:
            emb = block.norm1.emb
            nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (self.proj_out_1, self.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self) -> int:
        """The label id of the unconditional branch (the last row of the label tables)."""
        return self.config.num_classes

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor,
        *,
        variance: bool = False,
    ) -> torch.Tensor:
        """x (B, C, H, W) latents; timestep (B,) the DDPM step (fractional allowed);
        class_labels (B,) int64 ids, :attr:`null_class` for the unconditional branch.
        Returns ε (B, C, H, W); with ``variance`` every output channel (B, out_channels, H, W),
        the learned variance's after ε's."""
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        labels = class_labels.reshape(-1).long()
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(x.shape[0])
        x = self.pos_embed(x)  # (B, N, D), N = h·w
        for block in self.transformer_blocks:
            x = block(x, t, labels)  # (B, N, D)
        c = self.transformer_blocks[0].norm1.emb(t, labels, x.dtype)  # (B, D)
        shift, scale = self.proj_out_1(F.silu(c)).chunk(2, dim=1)  # note: shift first
        x = self.proj_out_2(modulate(self.norm_out(x), shift, scale))  # (B, N, p·p·C_out)
        out = unpatchify(x, h, w, self.config.patch_size)  # (B, C_out, H, W)
        return out if variance else out[:, : self.config.in_channels]


#################################################################################
#                                   DiT Configs                                 #
#################################################################################


def DiT_XL_2(**kw: Any) -> DiT:  # facebook/DiT-XL-2-256, -512 (675 M)
    return DiT(num_layers=28, num_attention_heads=16, attention_head_dim=72, **kw)


def DiT_L_2(**kw: Any) -> DiT:
    return DiT(num_layers=24, num_attention_heads=16, attention_head_dim=64, **kw)


def DiT_B_2(**kw: Any) -> DiT:
    return DiT(num_layers=12, num_attention_heads=12, attention_head_dim=64, **kw)


def DiT_S_2(**kw: Any) -> DiT:
    return DiT(num_layers=12, num_attention_heads=6, attention_head_dim=64, **kw)


DIT_MODELS = {"DiT-XL/2": DiT_XL_2, "DiT-L/2": DiT_L_2, "DiT-B/2": DiT_B_2, "DiT-S/2": DiT_S_2}
