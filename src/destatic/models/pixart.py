"""PixArt-α: the text-to-image diffusion transformer, in one file.

Chen et al. 2023, "PixArt-α: Fast Training of Diffusion Transformer for Photorealistic
Text-to-Image Synthesis". A DiT (:mod:`destatic.models.dit`) with two changes (Sec. 2.3):

* **text by cross-attention.** Each block adds a cross-attention from the image tokens to the
  T5 tokens (projected to the width by ``caption_projection``), between its self-attention and
  its MLP, without a norm or a modulation of its own; padding tokens are masked out.
* **adaLN-single.** One MLP of the timestep embedding c gives six vectors ``t`` (B, 6, D) for
  all blocks; each block adds its own learned ``scale_shift_table`` (6, D) to them:

      shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = table + t
      x ← x + gate·SelfAttn(LN(x)(1+scale)+shift)
      x ← x + CrossAttn(x, T5 tokens)
      x ← x + gate_mlp·MLP(LN(x)(1+scale_mlp)+shift_mlp)

  The final layer modulates with its own (2, D) table plus c itself.

**Micro-conditions** (the 1024-px models, ``sample_size`` 128): the image's (height, width) in
pixels and its aspect ratio h/w are embedded like timesteps and concatenated (⅔ + ⅓ of the
width) onto c. Positions are the sin-cos table of DiT, squeezed by ``interpolation_scale``
(sample_size/64) so that the 1024-px grid spans the 512-px range.

PixArt-Σ (Chen et al. 2024) is this network unchanged: its configs turn the micro-conditions
off (``use_additional_conditions: false``) and its folders differ only in their settings
(:mod:`destatic.pipelines.families.pixart`).

Like DiT, PixArt learns the variance (``out_channels = 2·in_channels``); :meth:`PixArt.forward`
returns the ε half. The attribute names are those of diffusers' ``PixArtTransformer2DModel``, so
its weights load with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.config import JsonConfig, check_positive, check_sample_size
from destatic.models.dit import FREQ_DIM, IGNORED, PatchEmbed
from destatic.models.layers import LayerNorm, TimestepEmbedding, timestep_embedding
from destatic.models.mmdit import FeedForward, JointAttention, unpatchify
from destatic.models.sdpa import scaled_dot_product_attention

__all__ = ["PixArt", "PixArtConfig"]

#: diffusers options this model implements at one value only (PixArt's).
FIXED = {
    "norm_type": ("ada_norm_single",),
    "activation_fn": ("gelu-approximate",),
    "attention_bias": (True,),
    "norm_elementwise_affine": (False,),
    "dropout": (0.0, 0),
    "attention_type": ("default",),
    "num_vector_embeds": (None,),  # Transformer2DModel's (the hub's PixArt folders)
    "only_cross_attention": (False,),
    "double_self_attention": (False,),
}


#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass
class PixArtConfig(JsonConfig):
    """Hyper-parameters; the names are those of diffusers' PixArtTransformer2DModel config."""

    num_attention_heads: int = 16  # hidden size = heads · head_dim (PixArt-XL: 1152)
    attention_head_dim: int = 72  # channels per head
    in_channels: int = 4  # latent channels in
    out_channels: int | None = 8  # 2·in_channels: ε and the learned variance; None: in
    num_layers: int = 28  # blocks
    cross_attention_dim: int = 1152  # width of the projected T5 tokens (= hidden size)
    caption_channels: int = 4096  # width of the T5 tokens
    sample_size: int = 128  # latent side of the training images
    patch_size: int = 2  # side of a square patch, in latent pixels
    norm_eps: float = 1e-6  # epsilon of the LayerNorms in the blocks
    interpolation_scale: float | None = None  # position squeeze; None: max(sample_size/64, 1)
    use_additional_conditions: bool | None = None  # micro-conditions; None: sample_size = 128
    num_embeds_ada_norm: int | None = 1000  # unused (diffusers requires it)

    def __post_init__(self) -> None:
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.interpolation_scale is None:
            self.interpolation_scale = max(self.sample_size // 64, 1)
        if self.use_additional_conditions is None:
            self.use_additional_conditions = self.sample_size == 128

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working PixArt: sizes
        positive, ``sample_size`` a multiple of the patch, the width a multiple of 4 (sin-cos)
        and of 3 with micro-conditions, the text width the hidden size, ``out_channels`` in or
        2·in."""
        check_positive(
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_layers=self.num_layers,
            cross_attention_dim=self.cross_attention_dim,
            caption_channels=self.caption_channels,
            patch_size=self.patch_size,
        )
        check_sample_size(self.sample_size)
        d = self.hidden_size
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"sample_size={self.sample_size} must be a multiple of patch_size={self.patch_size}"
            )
        if d % 4 or (self.use_additional_conditions and d % 3):
            need = (
                "12 (sin-cos positions, micro-conditions)"
                if self.use_additional_conditions
                else "4"
            )
            raise ValueError(
                f"num_attention_heads · attention_head_dim = {d} must be a multiple of {need}"
            )
        if self.cross_attention_dim != d:
            raise ValueError(
                f"cross_attention_dim={self.cross_attention_dim} must be the hidden size {d} "
                "(the T5 tokens are projected to it)"
            )
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(
                f"out_channels={self.out_channels} must be in_channels ({self.in_channels}) or "
                "twice it (ε and the learned variance)"
            )

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> PixArtConfig:
        """Read a diffusers ``PixArtTransformer2DModel`` config; bookkeeping keys are ignored,
        an option this model does not implement raises a ValueError naming it."""
        d = {k: v for k, v in d.items() if k not in IGNORED}
        fields, _ = cls._read_diffusers(d, FIXED, "PixArt")
        return cls.from_dict(fields)


#################################################################################
#              Embedding Layers for Timesteps, Micro-conditions and Text        #
#################################################################################


def _sinusoid(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """PixArt's timestep features (cosines first, no frequency shift) of a flat tensor."""
    return timestep_embedding(values.reshape(-1), FREQ_DIM, flip_sin_to_cos=True).to(dtype)


class TimestepSizeEmbed(nn.Module):
    """c = MLP(sinusoid(t)) [+ (MLP(sinusoid(h)), MLP(sinusoid(w)), MLP(sinusoid(h/w)))]."""

    def __init__(self, dim: int, micro: bool):
        super().__init__()
        self.micro = micro
        self.timestep_embedder = TimestepEmbedding(FREQ_DIM, dim)
        if micro:
            self.resolution_embedder = TimestepEmbedding(FREQ_DIM, dim // 3)
            self.aspect_ratio_embedder = TimestepEmbedding(FREQ_DIM, dim // 3)

    def forward(
        self, t: torch.Tensor, added_cond: dict[str, torch.Tensor] | None, dtype: torch.dtype
    ) -> torch.Tensor:
        c = self.timestep_embedder(_sinusoid(t, dtype))  # (B, D)
        if not self.micro:
            return c
        if added_cond is None:
            raise ValueError(
                "this PixArt is micro-conditioned: pass added_cond (resolution, ratio)"
            )
        b = t.shape[0]
        size = self.resolution_embedder(_sinusoid(added_cond["resolution"], dtype))  # (2B, D/3)
        ratio = self.aspect_ratio_embedder(_sinusoid(added_cond["aspect_ratio"], dtype))  # (B, D/3)
        return c + torch.cat([size.reshape(b, -1), ratio.reshape(b, -1)], dim=1)  # (B, D)


class AdaLayerNormSingle(nn.Module):
    """adaLN-single: c → the six modulation vectors every block shares (B, 6·D), and c."""

    def __init__(self, dim: int, micro: bool):
        super().__init__()
        self.emb = TimestepSizeEmbed(dim, micro)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor, added_cond, dtype: torch.dtype):
        c = self.emb(t, added_cond, dtype)  # (B, D)
        return self.linear(F.silu(c)), c  # (B, 6·D), (B, D)


class CaptionProjection(nn.Module):
    """T5 tokens → the hidden width: Linear → GELU(tanh) → Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


#################################################################################
#                               Cross-attention                                 #
#################################################################################


class CrossAttention(nn.Module):
    """Image tokens attend to text tokens; padding tokens (``mask`` False) get no weight."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k, self.to_v = nn.Linear(context_dim, dim), nn.Linear(context_dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, ·, d)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(ctx)), heads(self.to_v(ctx))
        keep = None if mask is None else mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        out = scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, N, d)
        return self.to_out[1](self.to_out[0](out.transpose(1, 2).flatten(2)))  # (B, N, D)


#################################################################################
#                               Core PixArt Model                               #
#################################################################################


class PixArtBlock(nn.Module):
    """Self-attention and MLP under adaLN-single, cross-attention to the text between them."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        d, heads = cfg.hidden_size, cfg.num_attention_heads
        self.norm1 = LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn1 = JointAttention(d, heads, None, True, joint=False)
        self.attn2 = CrossAttention(d, cfg.cross_attention_dim, heads)
        self.norm2 = LayerNorm(d, elementwise_affine=False, eps=cfg.norm_eps)
        self.ff = FeedForward(d)
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)

    def forward(
        self, x: torch.Tensor, t6: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        mods = self.scale_shift_table[None] + t6.reshape(x.shape[0], 6, -1)  # (B, 6, D)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)  # (B, 1, D)
        x = x + gate * self.attn1(self.norm1(x) * (1 + scale) + shift)  # (B, N, D)
        x = x + self.attn2(x, ctx, mask)  # (B, N, D)
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class PixArt(nn.Module):
    """PixArt-α: latents (B, C, H, W), timestep, T5 tokens → ε (B, C, H, W)."""

    def __init__(self, config: PixArtConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = cfg = config if config is not None else PixArtConfig(**kwargs)
        d, p = cfg.hidden_size, cfg.patch_size
        scale = float(cfg.interpolation_scale)
        self.pos_embed = PatchEmbed(cfg.in_channels, d, p, cfg.sample_size, scale)
        self.transformer_blocks = nn.ModuleList([PixArtBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.proj_out = nn.Linear(d, p * p * cfg.out_channels)
        self.adaln_single = AdaLayerNormSingle(d, bool(cfg.use_additional_conditions))
        self.caption_projection = CaptionProjection(cfg.caption_channels, d)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
        *,
        variance: bool = False,
    ) -> torch.Tensor:
        """x (B, C, H, W) latents; timestep (B,); context (B, L, caption_channels) T5 tokens;
        context_mask (B, L), true for real tokens; added_cond {"resolution": (B, 2) pixels
        (h, w), "aspect_ratio": (B, 1) h/w} for a micro-conditioned model. Returns ε (B, C, H,
        W); with ``variance`` every output channel."""
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(x.shape[0])
        x = self.pos_embed(x)  # (B, N, D)
        t6, c = self.adaln_single(t, added_cond, x.dtype)  # (B, 6·D), (B, D)
        ctx = self.caption_projection(context)  # (B, L, D)
        for block in self.transformer_blocks:
            x = block(x, t6, ctx, context_mask)  # (B, N, D)
        shift, scale = (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)  # (B, 1, D)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # (B, N, p·p·C_out)
        out = unpatchify(x, h, w, self.config.patch_size)  # (B, C_out, H, W)
        return out if variance else out[:, : self.config.in_channels]
