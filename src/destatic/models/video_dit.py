"""VideoDiT: a text-to-video diffusion transformer on clips ``(B, C, F, H, W)``, in one file.

A DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") over space-time
patches, with the text attached as in PixArt-α (Chen et al. 2023) and positions as in RoFormer:

* **3-D patches.** A Conv3d with kernel = stride = ``(pt, p, p)`` cuts the clip into
  ``f·h·w = F/pt · H/p · W/p`` tokens (row-major over (t, h, w)); the last layer projects each
  token back to ``pt·p·p·C_out`` values and :func:`unpatchify_3d` reassembles the clip.
* **3-D rotary positions** (Su et al. 2021, "RoFormer", Sec. 3.4): each token has the position
  ``(t, i, j)``; the head channels are split into ``rope_axes_dim = (d_t, d_h, d_w)`` groups, and
  in group a the channel pair ``(q_{2k}, q_{2k+1})`` is rotated by the angle ``m_a·θ_k``,
  ``θ_k = 10000^(-2k/d_a)``:

      R(m)q = (q_{2k} cos mθ_k − q_{2k+1} sin mθ_k,  q_{2k+1} cos mθ_k + q_{2k} sin mθ_k)

  so ``⟨R(m)q, R(n)k⟩ = Re[Σ_k q̃_k conj(k̃_k) e^{i(m−n)θ_k}]`` depends on the positions only
  through the offset ``m − n``. Nothing is tabled at a fixed size: the angles are built for the
  clip's (f, h, w) on first use and cached by shape, so any frame count or size runs.
  (:func:`destatic.models.flux.rope` / ``apply_rope``, the same interleaved-pair form as Flux.)
* **blocks** (adaLN-Zero, DiT Sec. 3.2; ``c = MLP(sinusoid(t)) + MLP(pooled text)``):

      x ← x + g₁·SelfAttn(LN(x)(1+a₁)+b₁)                      attention = "full"
      x ← x + g_s·SpaceAttn(LN(x)(1+a_s)+b_s)  (within a frame)  attention = "factorised"
      x ← x + g_t·TimeAttn(LN(x)(1+a_t)+b_t)   (across frames, at each position)
      x ← x + CrossAttn(LN(x), text tokens)
      x ← x + g_m·MLP(LN(x)(1+a_m)+b_m)

  "full" attends over all f·h·w tokens at once (cost ∝ (f·h·w)²); "factorised" is the divided
  space-time attention of TimeSformer (Bertasius et al. 2021) and Latte (Ma et al. 2024),
  cost ∝ f·(h·w)² + h·w·f². Spatial attention sees positions (0, i, j), temporal (t, 0, 0).
* **zero init.** Every modulation, the cross-attention's output and the final projection start
  at zero: each block starts as the identity and a fresh network outputs exactly zero.

``forward(x, timestep, context, pooled)`` is :class:`~destatic.models.mmdit.MMDiT`'s call:
``timestep`` (B,) is the process's noise label ``c_noise(σ)`` (t·1000 for rectified flow).
``sample_size`` and ``num_frames`` are only the default clip size (the pipeline's latent shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.config import JsonConfig, check_positive, check_sample_size
from destatic.models.flux import apply_rope, rope
from destatic.models.layers import LayerNorm
from destatic.models.mmdit import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    FeedForward,
    JointAttention,
    TimestepTextEmbed,
    modulate,
)
from destatic.models.pixart import CrossAttention
from destatic.models.sdpa import scaled_dot_product_attention

__all__ = [
    "VIDEO_DIT_MODELS",
    "VideoDiT",
    "VideoDiTConfig",
    "VideoDiT_B",
    "VideoDiT_S",
    "VideoDiT_XS",
    "unpatchify_3d",
    "video_rope",
]

ATTENTION_KINDS = ("full", "factorised")
#: Rotary tables kept per network (one per clip shape and device); older ones are dropped.
ROPE_CACHE_SIZE = 8


#################################################################################
#                                   Config                                      #
#################################################################################


def default_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """(d_t, d_h, d_w): about 3/8 of the head channels to each spatial axis (even counts), the
    rest to time (head_dim 32 → (8, 12, 12), 64 → (16, 24, 24))."""
    spatial = 2 * ((3 * head_dim) // 16)
    return head_dim - 2 * spatial, spatial, spatial


@dataclass
class VideoDiTConfig(JsonConfig):
    """Hyper-parameters of :class:`VideoDiT` (the module doc gives the architecture)."""

    in_channels: int = 3  # clip channels in (3: pixels)
    out_channels: int | None = None  # channels out; None: in_channels
    sample_size: int = 32  # default H = W of a clip
    num_frames: int = 8  # default frame count F of a clip
    patch_size: int = 2  # spatial patch side p
    patch_size_t: int = 1  # temporal patch length pt
    dim: int = 192  # hidden width (num_heads · head_dim)
    num_layers: int = 6  # blocks
    num_heads: int = 6  # attention heads
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio · dim
    context_dim: int = 384  # text-token width (MiniLM: 384)
    pooled_dim: int = 384  # pooled text width
    attention: str = "factorised"  # "full" (all f·h·w tokens) or "factorised" (space, then time)
    rope_axes_dim: tuple[int, ...] | None = None  # head channels for (t, h, w); None: default

    def __post_init__(self) -> None:
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.rope_axes_dim is None and _is_int(self.dim) and _is_int(self.num_heads):
            if self.num_heads > 0 and self.dim % self.num_heads == 0:
                self.rope_axes_dim = default_rope_axes(self.dim // self.num_heads)
        if isinstance(self.rope_axes_dim, list):  # JSON gives a list
            self.rope_axes_dim = tuple(self.rope_axes_dim)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first field that cannot build a working
        VideoDiT: counts positive integers, ``dim`` divisible by ``num_heads``, ``sample_size``
        by ``patch_size`` and ``num_frames`` by ``patch_size_t``, ``rope_axes_dim`` three even
        entries summing to the head width, ``attention`` one of :data:`ATTENTION_KINDS`."""
        check_positive(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_frames=self.num_frames,
            patch_size=self.patch_size,
            patch_size_t=self.patch_size_t,
            dim=self.dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            context_dim=self.context_dim,
            pooled_dim=self.pooled_dim,
        )
        check_sample_size(self.sample_size)
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} must be one of {ATTENTION_KINDS}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"sample_size={self.sample_size} must be a multiple of patch_size={self.patch_size}"
            )
        if self.num_frames % self.patch_size_t:
            raise ValueError(
                f"num_frames={self.num_frames} must be a multiple of "
                f"patch_size_t={self.patch_size_t}"
            )
        axes = self.rope_axes_dim
        if not isinstance(axes, tuple | list) or len(axes) != 3:
            raise ValueError(f"rope_axes_dim={axes!r} must be three channel counts (t, h, w)")
        check_positive(rope_axes_dim=axes)
        if any(a % 2 for a in axes) or sum(axes) != self.head_dim:
            raise ValueError(
                f"rope_axes_dim={tuple(axes)} must be even counts summing to the head width "
                f"dim/num_heads = {self.head_dim}"
            )

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> VideoDiTConfig:
        """Read a saved ``config.json`` (bookkeeping ``_…`` keys ignored, then validated)."""
        return cls.from_dict({k: v for k, v in d.items() if not k.startswith("_")})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#################################################################################
