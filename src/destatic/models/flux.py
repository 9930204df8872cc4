"""Flux: the rectified-flow transformer of FLUX.1 [dev] and [schnell], in one file.

Black Forest Labs 2024 (https://blackforestlabs.ai/announcing-black-forest-labs/). The network is
an MMDiT (Esser et al. 2024, SD3: see :mod:`destatic.models.mmdit`) with three changes:

* **two kinds of block.** ``num_layers`` double-stream blocks keep separate weights for the
  text and image tokens, which attend jointly (SD3's joint block, every block with a context
  output); then ``num_single_layers`` single-stream blocks run on the concatenated sequence
  ``[text; image]`` with one set of weights, attention and MLP in parallel (Dehghani et al.
  2023, ViT-22B):

      h = LN(x)(1+a)+b,   x ← x + g·W_out[Attn(h); GELU(W_mlp h)]

* **rotary positions** (Su et al. 2021, RoPE) instead of a sin-cos table: each token has an id
  ``(0, row, col)`` (text tokens ``(0, 0, 0)``), and the head channels are split into
  ``axes_dims_rope`` groups, group i rotated by the angles ``id_i·θ^(-2j/d_i)``, θ = 10000,
  over interleaved channel pairs ``(x_{2j}, x_{2j+1})``. Queries and keys are RMS-normalised
  per head before the rotation.
* **guidance distillation** (dev): the guidance scale w is an input, embedded like the
  timestep (sinusoid of 1000·w → MLP) and added to the conditioning vector
  ``c = MLP(t) [+ MLP(w)] + MLP(pooled CLIP)``, so one pass per step gives the guided velocity.

The latents are 2×2-packed into tokens, ``(B, C, H, W) → (B, H/2·W/2, 4C)``; the packing and
the position ids live in :meth:`Flux.forward`, so the rest of destatic keeps ``(B, C, H, W)``.
The attribute names are those of diffusers' ``FluxTransformer2DModel`` (whose config says
``patch_size=1``, ``in_channels=4C``), so its checkpoints load with ``load_state_dict(strict=
True)``. ``forward(x, timestep, context, pooled, guidance)``: ``timestep`` is t·1000 (as for our
MMDiT; diffusers' Flux takes t and multiplies by 1000 inside), ``guidance`` the raw scale w.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.config import JsonConfig, check_positive
from destatic.models.layers import LayerNorm, TimestepEmbedding, timestep_embedding
from destatic.models.mmdit import AdaLayerNormContinuous, AdaLayerNormZero, FeedForward, modulate
from destatic.models.sdpa import scaled_dot_product_attention

__all__ = [
    "Flux",
    "FluxConfig",
    "embed_conditioning",
    "pack_latents",
    "position_ids",
    "rope",
    "run_blocks",
    "unpack_latents",
]

ROPE_THETA = 10000.0
#: Latent pixels per packed token along a side (the 2×2 packing of diffusers' FluxPipeline).
PACK = 2


#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass
class FluxConfig(JsonConfig):
    """Hyper-parameters; the names are those of diffusers' FluxTransformer2DModel config."""

    patch_size: int = 1  # tokens per packed token along a side (Flux: 1; the 2×2 packing is extra)
    in_channels: int = 64  # channels of a packed token: 4 · latent channels
    out_channels: int | None = None  # packed channels out; None: in_channels
    num_layers: int = 19  # double-stream (joint) blocks
    num_single_layers: int = 38  # single-stream blocks
    attention_head_dim: int = 128  # channels per head = sum(axes_dims_rope)
    num_attention_heads: int = 24  # hidden size = heads · head_dim
    joint_attention_dim: int = 4096  # channels of the T5 tokens (context)
    pooled_projection_dim: int = 768  # channels of the pooled CLIP vector
    guidance_embeds: bool = False  # dev: the guidance scale is an input (guidance-distilled)
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # rotary channels per id axis

    #: The latent side FluxPipeline draws by default (128 → 1024 px with the 8× VAE).
    sample_size = 128

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(self.axes_dims_rope)  # JSON gives a list
        if self.out_channels is None:
            self.out_channels = self.in_channels

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working Flux: sizes
        positive, ``patch_size`` 1 (the only one Flux uses), packed channels a multiple of 4,
        and ``axes_dims_rope`` three even widths summing to ``attention_head_dim``."""
        check_positive(
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_layers=self.num_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim,
            pooled_projection_dim=self.pooled_projection_dim,
            axes_dims_rope=self.axes_dims_rope,
        )
        if type(self.num_single_layers) is not int or self.num_single_layers < 0:
            raise ValueError(
                f"num_single_layers must be an integer ≥ 0, got {self.num_single_layers!r}"
            )
        if self.patch_size != 1:
            raise ValueError(f"patch_size={self.patch_size} is not supported; Flux uses 1")
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % (PACK * PACK):
                raise ValueError(
                    f"{name}={getattr(self, name)} must be a multiple of 4 (2×2 packing)"
                )
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope} must be three even widths")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope={self.axes_dims_rope} must sum to attention_head_dim "
                f"({self.attention_head_dim})"
            )

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> FluxConfig:
        """Read a diffusers ``FluxTransformer2DModel`` config (``dict(model.config)``);
        bookkeeping keys (``_class_name``, …) are ignored, unknown options raise."""
        return cls.from_dict({k: v for k, v in d.items() if not k.startswith("_")})


#################################################################################
#                    Packing, Position Ids and Rotary Embedding                 #
#################################################################################


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): each 2×2 patch a token, channels (C, 2, 2) row-major."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PACK, PACK, w // PACK, PACK)  # (B, C, h, 2, w, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h·w, 4C) → (B, C, H, W) with H = 2h, W = 2w: the inverse of :func:`pack_latents`."""
    b, _, d = x.shape
    h, w, c = height // PACK, width // PACK, d // (PACK * PACK)
    x = x.reshape(b, h, w, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, 2, w, 2)
    return x.reshape(b, c, height, width)


