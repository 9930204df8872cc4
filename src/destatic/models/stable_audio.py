"""Stable Audio Open's 1-D diffusion transformer and its timing/text projection.

Evans et al. 2024, "Stable Audio Open" (and "Fast Timing-Conditioned Latent Audio Diffusion"):
a DiT on the latents ``(B, C, T)`` of a waveform autoencoder (:mod:`destatic.models.oobleck`),
conditioned on text tokens by cross-attention and on timing (seconds start and total) by global
tokens. With c = MLP(2πt·w) the timestep's Gaussian Fourier features (fixed random w, Tancik et
al. 2020) and g = MLP(global_context) + c, the network computes

    h = proj_in(x + conv₁ₓ₁(x))ᵀ,  tokens = [g ; h]            (global tokens prepended)
    tokens ← tokens + SelfAttn(LN(tokens))                     (RoPE on half of each head)
    tokens ← tokens + CrossAttn(LN(tokens), MLP(context))      (grouped-query keys and values)
    tokens ← tokens + SwiGLU(LN(tokens))
    y = proj_out(tokens)ᵀ without the global tokens,  out = y + conv₁ₓ₁(y)

The rotary embedding (Su et al. 2021) turns the first ``head_dim/2`` channels of each query and
key head by position p ∈ [0, T + G) in rotate-half form: (a, b) → (a cos − b sin, b cos + a sin)
with angle p·10000^(−2j/r), r = head_dim/2; cross-attention shares ``num_key_value_attention
_heads`` key/value heads among the query heads (Ainslie et al. 2023). The projection model maps
T5 tokens to the conditioning width (identity or a Linear) and each of the seconds start and end
to a token: s ↦ Linear([u, sin 2πu·w, cos 2πu·w]) with u = (clamp(s) − min)/(max − min) and
learnt w. Parameter and config names are diffusers' ``StableAudioDiTModel`` and
``StableAudioProjectionModel``, so their folders load with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.config import JsonConfig, check_positive
from destatic.models.layers import LayerNorm
from destatic.models.sdpa import scaled_dot_product_attention

__all__ = [
    "StableAudioDiT",
    "StableAudioDiTConfig",
    "StableAudioProjection",
    "StableAudioProjectionConfig",
    "StableAudioProjectionOutput",
    "partial_rope",
]

#: RoPE base (diffusers' ``get_1d_rotary_pos_embed`` default, as Stable Audio uses it).
ROPE_THETA = 10000.0
#: Fourier features of a number conditioner (diffusers' fixed ``internal_dim``).
NUMBER_FEATURES = 256
#: LayerNorm epsilon of the blocks.
NORM_EPS = 1e-5


@dataclass
class StableAudioDiTConfig(JsonConfig):
    """Hyper-parameters; the names are those of diffusers' StableAudioDiTModel config."""

    sample_size: int = 1024  # latent frames of the longest audio (Stable Audio Open: 47.5 s)
    in_channels: int = 64  # latent channels in
    num_layers: int = 24  # transformer blocks
    attention_head_dim: int = 64  # channels per head
    num_attention_heads: int = 24  # query heads; hidden size = heads · head_dim
    num_key_value_attention_heads: int = 12  # key/value heads of cross-attention
    out_channels: int = 64  # latent channels out
    cross_attention_dim: int = 768  # width of the projected text tokens
    time_proj_dim: int = 256  # Gaussian Fourier features of the timestep
    global_states_input_dim: int = 1536  # width of the global (timing) tokens in
    cross_attention_input_dim: int = 768  # width of the context tokens in

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rotary_dim(self) -> int:
        """Channels of each head turned by the rotary embedding (half the head)."""
        return self.attention_head_dim // 2

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working network."""
        check_positive(
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            num_layers=self.num_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            num_key_value_attention_heads=self.num_key_value_attention_heads,
            out_channels=self.out_channels,
            cross_attention_dim=self.cross_attention_dim,
            time_proj_dim=self.time_proj_dim,
            global_states_input_dim=self.global_states_input_dim,
            cross_attention_input_dim=self.cross_attention_input_dim,
        )
        if self.num_attention_heads % self.num_key_value_attention_heads:
            raise ValueError(
                f"num_key_value_attention_heads={self.num_key_value_attention_heads} must "
                f"divide num_attention_heads={self.num_attention_heads}"
            )
        if self.attention_head_dim % 4:
            raise ValueError(
                f"attention_head_dim={self.attention_head_dim} must be a multiple of 4 "
                "(rotary pairs on half of each head)"
            )
        if self.time_proj_dim % 2:
            raise ValueError(f"time_proj_dim={self.time_proj_dim} must be even (cos and sin)")

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> StableAudioDiTConfig:
        """Read a diffusers ``StableAudioDiTModel`` config; an unknown option raises a
        ValueError naming it."""
        fields, _ = cls._read_diffusers(d, {}, "StableAudioDiTModel")
        return cls.from_dict(fields)


def partial_rope(
    length: int, rotary_dim: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (length, rotary_dim) float32, of angle p·θ^(−2j/r) for position p and
    pair j, the r/2 angles laid out twice (rotate-half form). Computed in float32 as diffusers'
    StableAudioPipeline does, so long sequences round the same way."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    inv_freq = 1.0 / (ROPE_THETA**exponent)  # (r/2,)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # (S, r) each


def _apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first r channels of x (B, H, S, d) in rotate-half form, in float32; the other
    d − r channels pass unchanged."""
    r = cos.shape[-1]
    turned, kept = x[..., :r].float(), x[..., r:]
    a, b = turned.chunk(2, dim=-1)  # (B, H, S, r/2) each
    rotated = turned * cos + torch.cat([-b, a], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), kept], dim=-1)


