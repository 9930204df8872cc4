"""Attention blocks of the latent-diffusion U-Net (Rombach et al. 2022, Sec. 3.3: cross-attention
conditioning on text tokens).

``SpatialTransformer`` flattens a feature map to tokens and applies ``BasicTransformerBlock``s
(self-attention, cross-attention to the context, GEGLU feed-forward; pre-LayerNorm residuals), with
1×1-conv (SD 1.x) or linear (SD 2.x) projections in and out. Attribute names match diffusers'
``Transformer2DModel`` so its weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.layers import GroupNorm, LayerNorm
from destatic.models.sdpa import scaled_dot_product_attention

# ----------------------------------------------------------------------------------------------
# Attention and feed-forward
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head scaled dot-product attention; cross-attention when ``context`` is given."""

    def __init__(
        self,
        dim: int,  # query (token) width
        heads: int,
        head_dim: int,
        context_dim: int | None = None,  # key/value source width; None: self-attention
        dropout: float = 0.0,
        upcast: bool = False,  # compute attention in float32 (SD 2.1 sets upcast_attention)
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])
        self.is_cross = context_dim is not None
        self.fused = False

    def fuse_projections(self) -> None:
        """Replace the separate projections by one ``Linear``: ``to_qkv`` for self-attention,
        ``to_kv`` for cross-attention (the query comes from other tokens than the keys).

        Same maths, one larger matmul instead of two or three small ones; outputs change only
        by float rounding. While fused the state dict holds ``to_qkv.weight`` / ``to_kv.weight``
        instead of diffusers' keys: call :meth:`unfuse_projections` before saving.
        """
        if self.fused:
            return
        names = ("to_k", "to_v") if self.is_cross else ("to_q", "to_k", "to_v")
        layers = [getattr(self, n) for n in names]
        w = torch.cat([m.weight.detach() for m in layers])
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        fused.weight.data.copy_(w)
        fused.weight.requires_grad_(layers[0].weight.requires_grad)
        for n in names:  # keeps each name's slot in _modules, so unfusing restores key order
            setattr(self, n, None)
        setattr(self, "to_kv" if self.is_cross else "to_qkv", fused)
        self.fused = True

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections` (keeping any training done while fused)."""
        if not self.fused:
            return
        names = ("to_k", "to_v") if self.is_cross else ("to_q", "to_k", "to_v")
        fname = "to_kv" if self.is_cross else "to_qkv"
        w = getattr(self, fname).weight.detach()
        for n, part in zip(names, w.chunk(len(names)), strict=True):
            m = nn.Linear(part.shape[1], part.shape[0], bias=False, device=w.device, dtype=w.dtype)
            m.weight.data.copy_(part)
            m.weight.requires_grad_(getattr(self, fname).weight.requires_grad)
            setattr(self, n, m)
        delattr(self, fname)
        self.fused = False

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        # (B, heads, tokens, head_dim)
        if self.fused and not self.is_cross:
            if context is not None:
                raise ValueError("fused self-attention takes no context; unfuse_projections()")
            qkv = self.to_qkv(x).view(B, N, 3, self.heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        elif self.fused:
            context = x if context is None else context  # no context (AudioLDM): attend to x
            q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)
            kv = self.to_kv(context).view(B, context.shape[1], 2, self.heads, -1)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            context = x if context is None else context
            q, k, v = (
                t.view(B, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                for t in (self.to_q(x), self.to_k(context), self.to_v(context))
            )
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        out = out.to(dtype).transpose(1, 2).reshape(B, N, -1)  # (B, N, inner)
        return self.to_out[1](self.to_out[0](out))  # (B, N, dim)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): ``a · GELU(b)`` with ``[a, b] = proj(x)``."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)  # (B, N, out_dim) each
        return a * F.gelu(b)


class FeedForward(nn.Module):
    """GEGLU → dropout → Linear, hidden width ``mult · dim``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# Transformer blocks
# ----------------------------------------------------------------------------------------------


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to ``context``, feed-forward."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int,  # text-token width (cross_attention_dim)
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, None, dropout, upcast)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, dropout, upcast)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, N, dim)
        x = x + self.attn2(self.norm2(x), context)  # (B, N, dim)
        return x + self.ff(self.norm3(x))  # (B, N, dim)


class SpatialTransformer(nn.Module):
    """Transformer on a feature map: GroupNorm, project in, blocks, project out, add the input.

    Equivalent to diffusers' ``Transformer2DModel`` for continuous inputs.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,  # number of BasicTransformerBlocks (transformer_layers_per_block)
        groups: int = 32,
        use_linear_projection: bool = False,  # SD 2.x: Linear; SD 1.x: 1×1 Conv2d
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if use_linear_projection else lambda i, o: nn.Conv2d(i, o, 1)
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, dropout, upcast)
            for _ in range(depth)
        )
        self.proj_out = proj(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)  # (B, C, H, W)
        if self.use_linear:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, inner)
        else:
            h = self.proj_in(h)  # (B, inner, H, W)
            h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context)  # (B, HW, inner)
        if self.use_linear:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        else:
            h = h.reshape(B, H, W, -1).permute(0, 3, 1, 2)  # (B, inner, H, W)
            h = self.proj_out(h)  # (B, C, H, W)
        return x + h