def position_ids(text_len: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """(L + h·w, 3) ids of ``[text; image]``: text (0, 0, 0), image token (0, row, col)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)
    ids = torch.cat([torch.zeros(text_len, 3, dtype=image.dtype), image])
    return ids.to(device=device, dtype=torch.float32)


def rope(ids: torch.Tensor, axes_dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (S, Σd_i) float32: angle ``id_i·θ^(-2j/d_i)`` of axis i's pair j, each
    repeated for the two channels of its pair. Angles are computed in float64."""
    cos, sin = [], []
    for i, dim in enumerate(axes_dims):
        omega = ROPE_THETA ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (d_i/2,)
        angles = ids[:, i].double()[:, None] * omega.to(ids.device)  # (S, d_i/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())  # (S, d_i)
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)  # (S, d), (S, d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x₀, x₁) of x (B, S, H, d) by its angle: (x₀, x₁) →
    (x₀ cos − x₁ sin, x₁ cos + x₀ sin), in float32."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, d/2) each
    rotated = torch.stack([-x1, x0], dim=-1).flatten(3)  # (B, S, H, d)
    cos, sin = cos[None, :, None], sin[None, :, None]  # (1, S, 1, d)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


#################################################################################
#                           Conditioning and Attention                          #
#################################################################################


class TimestepGuidanceTextEmbed(nn.Module):
    """c = MLP(sinusoid(1000·t)) [+ MLP(sinusoid(1000·w))] + MLP(pooled CLIP)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.timestep_embedder = TimestepEmbedding(freq_dim, dim)
        self.guidance_embedder = TimestepEmbedding(freq_dim, dim) if guidance else None
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # Linear → SiLU → Linear

    def forward(
        self, t: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        c = self.timestep_embedder(timestep_embedding(t, self.freq_dim).to(pooled.dtype))
        if self.guidance_embedder is not None:
            g = timestep_embedding(guidance, self.freq_dim).to(pooled.dtype)  # (B, 256)
            c = c + self.guidance_embedder(g)
        return c + self.text_embedder(pooled)  # (B, D)


class FluxAttention(nn.Module):
    """Multi-head attention with RMS-normed queries/keys and RoPE. ``joint``: the double-stream
    form, with context projections and one attention over ``[context; image]``; otherwise the
    single-stream form (no output projection: the block's ``proj_out`` follows)."""

    def __init__(self, dim: int, heads: int, joint: bool):
        super().__init__()
        self.heads, head_dim = heads, dim // heads
        self.norm_q, self.norm_k = (nn.RMSNorm(head_dim, eps=1e-6) for _ in range(2))
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        if joint:
            self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
            self.norm_added_q, self.norm_added_k = (
                nn.RMSNorm(head_dim, eps=1e-6) for _ in range(2)
            )
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                nn.Linear(dim, dim) for _ in range(3)
            )
            self.to_add_out = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor, proj: tuple, norms: tuple) -> list[torch.Tensor]:
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)) for p in proj)  # (B, N, H, d) each
        return [norms[0](q), norms[1](k), v]

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        ctx: torch.Tensor | None = None,
    ):
        q, k, v = self._qkv(x, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k))
        if ctx is not None:  # context first, as its position ids are
            added = (self.add_q_proj, self.add_k_proj, self.add_v_proj)
            cs = self._qkv(ctx, added, (self.norm_added_q, self.norm_added_k))  # (B, L, H, d)
            q, k, v = (torch.cat(pair, dim=1) for pair in zip(cs, (q, k, v), strict=True))
        q, k = apply_rope(q, *rotary), apply_rope(k, *rotary)  # (B, S, H, d)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, d)
        out = scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, S, D)
        if ctx is None:
            return out.to(q.dtype)
        c, x = out.split([ctx.shape[1], out.shape[1] - ctx.shape[1]], dim=1)
        return self.to_out[1](self.to_out[0](x)), self.to_add_out(c)  # (B, N, D), (B, L, D)


