"""A decoder-only transformer over image tokens: LlamaGen's autoregressive model, or MaskGIT's
bidirectional one.

Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation"
(LlamaGen): an image is a grid of N = s² codes from a VQ tokenizer (:mod:`destatic.models.vq`),
read in raster order, and a Llama transformer predicts each code from the text and the codes
before it,

    p(c | text) = Π_i p(c_i | text, c_<i).

The text is a prefix of L tokens, ``Linear(context_dim → width)`` of the text encoder's token
states. The sequence ``[prefix ; c_0 … c_{N−2}]`` runs through pre-norm blocks

    h ← h + Attn(RMSNorm(h))        (RoPE on q and k, causal softmax attention)
    h ← h + SwiGLU(RMSNorm(h))      (SwiGLU(x) = W₂(SiLU(W₁x) ⊙ W₃x), Shazeer 2020)

and ``Linear(RMSNorm(h))`` at positions L−1 … L+N−2 gives the logits of c_0 … c_{N−1}.
RMSNorm(x) = x / √(mean(x²) + ε) · w (Zhang & Sennrich 2019). The rotary embedding (Su et al.
2021) is 1-D over the whole sequence: position p turns channel pair j of each query and key head
by the angle p·θ^(−2j/d). Generation keeps each layer's keys and values (:class:`KVCache`):
:meth:`TokenTransformer.start` runs the prefix, :meth:`TokenTransformer.extend` one new code, both
through the same blocks as :meth:`TokenTransformer.forward`.

With ``causal=False`` the same network is MaskGIT's bidirectional transformer (Chang et al. 2022,
"MaskGIT: Masked Generative Image Transformer"): the input is ``[prefix ; c_0 … c_{N−1}]`` where
unknown codes are the extra embedding row ``mask_id = num_codes``, every position attends to
every other, and position L+i gives the logits of c_i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.config import JsonConfig, check_positive, check_positive_float
from destatic.models.flux import apply_rope
from destatic.models.sdpa import scaled_dot_product_attention

__all__ = [
    "KVCache",
    "TokenTransformer",
    "TokenTransformerConfig",
    "rope_1d",
    "swiglu_hidden",
]

#: std of the normal initialisation (GPT-2, LlamaGen)
INIT_STD = 0.02


def swiglu_hidden(width: int) -> int:
    """LLaMA's SwiGLU width: round(8/3 · width), rounded up to a multiple of 64 (same parameter
    count as a 4·width GELU MLP)."""
    return -(-round(8 * width / 3) // 64) * 64


@dataclass
class TokenTransformerConfig(JsonConfig):
    """Hyper-parameters of :class:`TokenTransformer` (the module doc gives the architecture)."""

    num_codes: int = 512  # image vocabulary (the tokenizer's codebook size)
    grid_size: int = 8  # tokens per side; N = grid_size² codes per image
    context_dim: int = 384  # text-token width (MiniLM: 384)
    context_length: int = 24  # text prefix tokens L
    width: int = 256  # hidden width
    layers: int = 8  # transformer blocks
    heads: int = 8  # attention heads; width / heads channels each
    mlp_hidden: int = 0  # SwiGLU hidden width; 0: swiglu_hidden(width)
    causal: bool = True  # True: next-code prediction (LlamaGen); False: masked (MaskGIT)
    rope_theta: float = 10000.0  # RoPE base θ
    norm_eps: float = 1e-5  # RMSNorm ε

    @property
    def num_tokens(self) -> int:
        """N: codes per image."""
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def hidden(self) -> int:
        """The SwiGLU hidden width in use."""
        return self.mlp_hidden or swiglu_hidden(self.width)

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first field that cannot build a working
        network: counts positive integers (``mlp_hidden`` ≥ 0), ``width`` divisible by ``heads``
        into even head widths (rotary pairs), ``causal`` a bool, θ and ε finite and > 0."""
        check_positive(
            num_codes=self.num_codes,
            grid_size=self.grid_size,
            context_dim=self.context_dim,
            context_length=self.context_length,
            width=self.width,
            layers=self.layers,
            heads=self.heads,
        )
        if self.mlp_hidden != 0:
            check_positive(mlp_hidden=self.mlp_hidden)
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be true or false, got {self.causal!r}")
        check_positive_float(rope_theta=self.rope_theta, norm_eps=self.norm_eps)
        if self.width % self.heads or self.head_dim % 2:
            raise ValueError(
                f"width={self.width} must split into heads={self.heads} heads of an even width"
            )

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> TokenTransformerConfig:
        """Read a saved ``config.json`` (bookkeeping ``_…`` keys ignored, then validated)."""
        return cls.from_dict({k: v for k, v in d.items() if not k.startswith("_")})