#                         3-D Patches and Rotary Positions                      #
#################################################################################


def unpatchify_3d(x: torch.Tensor, grid: tuple[int, int, int], pt: int, p: int) -> torch.Tensor:
    """Tokens back to a clip: (B, f·h·w, pt·p·p·C) → (B, C, f·pt, h·p, w·p), each token's
    values laid out (pt, p, p, C) (the 3-D form of DiT's unpatchify)."""
    f, h, w = grid
    c = x.shape[-1] // (pt * p * p)
    x = x.reshape(x.shape[0], f, h, w, pt, p, p, c)  # (B, f, h, w, pt, p, p, C)
    x = torch.einsum("bfhwtpqc->bcfthpwq", x)  # (B, C, f, pt, h, p, w, p)
    return x.reshape(x.shape[0], c, f * pt, h * p, w * p)  # (B, C, F, H, W)


def grid_ids(f: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(f·h·w, 3) float positions (t, i, j) of an f × h × w token grid, row-major."""
    axes = [torch.arange(n, dtype=torch.float32) for n in (f, h, w)]
    ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    return ids.to(device)


def video_rope(
    grid: tuple[int, int, int], axes_dim: tuple[int, ...], attention: str, device: torch.device
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The rotary (cos, sin) tables a block needs for an (f, h, w) grid: ``"full"`` over all
    f·h·w tokens; ``"space"`` over the h·w positions (0, i, j) of one frame and ``"time"`` over
    the f positions (t, 0, 0) of one place (``attention="factorised"``)."""
    f, h, w = grid
    if attention == "full":
        return {"full": rope(grid_ids(f, h, w, device), axes_dim)}
    return {
        "space": rope(grid_ids(1, h, w, device), axes_dim),
        "time": rope(grid_ids(f, 1, 1, device), axes_dim),
    }


class PatchEmbed3D(nn.Module):
    """Conv3d patchify: (B, C, F, H, W) → (B, f·h·w, D) tokens, (t, h, w) row-major."""

    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        kernel = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, f·h·w, D)