#################################################################################
#                                   Blocks                                      #
#################################################################################


class DoubleStreamBlock(nn.Module):
    """SD3's joint block (adaLN-Zero on each stream, one joint attention), with RoPE."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm1_context = AdaLayerNormZero(dim), AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, heads, joint=True)
        self.norm2 = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        self.norm2_context = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor, rotary: tuple):
        h, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, c)  # (B, N, D)
        h_ctx, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(ctx, c)
        a, a_ctx = self.attn(h, rotary, h_ctx)  # (B, N, D), (B, L, D)
        x = x + gate[:, None] * a
        x = x + gate_mlp[:, None] * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        ctx = ctx + c_gate[:, None] * a_ctx
        h_ctx = modulate(self.norm2_context(ctx), c_shift_mlp, c_scale_mlp)  # (B, L, D)
        ctx = ctx + c_gate_mlp[:, None] * self.ff_context(h_ctx)
        if ctx.dtype == torch.float16:
            ctx = ctx.clip(-65504, 65504)
        return x, ctx


class AdaLayerNormZeroSingle(nn.Module):
    """adaLN-Zero with one (shift, scale, gate): the single-stream block's modulation."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 3 * dim)
        self.norm = LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate = self.linear(F.silu(c)).chunk(3, 1)
        return modulate(self.norm(x), shift, scale), gate


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joint sequence: x ← x + g·W_out[Attn(h); GELU(W h)]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, hidden)
        self.attn = FluxAttention(dim, heads, joint=False)
        self.proj_out = nn.Linear(dim + hidden, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rotary: tuple) -> torch.Tensor:
        h, gate = self.norm(x, c)  # (B, S, D)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")  # (B, S, 4D)
        out = self.proj_out(torch.cat([self.attn(h, rotary), mlp], dim=2))  # (B, S, D)
        x = x + gate[:, None] * out
        return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


#################################################################################
#                                 Core Flux Model                               #
#################################################################################


def build_trunk(module: nn.Module, cfg: Any) -> None:
    """The layers Flux and its ControlNet share, under diffusers' names: the timestep /
    guidance / pooled-text embedding, the text and latent input projections, and the double-
    and single-stream blocks (``cfg``: a FluxConfig or FluxControlNetConfig)."""
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    module.time_text_embed = TimestepGuidanceTextEmbed(
        d, cfg.pooled_projection_dim, cfg.guidance_embeds
    )
    module.context_embedder = nn.Linear(cfg.joint_attention_dim, d)
    module.x_embedder = nn.Linear(cfg.in_channels, d)
    module.transformer_blocks = nn.ModuleList(
        [DoubleStreamBlock(d, heads) for _ in range(cfg.num_layers)]
    )
    module.single_transformer_blocks = nn.ModuleList(
        [SingleStreamBlock(d, heads) for _ in range(cfg.num_single_layers)]
    )