def rope_1d(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (S, head_dim) float32, of the angle p·θ^(−2j/d) for position p and
    channel pair j, repeated for the pair's two channels (the interleaved form that
    :func:`destatic.models.flux.apply_rope` turns). Angles are computed in float64."""
    omega = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (d/2,)
    angles = positions.double()[:, None] * omega.to(positions.device)  # (S, d/2)
    return (
        angles.cos().repeat_interleave(2, dim=1).float(),
        angles.sin().repeat_interleave(2, dim=1).float(),
    )


@dataclass
class KVCache:
    """Each layer's attention keys and values so far, (B, heads, S, head_dim) each, rotary
    already applied to the keys. A forward that is given a cache appends to it."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        """S: the positions held (prefix and codes)."""
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions of ``layer``; return all its keys and values."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def select(self, index: torch.Tensor) -> KVCache:
        """A cache of the rows ``index`` (B' long: picked, repeated or reordered; beam search)."""
        return KVCache([k[index] for k in self.keys], [v[index] for v in self.values])


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE on queries and keys (torch SDPA), optionally
    reading and growing a :class:`KVCache`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wqkv = nn.Linear(width, 3 * width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        causal: bool,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.heads, -1).unbind(2)  # (B, T, H, d) each
        q, k = apply_rope(q, *rotary), apply_rope(k, *rotary)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, d)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, past + T, d)
        past = k.shape[2] - T
        mask, is_causal = None, causal and T > 1
        if is_causal and past:  # query t sees keys ≤ past + t
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            is_causal = False
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, width)


class SwiGLU(nn.Module):
    """W₂(SiLU(W₁x) ⊙ W₃x) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm Llama block: h + Attn(RMSNorm(h)), then h + SwiGLU(RMSNorm(h))."""

    def __init__(self, config: TokenTransformerConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.attention = SelfAttention(config.width, config.heads)
        self.ffn_norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.feed_forward = SwiGLU(config.width, config.hidden)

    def forward(
        self,
        h: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        causal: bool,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        h = h + self.attention(self.attention_norm(h), rotary, causal, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))  # (B, T, width)


class TokenTransformer(nn.Module):
    """LlamaGen (``causal=True``) or MaskGIT (``causal=False``) transformer over image codes,
    conditioned on a text prefix (the module doc gives the equations)."""

    def __init__(self, config: TokenTransformerConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.context_proj = nn.Linear(config.context_dim, config.width)
        self.tok_embeddings = nn.Embedding(config.num_codes + 1, config.width)  # + mask row
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.output = nn.Linear(config.width, config.num_codes, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, zero biases; the residual output projections (attention
        ``wo``, SwiGLU ``w2``) with std 0.02/√(2·layers) (GPT-2), so the residual stream's
        variance does not grow with depth."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=INIT_STD)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.layers:
            for w in (block.attention.wo.weight, block.feed_forward.w2.weight):
                nn.init.normal_(w, std=INIT_STD / math.sqrt(2 * self.config.layers))

    @property
    def mask_id(self) -> int:
        """The code that marks an unknown position (the extra embedding row)."""
        return self.config.num_codes

    @property
    def num_tokens(self) -> int:
        """N: codes per image."""
        return self.config.num_tokens

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    def _prefix(self, context: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if context.ndim != 3 or tuple(context.shape[1:]) != (cfg.context_length, cfg.context_dim):
            raise ValueError(
                f"context must be [B, {cfg.context_length}, {cfg.context_dim}], "
                f"got {list(context.shape)}"
            )
        return self.context_proj(context.to(self.dtype))  # (B, L, width)

    def _run(self, h: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        """The blocks on tokens at positions start, start+1, …; the final RMSNorm."""
        positions = torch.arange(start, start + h.shape[1], device=h.device)
        rotary = rope_1d(positions, self.config.head_dim, self.config.rope_theta)
        for i, block in enumerate(self.layers):
            h = block(h, rotary, self.config.causal, cache, i)
        return self.norm(h)

    def forward(self, codes: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, num_codes) float32 for codes (B, N) long and context (B, L, C).

        Causal: logits[:, i] predicts c_i from the context and codes[:, :i] (codes[:, N−1] is
        not read). Bidirectional: codes may hold :attr:`mask_id`; every position is predicted.
        """
        n, L = self.config.num_tokens, self.config.context_length
        if codes.ndim != 2 or codes.shape[1] != n or codes.shape[0] != context.shape[0]:
            raise ValueError(
                f"codes must be [B, {n}] with B = {context.shape[0]} context rows, "
                f"got {list(codes.shape)}"
            )
        if self.config.causal:
            codes = codes[:, :-1]  # c_{N−1} predicts nothing
        h = torch.cat([self._prefix(context), self.tok_embeddings(codes)], dim=1)
        h = self._run(h, 0, None)[:, L - 1 if self.config.causal else L :]  # (B, N, width)
        return self.output(h).float()

    def start(self, context: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Run the prefix of a causal model: (logits of c_0 (B, num_codes), its cache)."""
        if not self.config.causal:
            raise ValueError("start/extend need a causal model; decode this one with maskgit")
        cache = KVCache()
        h = self._run(self._prefix(context), 0, cache)
        return self.output(h[:, -1]).float(), cache

    def extend(self, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one code per row (B long) after the cached positions: the logits (B, num_codes)
        of the next code; the cache grows by one position."""
        if not self.config.causal:
            raise ValueError("start/extend need a causal model; decode this one with maskgit")
        limit = self.config.context_length + self.config.num_tokens - 1
        if cache.length >= limit:
            raise ValueError(f"the cache already holds all {self.config.num_tokens} codes")
        if codes.shape != (cache.batch_size,):
            raise ValueError(
                f"codes must be [{cache.batch_size}] (one per cache row), got {list(codes.shape)}"
            )
        h = self._run(self.tok_embeddings(codes)[:, None], cache.length, cache)
        return self.output(h[:, 0]).float()