class GroupedQueryAttention(nn.Module):
    """Bias-free softmax attention with ``kv_heads`` key/value heads shared by ``heads`` query
    heads (each group of heads/kv_heads consecutive query heads reads one); keys and values
    from ``context`` when given (cross-attention), and the partial rotary embedding on queries
    and keys of self-attention."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, kv_heads: int, context_dim: int | None = None
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        inner, kv_inner = heads * head_dim, kv_heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, kv_inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, kv_inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False), nn.Dropout(0.0)])

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        source = x if context is None else context
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, S, d)
        k, v = (
            t.unflatten(-1, (self.kv_heads, -1)).transpose(1, 2)  # (B, H_kv, L, d)
            for t in (self.to_k(source), self.to_v(source))
        )
        if rotary is not None:
            q, k = _apply_partial_rope(q, *rotary), _apply_partial_rope(k, *rotary)
        out = scaled_dot_product_attention(q, k, v, enable_gqa=self.kv_heads != self.heads)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, S, dim)


class SwiGLU(nn.Module):
    """Shazeer 2020's gated unit: ``a · SiLU(b)`` with ``[a, b] = proj(x)``."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)
        return a * F.silu(b)


class StableAudioBlock(nn.Module):
    """Pre-LayerNorm block: rotary self-attention, grouped-query cross-attention, SwiGLU MLP
    (hidden width 4·dim), each added to the residual stream."""

    def __init__(self, config: StableAudioDiTConfig) -> None:
        super().__init__()
        dim, heads = config.hidden_size, config.num_attention_heads
        head_dim = config.attention_head_dim
        self.norm1 = LayerNorm(dim, eps=NORM_EPS)
        self.attn1 = GroupedQueryAttention(dim, heads, head_dim, heads)
        self.norm2 = LayerNorm(dim, eps=NORM_EPS)
        self.attn2 = GroupedQueryAttention(
            dim, heads, head_dim, config.num_key_value_attention_heads, config.cross_attention_dim
        )
        self.norm3 = LayerNorm(dim, eps=NORM_EPS)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(SwiGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), rotary=rotary)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


