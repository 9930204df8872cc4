"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3, in one file.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
(SD3): image patches and text tokens keep separate weights but attend jointly, over the
concatenated sequence. Both streams are modulated by the timestep + pooled-text embedding with
adaLN-Zero, from Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT).

SD3.5 adds two options. ``qk_norm="rms_norm"`` RMS-normalises every head's queries and keys
(Dehghani et al. 2023, ViT-22B) to keep attention logits bounded. ``dual_attention_layers``
(SD3.5 Medium, "MMDiT-X") gives the listed blocks a second attention ``attn2`` over the image
tokens alone; its adaLN-Zero emits nine vectors instead of six, and both attentions read the
same LayerNorm of x, each under its own modulation:

    h = LN(x),  x ← x + g₁·Attn([h(1+a₁)+b₁; ctx]) + g₂·Attn₂(h(1+a₂)+b₂),
    x ← x + g_mlp·MLP(LN(x)(1+a_mlp)+b_mlp)

(the second residual is added after the first, as in diffusers' ``JointTransformerBlock``).

The attribute names are those of diffusers' ``SD3Transformer2DModel``, so a diffusers checkpoint
loads with ``load_state_dict(strict=True)``; the code is written from the papers, not copied.
``forward(x, timestep, context, pooled)`` follows diffusers' convention: ``timestep`` is a float
tensor ``[B]`` holding t·1000, and the output is the rectified-flow velocity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.config import JsonConfig, check_positive, check_sample_size
from destatic.models.layers import LayerNorm, TimestepEmbedding, timestep_embedding
from destatic.models.sdpa import scaled_dot_product_attention

__all__ = [
    "MMDIT_MODELS",
    "MMDiT",
    "MMDiTConfig",
    "MMDiT_B",
    "MMDiT_S",
    "MMDiT_SD3_Medium",
    "MMDiT_XS",
]

QK_NORMS = (None, "rms_norm")
#: The largest ``pos_embed_max_size`` a config may declare (SD3: 192 patches a side).
MAX_POS_EMBED = 1024
STREAM_CTX = ("add_q_proj", "add_k_proj", "add_v_proj")


#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass
class MMDiTConfig(JsonConfig):
    """Hyper-parameters; the names are those of diffusers' SD3Transformer2DModel config."""

    sample_size: int = 128  # latent side the positional embedding is centred for
    patch_size: int = 2  # side of a square patch, in latent pixels
    in_channels: int = 16  # latent channels in
    num_layers: int = 18  # joint blocks
    attention_head_dim: int = 64  # channels per head
    num_attention_heads: int = 18  # hidden size = heads · head_dim
    joint_attention_dim: int = 4096  # channels of the text-encoder tokens (context)
    caption_projection_dim: int | None = None  # context width after projection; None: hidden
    pooled_projection_dim: int = 2048  # channels of the pooled text embedding
    out_channels: int | None = None  # latent channels out; None: in_channels
    pos_embed_max_size: int = 96  # side of the sin-cos grid that is cropped to the input
    qk_norm: str | None = None  # None, or "rms_norm" (SD3.5) on per-head queries and keys
    dual_attention_layers: tuple[int, ...] = ()  # blocks with a 2nd image self-attention (3.5M)

    def __post_init__(self) -> None:
        self.dual_attention_layers = tuple(self.dual_attention_layers)  # JSON gives a list
        if self.caption_projection_dim is None:
            self.caption_projection_dim = self.hidden_size
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; use one of {QK_NORMS}")
        if self.caption_projection_dim != self.hidden_size:
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal "
                f"num_attention_heads · attention_head_dim ({self.hidden_size}): "
                "both streams share the joint attention width"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working MMDiT: sizes
        and counts must be positive integers, ``sample_size`` at least one patch and within
        :data:`~destatic.models.config.MAX_SAMPLE_SIZE`, the positional table at most
        :data:`MAX_POS_EMBED` patches a side, the width a multiple of 4 (2-D sin-cos table)."""
        check_positive(
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_layers=self.num_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim,
            pooled_projection_dim=self.pooled_projection_dim,
            pos_embed_max_size=self.pos_embed_max_size,
        )
        check_sample_size(self.sample_size)
        if self.sample_size < self.patch_size:
            raise ValueError(
                f"sample_size={self.sample_size} is smaller than one patch ({self.patch_size})"
            )
        if self.pos_embed_max_size > MAX_POS_EMBED:
            raise ValueError(
                f"pos_embed_max_size={self.pos_embed_max_size} is beyond {MAX_POS_EMBED}: its "
                "positional table would not fit in memory"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"num_attention_heads · attention_head_dim = {self.hidden_size} must be a "
                "multiple of 4 (the 2-D sin-cos positions)"
            )
        dual = self.dual_attention_layers
        if any(type(i) is not int or not 0 <= i < self.num_layers for i in dual):
            raise ValueError(
                f"dual_attention_layers={dual} must hold block indices in [0, {self.num_layers})"
            )

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> MMDiTConfig:
        """Read a diffusers ``SD3Transformer2DModel`` config (``dict(model.config)``).

        Bookkeeping keys (``_class_name``, ``_diffusers_version``, …) are ignored; an option
        this model does not implement raises a ValueError naming it.
        """
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        if d.get("qk_norm") not in QK_NORMS:
            raise ValueError(f"qk_norm={d['qk_norm']!r} is not supported; use one of {QK_NORMS}")
        return cls.from_dict(d)


#################################################################################
#                 Embedding Layers for Patches, Timesteps and Text              #
#################################################################################


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(pos·ω), cos(pos·ω)] with ω_i = 10000^(-2i/dim), as in the Transformer."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.reshape(-1, 1).double() * omega  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)  # (M, dim)


def sincos_2d(dim: int, grid: int, base_size: int) -> torch.Tensor:
    """2-D sin-cos table (grid², dim), row-major; half the channels code x, half code y.

    Positions are scaled so ``base_size`` patches span [0, base_size), as in SD3.
    """
    pos = torch.arange(grid, dtype=torch.float32) / (grid / base_size)
    y, x = torch.meshgrid(pos, pos, indexing="ij")  # (grid, grid)
    return torch.cat([sincos_1d(dim // 2, x), sincos_1d(dim // 2, y)], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv patchify + the centre crop of a fixed (max_size², D) sin-cos table."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch_size, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        d, p = cfg.hidden_size, cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p, bias=True)
        table = sincos_2d(d, self.max_size, base_size=cfg.sample_size // p)
        self.register_buffer("pos_embed", table[None])  # (1, max², D), persistent as in SD3

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The (1, h·w, D) window at the centre of the table, for an h × w patch grid."""
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"patch grid {h}×{w} exceeds pos_embed_max_size={self.max_size}")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)
        return table[:, top : top + h, left : left + w].reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, h·w, D), a transposed view
        # contiguous: otherwise the (B, D, N) layout rides the residual stream through every
        # block (each add keeps its input's strides) and slows the backward pass by ~5%.
        return (x + self.cropped_pos_embed(h, w)).to(x.dtype).contiguous()  # (B, h·w, D)


