"""Wan 2.1's video diffusion transformer (text→video and image→video), in one file.

Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models" (Wan-AI/Wan2.1-T2V-
1.3B, -14B). A DiT on the 16-channel latents of :class:`~destatic.models.wan_vae.AutoencoderKLWan`
``(B, 16, F, H, W)``, trained with flow matching (velocity ``n - x0`` at flow time t):

* **3-D patches.** A Conv3d with kernel = stride = ``patch_size`` (1, 2, 2) turns the clip into
  f·h·w tokens, row-major over (t, h, w).
* **3-D rotary positions** (Su et al. 2021) on the queries and keys of self-attention: each head's
  channels split into (t, h, w) parts of ``d - 4⌊d/6⌋``, ``2⌊d/6⌋``, ``2⌊d/6⌋`` channels, each
  rotated by its token's integer coordinate (θ = 10⁴, interleaved channel pairs).
* **Blocks.** With six vectors from the timestep (shared by all blocks through ``time_proj``,
  each block adding its own ``scale_shift_table``):

      shift, scale, gate, c_shift, c_scale, c_gate = table + time_proj(SiLU(c))
      x ← x + gate · SelfAttn(LN(x)(1+scale) + shift)           (RMS norm on q and k, RoPE)
      x ← x + CrossAttn(LN_affine(x), text tokens)             (RMS norm on q and k)
      x ← x + c_gate · MLP(LN(x)(1+c_scale) + c_shift)

  where c = MLP(sinusoid(t)) and the text tokens are UMT5's, projected by a GELU(tanh) MLP.
* **Image→video** (Wan2.1-I2V-14B-480P/720P, FLF2V): the network reads ``in_channels`` = 16 noisy
  latents + ``condition`` (4 mask channels + 16 latents of the clip [image, zeros…]) stacked on
  channels, and CLIP image tokens (``image_dim`` wide) through ``condition_embedder.
  image_embedder`` (LN → Linear → GELU → Linear → LN; with ``pos_embed_seq_len`` the first and
  last frames' tokens side by side plus a learnt position table). Cross-attention then attends
  to text and image separately with the same queries and adds the two:

      CrossAttn(x) = Attn(q, k_text, v_text) + Attn(q, RMS(add_k_proj(img)), add_v_proj(img))
* **Output.** LN(x)(1+scale) + shift with a (2, D) table plus c, a Linear to the patch's
  values, then tokens back to the clip.

The norms and the modulation run in float32 (diffusers' ``FP32LayerNorm``). Parameter names are
those of diffusers' ``WanTransformer3DModel``, so its weights load with
``load_state_dict(strict=True)``. Wan 2.2's per-token timesteps are not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.config import JsonConfig, check_positive, check_positive_float
from destatic.models.flux import apply_rope, rope
from destatic.models.layers import TimestepEmbedding, timestep_embedding
from destatic.models.mmdit import GELUProj
from destatic.models.pixart import CaptionProjection
from destatic.models.sdpa import scaled_dot_product_attention
from destatic.models.video_dit import grid_ids, unpatchify_3d

__all__ = [
    "WAN_DEFAULT_FRAMES",
    "WanConfig",
    "WanImageEmbedding",
    "WanTransformer3DModel",
    "wan_rope_axes",
]

#: diffusers' WanPipeline draws 81 frames unless asked otherwise (21 latent frames).
WAN_DEFAULT_FRAMES = 81
#: ... and 480 px high (× 832 wide).
WAN_DEFAULT_SIZE = 480
#: diffusers options this model implements at one value only (Wan 2.1's).
FIXED = {"qk_norm": ("rms_norm_across_heads",)}


def wan_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head rotated by (t, h, w): h and w get 2⌊d/6⌋ each, t the rest."""
    hw = 2 * (head_dim // 6)
    return (head_dim - 2 * hw, hw, hw)


@dataclass
class WanConfig(JsonConfig):
    """Hyper-parameters; the names are those of diffusers' WanTransformer3DModel config."""

    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) patch of the latents
    num_attention_heads: int = 40  # hidden size = heads · head_dim (14B: 5120; 1.3B: 1536)
    attention_head_dim: int = 128  # channels per head
    in_channels: int = 16  # latent channels in
    out_channels: int = 16  # latent channels out
    text_dim: int = 4096  # width of the UMT5 tokens
    freq_dim: int = 256  # sinusoidal timestep features
    ffn_dim: int = 13824  # MLP hidden width
    num_layers: int = 40  # blocks
    cross_attn_norm: bool = True  # an affine LayerNorm before cross-attention
    qk_norm: str = "rms_norm_across_heads"  # RMS norm over all heads' q (k) channels
    eps: float = 1e-6  # epsilon of the norms
    rope_max_seq_len: int = 1024  # largest token coordinate along an axis
    image_dim: int | None = None  # image→video: width of the CLIP image tokens (None: none)
    added_kv_proj_dim: int | None = None  # image→video: width of the embedded image tokens
    pos_embed_seq_len: int | None = None  # first-last-frame: 2 × CLIP tokens, a position table

    def __post_init__(self) -> None:
        if isinstance(self.patch_size, list):  # JSON gives a list
            self.patch_size = tuple(self.patch_size)

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def sample_size(self) -> int:
        """The default latent side: 60 (480 px, the short side of Wan 2.1's 480 × 832 videos;
        destatic's default size is square)."""
        return WAN_DEFAULT_SIZE // 8

    @property
    def num_frames(self) -> int:
        """The default frame count of a clip (diffusers' WanPipeline: 81), in pixels."""
        return WAN_DEFAULT_FRAMES

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working network."""
        check_positive(
            patch_size=self.patch_size,
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.num_layers,
            rope_max_seq_len=self.rope_max_seq_len,
            image_dim=self.image_dim,
            added_kv_proj_dim=self.added_kv_proj_dim,
            pos_embed_seq_len=self.pos_embed_seq_len,
        )
        check_positive_float(eps=self.eps)
        if len(self.patch_size) != 3 or self.patch_size[1] != self.patch_size[2]:
            raise ValueError(
                f"patch_size={self.patch_size!r} must be three sizes (t, h, w) with h = w"
            )
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                "image_dim and added_kv_proj_dim go together (an image→video network has both)"
            )
        if self.added_kv_proj_dim not in (None, self.hidden_size):
            raise ValueError(
                f"added_kv_proj_dim={self.added_kv_proj_dim} must be the hidden size "
                f"{self.hidden_size} (the image tokens are embedded to it)"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("pos_embed_seq_len needs image_dim (image tokens to position)")
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            raise ValueError(
                f"attention_head_dim={self.attention_head_dim} must be even and at least 6 "
                "(rotary pairs over t, h and w)"
            )

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> WanConfig:
        """Read a diffusers ``WanTransformer3DModel`` config; an option destatic lacks raises a
        ValueError naming it."""
        fields, _ = cls._read_diffusers(d, FIXED, "WanTransformer3DModel")
        return cls.from_dict(fields)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, the result in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention of (B, S, H·d) queries over (B, L, H·d) keys and values, ``heads``
    heads; (B, S, H·d) out. q and k may already be split into heads (B, ·, H, d)."""
    q, k, v = (t if t.ndim == 4 else t.unflatten(-1, (heads, -1)) for t in (q, k, v))
    out = scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2).flatten(2)