#################################################################################
#                                Attention, Blocks                              #
#################################################################################


class RotaryAttention(JointAttention):
    """Self-attention (MMDiT's image-only :class:`~destatic.models.mmdit.JointAttention`, so
    ``fuse_projections`` works) with RoPE on the queries and keys before SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads, None, True, joint=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        fused = self.to_qkv if self.fused else None
        q, k, v = self._qkv(x, (self.to_q, self.to_k, self.to_v), fused, (None, None))
        q, k = (apply_rope(t.transpose(1, 2), *rotary).transpose(1, 2) for t in (q, k))
        out = scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B', S, D)
        return self.to_out[1](self.to_out[0](out))


class VideoDiTBlock(nn.Module):
    """Self-attention (full, or space then time) + cross-attention to the text + MLP, under
    adaLN-Zero (module doc)."""

    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        d, heads = cfg.dim, cfg.num_heads
        self.norm1 = AdaLayerNormZero(d)  # attention (full / spatial) and MLP modulation
        self.attn = RotaryAttention(d, heads)
        if cfg.attention == "factorised":
            self.norm_t = nn.Linear(d, 3 * d)  # shift, scale, gate of the temporal attention
            self.attn_t = RotaryAttention(d, heads)
        self.norm_cross = LayerNorm(d, eps=1e-6)
        self.cross = CrossAttention(d, cfg.context_dim, heads)
        self.norm2 = LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(d, cfg.mlp_ratio)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        ctx: torch.Tensor,
        grid: tuple[int, int, int],
        rotary: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        b, n, d = x.shape
        f, h, w = grid
        hx, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, c)  # (B, N, D)
        if "full" in rotary:
            x = x + gate[:, None] * self.attn(hx, rotary["full"])  # (B, N, D)
        else:
            a = self.attn(hx.reshape(b * f, h * w, d), rotary["space"])  # (B·f, h·w, D)
            x = x + gate[:, None] * a.reshape(b, n, d)
            shift_t, scale_t, gate_t = self.norm_t(F.silu(c)).chunk(3, 1)  # (B, D) each
            ht = modulate(self.norm1.norm(x), shift_t, scale_t)  # (B, N, D)
            ht = ht.reshape(b, f, h * w, d).transpose(1, 2).reshape(b * h * w, f, d)
            a = self.attn_t(ht, rotary["time"]).reshape(b, h * w, f, d).transpose(1, 2)
            x = x + gate_t[:, None] * a.reshape(b, n, d)  # (B, N, D)
        x = x + self.cross(self.norm_cross(x), ctx, None)  # (B, N, D)
        return x + gate_mlp[:, None] * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))


#################################################################################
#                               Core VideoDiT Model                             #
#################################################################################


class VideoDiT(nn.Module):
    """Text-to-video DiT: clips (B, C, F, H, W) + text → (B, out_channels, F, H, W)."""

    takes_pooled = True  # adaLN conditioning on the pooled text vector (besides the tokens)

    def __init__(self, config: VideoDiTConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = cfg = config if config is not None else VideoDiTConfig(**kwargs)
        cfg.validate()
        d = cfg.dim
        self.patch_embed = PatchEmbed3D(cfg)
        self.time_text_embed = TimestepTextEmbed(d, cfg.pooled_dim)
        self.blocks = nn.ModuleList([VideoDiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = AdaLayerNormContinuous(d)
        patch = cfg.patch_size_t * cfg.patch_size**2
        self.proj_out = nn.Linear(d, patch * cfg.out_channels)
        self._rope_cache: dict[tuple, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears (the patch conv as a linear), zero biases, N(0, 0.02)
        embedding MLPs; zero modulations, cross-attention outputs and output projection, so
        every block starts as the identity and a fresh network outputs exactly zero."""

        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        embed = self.time_text_embed
        for mlp in (embed.timestep_embedder, embed.text_embedder):
            nn.init.normal_(mlp.linear_1.weight, std=0.02)
            nn.init.normal_(mlp.linear_2.weight, std=0.02)
        zero = [self.norm_out.linear, self.proj_out]
        for block in self.blocks:
            zero += [block.norm1.linear, block.cross.to_out[0]]
            zero += [block.norm_t] if hasattr(block, "norm_t") else []
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def rotary(self, grid: tuple[int, int, int], device: torch.device) -> dict[str, tuple]:
        """The rotary tables of an (f, h, w) token grid on ``device``, cached by shape."""
        key = (grid, str(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) >= ROPE_CACHE_SIZE:
                self._rope_cache.clear()
            cfg = self.config
            self._rope_cache[key] = video_rope(grid, cfg.rope_axes_dim, cfg.attention, device)
        return self._rope_cache[key]

    def token_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """(f, h, w) of a clip, or a one-line ValueError when it does not cut into patches."""
        cfg = self.config
        pt, p = cfg.patch_size_t, cfg.patch_size
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"VideoDiT takes clips (B, {cfg.in_channels}, F, H, W), got {tuple(x.shape)}"
            )
        f, hh, ww = x.shape[2:]
        if f % pt or hh % p or ww % p:
            raise ValueError(
                f"clip of {f} frames of {hh}×{ww} does not cut into ({pt}, {p}, {p}) patches; "
                f"use frames divisible by {pt} and sides by {p}"
            )
        return f // pt, hh // p, ww // p

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """x (B, C, F, H, W); timestep (B,) the noise label; context (B, L, context_dim) text
        tokens; pooled (B, pooled_dim). Returns (B, out_channels, F, H, W)."""
        grid = self.token_grid(x)
        rotary = self.rotary(grid, x.device)
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(x.shape[0])
        h = self.patch_embed(x)  # (B, N, D), N = f·h·w
        c = self.time_text_embed(t, pooled)  # (B, D)
        for block in self.blocks:
            h = block(h, c, context, grid, rotary)  # (B, N, D)
        h = self.proj_out(self.norm_out(h, c))  # (B, N, pt·p·p·C_out)
        return unpatchify_3d(h, grid, self.config.patch_size_t, self.config.patch_size)


#################################################################################
#                                VideoDiT Configs                               #
#################################################################################


def VideoDiT_XS(**kw: Any) -> VideoDiT:  # 1.9M parameters (full) / 2.3M (factorised)
    return VideoDiT(**{"dim": 128, "num_layers": 4, "num_heads": 4, **kw})


def VideoDiT_S(**kw: Any) -> VideoDiT:  # 4.0M parameters (full) / 5.1M (factorised)
    return VideoDiT(**{"dim": 160, "num_layers": 6, "num_heads": 5, **kw})


def VideoDiT_B(**kw: Any) -> VideoDiT:  # 40M parameters (full) / 52M (factorised)
    return VideoDiT(**{"dim": 384, "num_layers": 12, "num_heads": 6, **kw})


VIDEO_DIT_MODELS = {"VideoDiT-XS": VideoDiT_XS, "VideoDiT-S": VideoDiT_S, "VideoDiT-B": VideoDiT_B}