class GaussianFourierFeatures(nn.Module):
    """[cos 2πt·w, sin 2πt·w] of a fixed random frequency vector w ~ N(0, I) (a buffer, saved
    as ``weight``; never trained)."""

    def __init__(self, half_dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(half_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * t[:, None] * self.weight[None, :]  # (B, half)
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _mlp(dim_in: int, dim: int, bias: bool) -> nn.Sequential:
    """Linear → SiLU → Linear (keys ``0`` and ``2``)."""
    return nn.Sequential(nn.Linear(dim_in, dim, bias=bias), nn.SiLU(), nn.Linear(dim, dim, bias))


class StableAudioDiT(nn.Module):
    """Stable Audio Open's denoiser (the module doc): ``forward(x, timestep, context,
    global_context)`` with x (B, in_channels, T), timestep a scalar or (B,), context
    (B, L, cross_attention_input_dim), global_context (B, G, global_states_input_dim); returns
    (B, out_channels, T)."""

    def __init__(self, config: StableAudioDiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.time_proj = GaussianFourierFeatures(config.time_proj_dim // 2)
        self.timestep_proj = _mlp(config.time_proj_dim, dim, bias=True)
        self.global_proj = _mlp(config.global_states_input_dim, dim, bias=False)
        self.cross_attention_proj = _mlp(
            config.cross_attention_input_dim, config.cross_attention_dim, bias=False
        )
        self.preprocess_conv = nn.Conv1d(config.in_channels, config.in_channels, 1, bias=False)
        self.proj_in = nn.Linear(config.in_channels, dim, bias=False)
        self.transformer_blocks = nn.ModuleList(
            StableAudioBlock(config) for _ in range(config.num_layers)
        )
        self.proj_out = nn.Linear(dim, config.out_channels, bias=False)
        self.postprocess_conv = nn.Conv1d(config.out_channels, config.out_channels, 1, bias=False)

    def _check(self, x: torch.Tensor, context: torch.Tensor, global_context: torch.Tensor) -> None:
        c = self.config
        for name, value, ndim, width in (
            ("x", x, 3, None),
            ("context", context, 3, c.cross_attention_input_dim),
            ("global_context", global_context, 3, c.global_states_input_dim),
        ):
            if value.ndim != ndim or (width is not None and value.shape[-1] != width):
                want = f"(B, ·, {width})" if width else f"(B, {c.in_channels}, T)"
                raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, the network takes {c.in_channels}")

    def _time(self, timestep: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(B, D) timestep embedding; a scalar or one-entry timestep is shared by the batch."""
        t = torch.as_tensor(timestep, device=like.device).to(like.dtype).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise ValueError(f"timestep has {t.numel()} entries for a batch of {batch}")
        return self.timestep_proj(self.time_proj(t))

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        global_context: torch.Tensor,
    ) -> torch.Tensor:
        self._check(x, context, global_context)
        dtype = self.proj_in.weight.dtype
        x, context, global_context = x.to(dtype), context.to(dtype), global_context.to(dtype)
        context = self.cross_attention_proj(context)  # (B, L, cross_attention_dim)
        glob = self.global_proj(global_context) + self._time(timestep, x.shape[0], x)[:, None]
        h = self.proj_in((x + self.preprocess_conv(x)).transpose(1, 2))  # (B, T, D)
        tokens = torch.cat([glob.expand(x.shape[0], -1, -1), h], dim=1)  # (B, G + T, D)
        rotary = partial_rope(tokens.shape[1], self.config.rotary_dim, x.device)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, rotary)
        y = self.proj_out(tokens).transpose(1, 2)[:, :, glob.shape[1] :]  # (B, C_out, T)
        return y + self.postprocess_conv(y)


# ----------------------------------------------------------------------------------------------
# Text and timing projection
# ----------------------------------------------------------------------------------------------


@dataclass
class StableAudioProjectionConfig(JsonConfig):
    """Hyper-parameters; the names are those of diffusers' StableAudioProjectionModel config
    (defaults: Stable Audio Open 1.0's)."""

    text_encoder_dim: int = 768  # width of the T5 tokens
    conditioning_dim: int = 768  # width of the projected text and seconds tokens
    min_value: float = 0  # seconds below are clamped to it
    max_value: float = 512  # seconds above are clamped to it

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working projection."""
        check_positive(text_encoder_dim=self.text_encoder_dim)
        check_positive(conditioning_dim=self.conditioning_dim)
        for name in ("min_value", "max_value"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if not self.max_value > self.min_value:
            raise ValueError(f"max_value={self.max_value} must exceed min_value={self.min_value}")

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> StableAudioProjectionConfig:
        """Read a diffusers ``StableAudioProjectionModel`` config."""
        fields, _ = cls._read_diffusers(d, {}, "StableAudioProjectionModel")
        return cls.from_dict(fields)


@dataclass
class StableAudioProjectionOutput:
    """The projected conditioning (each None when its input was None): text (B, L, D), seconds
    start and end (B, 1, D)."""

    text_hidden_states: torch.Tensor | None = None
    seconds_start_hidden_states: torch.Tensor | None = None
    seconds_end_hidden_states: torch.Tensor | None = None


class LearnedFourierFeatures(nn.Module):
    """u ↦ [u, sin 2πu·w, cos 2πu·w] with learnt frequencies w (saved as ``weights``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u = u[..., None]
        angles = u * self.weights * (2 * math.pi)
        return torch.cat([u, angles.sin(), angles.cos()], dim=-1)


class NumberConditioner(nn.Module):
    """A number s (seconds) → one (1, D) token: Linear(Fourier(u)), u = (clamp(s, min, max) −
    min)/(max − min) ∈ [0, 1]."""

    def __init__(self, dim: int, min_value: float, max_value: float) -> None:
        super().__init__()
        self.min_value, self.max_value = min_value, max_value
        self.time_positional_embedding = nn.Sequential(
            LearnedFourierFeatures(NUMBER_FEATURES), nn.Linear(NUMBER_FEATURES + 1, dim)
        )

    def forward(self, seconds: torch.Tensor) -> torch.Tensor:
        weight = self.time_positional_embedding[1].weight
        seconds = torch.as_tensor(seconds, device=weight.device)
        u = (seconds.clamp(self.min_value, self.max_value) - self.min_value) / (
            self.max_value - self.min_value
        )
        u = u.to(weight.dtype).reshape(-1)
        return self.time_positional_embedding(u)[:, None]  # (B, 1, D)


class StableAudioProjection(nn.Module):
    """Stable Audio's conditioning projection (the module doc): ``forward(text_hidden_states,
    start_seconds, end_seconds)`` → :class:`StableAudioProjectionOutput`."""

    def __init__(self, config: StableAudioProjectionConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.conditioning_dim
        self.text_projection: nn.Module = (
            nn.Identity()
            if config.text_encoder_dim == dim
            else nn.Linear(config.text_encoder_dim, dim)
        )
        self.start_number_conditioner = NumberConditioner(dim, config.min_value, config.max_value)
        self.end_number_conditioner = NumberConditioner(dim, config.min_value, config.max_value)

    def forward(
        self,
        text_hidden_states: torch.Tensor | None = None,
        start_seconds: torch.Tensor | None = None,
        end_seconds: torch.Tensor | None = None,
    ) -> StableAudioProjectionOutput:
        return StableAudioProjectionOutput(
            None if text_hidden_states is None else self.text_projection(text_hidden_states),
            None if start_seconds is None else self.start_number_conditioner(start_seconds),
            None if end_seconds is None else self.end_number_conditioner(end_seconds),
        )