class TimestepTextEmbed(nn.Module):
    """c = MLP(sinusoid(t)) + MLP(pooled text): the vector every block is modulated by."""

    def __init__(self, dim: int, pooled_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.timestep_embedder = TimestepEmbedding(freq_dim, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # same MLP shape

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.freq_dim).to(pooled.dtype)  # (B, 256)
        return self.timestep_embedder(t_freq) + self.text_embedder(pooled)  # (B, D)


#################################################################################
#                          Norms, Attention, Feed-forward                       #
#################################################################################


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: c → (shift, scale, gate) for attention and for the MLP (DiT, Sec. 3.2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.linear(F.silu(c)).chunk(6, 1)
        return modulate(self.norm(x), shift, scale), gate, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroX(nn.Module):
    """adaLN-Zero of a dual-attention block: the six DiT vectors plus (shift, scale, gate) of
    the second attention, whose input is the same LayerNorm of x under its own modulation."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 9 * dim)
        self.norm = LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        *six, shift2, scale2, gate2 = self.linear(F.silu(c)).chunk(9, 1)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = six
        h = self.norm(x)  # (B, N, D)
        mods = modulate(h, shift, scale), gate, shift_mlp, scale_mlp, gate_mlp
        return *mods, modulate(h, shift2, scale2), gate2


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm modulated by c, without a gate (final layer; last block's context stream)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(c).to(x.dtype)).chunk(2, 1)  # note: scale first
        return modulate(self.norm(x), shift, scale)


class RMSNorm(nn.Module):
    """x / rms(x) · w over the last axis, computed in float32 (queries and keys, SD3.5)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype) * self.weight


class JointAttention(nn.Module):
    """One softmax attention over [image; context] tokens, with per-stream projections.

    ``joint=False`` is the image-only self-attention ``attn2`` of a dual-attention block: no
    context projections, and ``forward(x)`` returns the image output alone.
    """

    def __init__(
        self, dim: int, heads: int, qk_norm: str | None, pre_only: bool, joint: bool = True
    ):
        super().__init__()
        self.heads, self.joint = heads, joint
        head_dim = dim // heads
        norm = (lambda: RMSNorm(head_dim)) if qk_norm == "rms_norm" else (lambda: None)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                nn.Linear(dim, dim) for _ in range(3)
            )
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        # pre-only: no context out
        self.to_add_out = nn.Linear(dim, dim) if joint and not pre_only else None
        self.norm_q, self.norm_k = norm(), norm()
        if joint:
            self.norm_added_q, self.norm_added_k = norm(), norm()
        self.streams = self._STREAMS[: 2 if joint else 1]  # (fused name, layer names)
        self.fused = False

    _STREAMS = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", STREAM_CTX))

    def fuse_projections(self) -> None:
        """One ``Linear`` per stream for queries, keys and values (``to_qkv``, ``to_added_qkv``,
        the names diffusers uses): one matmul instead of three, same maths, outputs change only
        by float rounding. Call :meth:`unfuse_projections` before saving diffusers keys."""
        if self.fused:
            return
        for fname, names in self.streams:
            layers = [getattr(self, n) for n in names]
            w = torch.cat([m.weight.detach() for m in layers])
            b = torch.cat([m.bias.detach() for m in layers])
            fused = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
            fused.weight.data.copy_(w)
            fused.bias.data.copy_(b)
            fused.requires_grad_(layers[0].weight.requires_grad)
            for n in names:  # keeps each name's slot in _modules, so key order survives
                setattr(self, n, None)
            setattr(self, fname, fused)
        self.fused = True

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections` (keeping any training done while fused)."""
        if not self.fused:
            return
        for fname, names in self.streams:
            fused = getattr(self, fname)
            parts = zip(fused.weight.detach().chunk(3), fused.bias.detach().chunk(3), strict=True)
            for n, (w, b) in zip(names, parts, strict=True):
                m = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
                m.weight.data.copy_(w)
                m.bias.data.copy_(b)
                m.requires_grad_(fused.weight.requires_grad)
                setattr(self, n, m)
            delattr(self, fname)
        self.fused = False

    def _qkv(self, x: torch.Tensor, proj: tuple, fused: nn.Module | None, norms: tuple) -> tuple:
        """One stream's per-head queries, keys (optionally RMS-normed) and values."""
        if fused is not None:
            qkv = fused(x).unflatten(-1, (3, self.heads, -1))  # (B, N, 3, H, d)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in proj)
        q, k = (t if n is None else n(t) for t, n in zip((q, k), norms, strict=True))
        return q, k, v  # (B, H, N, d) each

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None):
        n = x.shape[1]
        fx = self.to_qkv if self.fused else None
        xs = self._qkv(x, (self.to_q, self.to_k, self.to_v), fx, (self.norm_q, self.norm_k))
        if not self.joint:  # image-only self-attention (attn2)
            out = scaled_dot_product_attention(*xs).transpose(1, 2).flatten(2)  # (B, N, D)
            return self.to_out[1](self.to_out[0](out))
        fc = self.to_added_qkv if self.fused else None
        added = (self.add_q_proj, self.add_k_proj, self.add_v_proj)
        cs = self._qkv(ctx, added, fc, (self.norm_added_q, self.norm_added_k))  # (B, H, L, d)
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(xs, cs, strict=True))  # (B, H, N+L, d)
        out = scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, N+L, D)
        x, ctx = out[:, :n], out[:, n:]  # (B, N, D), (B, L, D)
        x = self.to_out[1](self.to_out[0](x))  # (B, N, D)
        return x, (None if self.to_add_out is None else self.to_add_out(ctx))


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear → GELU(tanh) → Linear, 4× wide."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(
            GELUProj(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


#################################################################################
#                                 Core MMDiT Model                              #
#################################################################################


class JointBlock(nn.Module):
    """An MMDiT block: two adaLN-Zero streams sharing one attention (Esser et al., Fig. 2).

    ``pre_only`` (the last block) keeps only the context's input side: its context output
    would never be read, so it has no gate, output projection or MLP. ``dual`` adds the
    image-only second attention of SD3.5 Medium (module doc).
    """

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.pre_only, self.dual = pre_only, dual
        heads = cfg.num_attention_heads
        self.norm1 = AdaLayerNormZeroX(d) if dual else AdaLayerNormZero(d)
        self.norm1_context = AdaLayerNormContinuous(d) if pre_only else AdaLayerNormZero(d)
        self.attn = JointAttention(d, heads, cfg.qk_norm, pre_only)
        self.attn2 = JointAttention(d, heads, cfg.qk_norm, True, joint=False) if dual else None
        self.norm2 = LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(d)
        if not pre_only:
            self.norm2_context = LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(d)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor):
        h, gate, shift_mlp, scale_mlp, gate_mlp, *second = self.norm1(x, c)  # (B, N, D)
        if self.pre_only:
            h_ctx = self.norm1_context(ctx, c)  # (B, L, D)
        else:
            h_ctx, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(ctx, c)
        a, a_ctx = self.attn(h, h_ctx)  # (B, N, D), (B, L, D) or None
        x = x + gate[:, None] * a  # (B, N, D)
        if self.dual:
            h2, gate2 = second
            x = x + gate2[:, None] * self.attn2(h2)  # (B, N, D)
        x = x + gate_mlp[:, None] * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.pre_only:
            return x, None
        ctx = ctx + c_gate[:, None] * a_ctx  # (B, L, D)
        h_ctx = modulate(self.norm2_context(ctx), c_shift_mlp, c_scale_mlp)  # (B, L, D)
        ctx = ctx + c_gate_mlp[:, None] * self.ff_context(h_ctx)  # (B, L, D)
        return x, ctx


def unpatchify(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Patch tokens back to an image: (B, h·w, p·p·C) → (B, C, h·p, w·p) (DiT's layout, shared
    by the MMDiT, DiT and PixArt transformers)."""
    c = x.shape[-1] // (p * p)
    x = x.reshape(x.shape[0], h, w, p, p, c)  # (B, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
    return x.reshape(x.shape[0], c, h * p, w * p)  # (B, C, H, W)


class MMDiT(nn.Module):
    """SD3-family MMDiT: latents (B, C, H, W) + text → velocity (B, C_out, H, W)."""

    takes_pooled = True  # adaLN conditioning on the pooled text vector (besides the tokens)

    def __init__(self, config: MMDiTConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = cfg = config if config is not None else MMDiTConfig(**kwargs)
        d, p = cfg.hidden_size, cfg.patch_size
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimestepTextEmbed(d, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                JointBlock(cfg, i == cfg.num_layers - 1, i in cfg.dual_attention_layers)
                for i in range(cfg.num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(d)
        self.proj_out = nn.Linear(d, p * p * cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, zero biases, N(0, 0.02) timestep MLP, adaLN-Zero.

        Every modulation layer and the output projection start at zero, so each block starts
        as the identity and a fresh model outputs exactly zero.
        """

        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        w = self.pos_embed.proj.weight  # initialise the patch conv like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        for mlp in (self.time_text_embed.timestep_embedder, self.time_text_embed.text_embedder):
            nn.init.normal_(mlp.linear_1.weight, std=0.02)
            nn.init.normal_(mlp.linear_2.weight, std=0.02)
        for block in self.transformer_blocks:
            for ada in (block.norm1.linear, block.norm1_context.linear):
                nn.init.zeros_(ada.weight)
                nn.init.zeros_(ada.bias)
        for layer in (self.norm_out.linear, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """x (B, C, H, W) latents; timestep (B,) = t·1000; context (B, L, joint_attention_dim);
        pooled (B, pooled_projection_dim). Returns (B, out_channels, H, W)."""
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        x = self.pos_embed(x)  # (B, N, D), N = h·w
        c = self.time_text_embed(timestep, pooled)  # (B, D)
        ctx = self.context_embedder(context)  # (B, L, D)
        for block in self.transformer_blocks:
            x, ctx = block(x, ctx, c)  # (B, N, D), (B, L, D)
        x = self.proj_out(self.norm_out(x, c))  # (B, N, p·p·C_out)
        return unpatchify(x, h, w, self.config.patch_size)  # (B, C_out, H, W)


#################################################################################
#                                  MMDiT Configs                                #
#################################################################################


def MMDiT_XS(**kw: Any) -> MMDiT:
    return MMDiT(num_layers=4, num_attention_heads=4, attention_head_dim=32, **kw)


def MMDiT_S(**kw: Any) -> MMDiT:
    return MMDiT(num_layers=12, num_attention_heads=6, attention_head_dim=64, **kw)


def MMDiT_B(**kw: Any) -> MMDiT:
    return MMDiT(num_layers=12, num_attention_heads=12, attention_head_dim=64, **kw)


def MMDiT_SD3_Medium(**kw: Any) -> MMDiT:  # stabilityai/stable-diffusion-3-medium (2B)
    return MMDiT(num_layers=24, num_attention_heads=24, pos_embed_max_size=192, **kw)


MMDIT_MODELS = {
    "MMDiT-XS": MMDiT_XS,
    "MMDiT-S": MMDiT_S,
    "MMDiT-B": MMDiT_B,
    "MMDiT-SD3-Medium": MMDiT_SD3_Medium,
}