class WanAttention(nn.Module):
    """Softmax attention with RMS-normed queries and keys (over all heads' channels at once);
    RoPE on both for self-attention; keys and values from ``context`` for cross-attention, plus
    a second attention over the image tokens (``image``) when built with ``image_dim`` (the
    module doc's image→video cross-attention)."""

    def __init__(self, dim: int, heads: int, eps: float, image_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if image_dim is not None:
            self.add_k_proj = nn.Linear(image_dim, dim)
            self.add_v_proj = nn.Linear(image_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        source = x if context is None else context
        q, k = self.norm_q(self.to_q(x)), self.norm_k(self.to_k(source))
        q, k = q.unflatten(-1, (self.heads, -1)), k.unflatten(-1, (self.heads, -1))
        if rotary is not None:  # (B, S, H, d)
            q, k = apply_rope(q, *rotary), apply_rope(k, *rotary)
        out = _attend(q, k, self.to_v(source), self.heads)
        if image is not None:
            k_image = self.norm_added_k(self.add_k_proj(image))
            out = out + _attend(q, k_image, self.add_v_proj(image), self.heads)
        return self.to_out[0](out.to(x.dtype))


class WanImageEmbedding(nn.Module):
    """CLIP image tokens → the hidden width: LN → Linear → GELU → Linear → LN (float32 norms,
    eps 10⁻⁵); with ``pos_embed_seq_len`` the two images' tokens of a sample (first and last
    frame) are laid side by side and a learnt position table is added first."""

    def __init__(self, image_dim: int, dim: int, positions: int | None = None):
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(
            ExactGELUProj(image_dim, image_dim), nn.Dropout(0.0), nn.Linear(image_dim, dim)
        )
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = None
        if positions is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, positions, image_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            image = image.reshape(-1, self.pos_embed.shape[1], image.shape[-1]) + self.pos_embed
        return self.norm2(self.ff.net(self.norm1(image)))


class ExactGELUProj(nn.Module):
    """Linear → GELU (erf)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class WanFeedForward(nn.Module):
    """Linear → GELU(tanh) → Linear, ``ffn_dim`` wide."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, ffn_dim), nn.Dropout(0.0), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class WanTimeTextEmbedding(nn.Module):
    """c = MLP(sinusoid(t)), the six shared modulation vectors ``time_proj(SiLU(c))``, the
    text tokens projected to the hidden width (and the image tokens, for image→video)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimestepEmbedding(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = CaptionProjection(cfg.text_dim, dim)
        self.image_embedder = None
        if cfg.image_dim is not None:
            self.image_embedder = WanImageEmbedding(cfg.image_dim, dim, cfg.pos_embed_seq_len)

    def forward(self, t: torch.Tensor, context: torch.Tensor):
        features = timestep_embedding(t, self.freq_dim, flip_sin_to_cos=True)  # (B, 256)
        c = self.time_embedder(features.to(self.time_embedder.linear_1.weight.dtype))  # (B, D)
        c = c.to(context.dtype)
        modulation = self.time_proj(F.silu(c)).unflatten(1, (6, -1))  # (B, 6, D)
        return c, modulation, self.text_embedder(context)


class WanTransformerBlock(nn.Module):
    """Modulated self-attention, cross-attention to the text, modulated MLP (module doc)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim, heads, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, heads, eps)
        self.attn2 = WanAttention(dim, heads, eps, cfg.added_kv_proj_dim)
        self.norm2 = (
            FP32LayerNorm(dim, eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        )
        self.ffn = WanFeedForward(dim, cfg.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, context, modulation, rotary, image=None) -> torch.Tensor:
        shift, scale, gate, c_shift, c_scale, c_gate = (
            self.scale_shift_table + modulation.float()
        ).chunk(6, dim=1)  # each (B, 1, D), float32
        h = (self.norm1(x.float()) * (1 + scale) + shift).to(x.dtype)
        x = (x.float() + self.attn1(h, rotary=rotary) * gate).to(x.dtype)
        h = x if self.norm2 is None else self.norm2(x.float()).to(x.dtype)
        x = x + self.attn2(h, context, image=image)
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).to(x.dtype)
        return (x.float() + self.ffn(h).float() * c_gate).to(x.dtype)


class WanTransformer3DModel(nn.Module):
    """Wan 2.1's video DiT: ``forward(x, t, context)`` with x (B, C, F, H, W), t the flow
    timestep 1000·t (B,) and context the UMT5 tokens (B, L, text_dim) → the velocity.
    Image→video adds ``condition`` (B, in_channels - C, F, H, W), stacked on x's channels, and
    ``image_context``, the CLIP image tokens (B, N, image_dim) (module doc)."""

    def __init__(self, config: WanConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = config = config or WanConfig(**kwargs)
        dim, patch = config.hidden_size, config.patch_size
        self.latent_patch = patch[1]  # image sides are multiples of 8 · this
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=patch, stride=patch)
        self.condition_embedder = WanTimeTextEmbedding(config)
        self.blocks = nn.ModuleList(WanTransformerBlock(config) for _ in range(config.num_layers))
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(patch))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def rotary(self, grid: tuple[int, int, int], device: torch.device):
        """(cos, sin) of the f·h·w tokens' (t, h, w) coordinates (module doc)."""
        if max(grid) > self.config.rope_max_seq_len:
            raise ValueError(
                f"a token grid of {grid} exceeds rope_max_seq_len={self.config.rope_max_seq_len}"
            )
        return rope(grid_ids(*grid, device), wan_rope_axes(self.config.attention_head_dim))

    @property
    def reads_image(self) -> bool:
        """Whether this is an image→video network (CLIP image tokens in cross-attention)."""
        return self.config.image_dim is not None

    def _image_tokens(self, image_context: torch.Tensor | None, dtype: torch.dtype):
        if (image_context is None) == self.reads_image:
            need = "needs" if self.reads_image else "takes no"
            raise ValueError(f"this Wan network {need} image_context (CLIP image tokens)")
        if image_context is None:
            return None
        return self.condition_embedder.image_embedder(image_context.to(dtype))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        image_context: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if condition is not None:
            x = torch.cat([x, condition.to(x.dtype)], dim=1)
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"the network reads {self.config.in_channels} channels, got {x.shape[1]} "
                "(latents + condition)"
            )
        pt, ph, pw = self.config.patch_size
        f, h, w = x.shape[2], x.shape[3], x.shape[4]
        if f % pt or h % ph or w % pw:
            raise ValueError(
                f"latents {tuple(x.shape)} must be multiples of the patch {pt, ph, pw}"
            )
        grid = (f // pt, h // ph, w // pw)
        rotary = self.rotary(grid, x.device)
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        c, modulation, context = self.condition_embedder(t, context.to(x.dtype))
        image = self._image_tokens(image_context, x.dtype)
        for block in self.blocks:
            tokens = block(tokens, context, modulation, rotary, image)
        shift, scale = (self.scale_shift_table + c.unsqueeze(1)).chunk(2, dim=1)
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).to(x.dtype)
        out = self.proj_out(tokens)  # (B, N, pt·ph·pw·C), each token laid out (pt, ph, pw, C)
        return unpatchify_3d(out, grid, pt, ph)