class Flux(nn.Module):
    """FLUX.1 transformer: latents (B, C, H, W) + T5 tokens + pooled CLIP → velocity."""

    takes_pooled = True  # adaLN conditioning on the pooled text vector (besides the tokens)
    latent_patch = PACK  # latent pixels per token along a side: image sides are multiples of 16

    def __init__(self, config: FluxConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = cfg = config if config is not None else FluxConfig(**kwargs)
        d = cfg.hidden_size
        build_trunk(self, cfg)
        self.norm_out = AdaLayerNormContinuous(d)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, zero biases, N(0, 0.02) conditioning MLPs, and zero
        adaLN-Zero modulations and output projection, so a fresh model outputs exactly zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        embed = self.time_text_embed
        for mlp in (embed.timestep_embedder, embed.guidance_embedder, embed.text_embedder):
            if mlp is not None:
                nn.init.normal_(mlp.linear_1.weight, std=0.02)
                nn.init.normal_(mlp.linear_2.weight, std=0.02)
        zero = [self.norm_out.linear, self.proj_out]
        zero += [
            m for b in self.transformer_blocks for m in (b.norm1.linear, b.norm1_context.linear)
        ]
        zero += [b.norm.linear for b in self.single_transformer_blocks]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
        controls: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W) latents, H and W even; timestep (B,) = t·1000; context (B, L,
        joint_attention_dim); pooled (B, pooled_projection_dim); guidance (B,) or a float: the
        scale w of a guidance-distilled model (``guidance_embeds``), None otherwise; controls:
        a ControlNet's residuals (:class:`~destatic.models.flux_controlnet.FluxControlNet`),
        added to the image tokens after the blocks (:func:`run_blocks`). Returns
        (B, out_channels/4, H, W)."""
        height, width = check_latent_size(x)
        x = self.x_embedder(pack_latents(x))  # (B, N, D), N = H/2·W/2
        grid = (height // PACK, width // PACK)
        ctx, c, rotary = embed_conditioning(self, x, grid, timestep, context, pooled, guidance)
        x, _, _ = run_blocks(self, x, ctx, c, rotary, controls)
        x = self.proj_out(self.norm_out(x, c))  # (B, N, out_channels)
        return unpack_latents(x, height, width)  # (B, out_channels/4, H, W)


def check_latent_size(x: torch.Tensor) -> tuple[int, int]:
    """(H, W) of latents (…, H, W) that pack into 2×2 tokens; a ValueError otherwise."""
    height, width = x.shape[-2:]
    if height % PACK or width % PACK:
        raise ValueError(f"latent size {height}×{width} must be even (2×2 token packing)")
    return height, width


def embed_conditioning(
    net: nn.Module,
    x: torch.Tensor,
    grid: tuple[int, int],
    timestep: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    guidance: torch.Tensor | float | None,
    prefix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """What the blocks of a Flux (or of its ControlNet: ``net`` has Flux's embedders and
    config) take beside the embedded image tokens ``x`` (B, N, D) on a ``grid`` of packed
    rows × columns: the text tokens (B, L, D), after ``prefix`` (B, P, D) if given (a union
    ControlNet's mode), the conditioning vector c (B, D) and the rotary tables of
    ``[text; image]``."""
    cfg = net.config
    if cfg.guidance_embeds != (guidance is not None):
        want = "needs a guidance scale" if cfg.guidance_embeds else "takes no guidance input"
        raise ValueError(f"this Flux {want} (guidance_embeds={cfg.guidance_embeds})")
    b = x.shape[0]
    if guidance is not None:
        guidance = torch.as_tensor(guidance, device=x.device).reshape(-1).expand(b)
        guidance = guidance.to(x.dtype) * 1000  # embedded like a timestep
    c = net.time_text_embed(timestep.to(x.dtype).expand(b), pooled, guidance)  # (B, D)
    ctx = net.context_embedder(context)  # (B, L, D)
    if prefix is not None:
        ctx = torch.cat([prefix.to(ctx.dtype), ctx], dim=1)
    ids = position_ids(ctx.shape[1], *grid, x.device)  # (L+N, 3)
    return ctx, c, rope(ids, cfg.axes_dims_rope)


def _residual(samples: list[torch.Tensor], index: int, blocks: int) -> torch.Tensor:
    """The ControlNet residual of block ``index`` of ``blocks``: each of the ``len(samples)``
    residuals serves ⌈blocks / len(samples)⌉ consecutive blocks (diffusers' rule)."""
    return samples[index // math.ceil(blocks / len(samples))]


def run_blocks(
    net: nn.Module,
    x: torch.Tensor,
    ctx: torch.Tensor,
    c: torch.Tensor,
    rotary: tuple,
    controls: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The double-stream then single-stream blocks of ``net`` on image tokens ``x`` and text
    tokens ``ctx``: (the image tokens at the end, the image tokens after each double block,
    after each single block). ``controls`` (double, single residuals of a ControlNet) are added
    to the image tokens after the blocks they serve (:func:`_residual`)."""
    double, single = controls if controls is not None else ([], [])
    after_double, after_single = [], []
    n = len(net.transformer_blocks)
    for i, block in enumerate(net.transformer_blocks):
        x, ctx = block(x, ctx, c, rotary)  # (B, N, D), (B, L, D)
        x = x + _residual(double, i, n) if double else x
        after_double.append(x)
    text = ctx.shape[1]
    joint = torch.cat([ctx, x], dim=1)  # (B, L+N, D)
    n = len(net.single_transformer_blocks)
    for i, block in enumerate(net.single_transformer_blocks):
        joint = block(joint, c, rotary)
        if single:
            joint = torch.cat([joint[:, :text], joint[:, text:] + _residual(single, i, n)], 1)
        after_single.append(joint[:, text:])
    return joint[:, text:], after_double, after_single  # (B, N, D), …
