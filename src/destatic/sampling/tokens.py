"""Decoders of discrete image tokens: autoregressive sampling, beam search and MaskGIT.

The model is duck-typed (this layer imports nothing from ``models``): ``forward(codes, context)
-> logits [B, N, V]``, and for the causal decoders ``start(context) -> (logits [B, V], cache)``,
``extend(codes [B], cache) -> logits [B, V]`` with ``cache.select(index)``; ``num_tokens`` (N)
and ``mask_id`` (the code of an unknown position). The decoders call nothing else, so a FLOP
counter around one sees the whole generation.

Classifier-free guidance on logits (Ho & Salimans 2022, as LlamaGen uses it):
``ℓ = ℓ_u + w·(ℓ_c − ℓ_u)``, the conditional and unconditional contexts run as one batch of 2B;
w = 1 (or no unconditional context) runs the conditional rows alone.

Randomness is per row: row b draws every Gumbel variable from its own generator b, so a seed
gives the same image alone or anywhere in a batch. Sampling a code is the Gumbel-max trick
(Gumbel 1954; Maddison et al. 2014): ``argmax_v (ℓ_v/T + g_v)`` with g_v = −log(−log u_v),
u_v ~ U(0, 1), is a draw from softmax(ℓ/T).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "DECODERS",
    "autoregressive",
    "beam_search",
    "filter_logits",
    "guide",
    "maskgit",
]

#: The token decoders (``GenerationRequest.sampler`` of a token model).
DECODERS = ("autoregressive", "beam", "maskgit")

#: ``callback(i, codes)`` after step i with the codes so far [B, N] (unknown: ``mask_id``).
Callback = Callable[[int, torch.Tensor], None]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with −inf outside the top-k, then outside the nucleus (last axis).

    Top-k keeps the k largest logits (ties with the k-th kept; 0: off). Top-p (Holtzman et al.
    2020, "The Curious Case of Neural Text Degeneration") keeps the smallest set of the most
    likely codes whose probability sums to ≥ p: a code stays when the probability of the codes
    ranked above it is < p, so the most likely code always stays (1.0: off).
    """
    _check_filter(top_k, top_p)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        above = probs.cumsum(dim=-1) - probs  # probability of the codes ranked above
        drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above >= top_p)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``uncond + scale·(cond − uncond)``; scale 1 → cond."""
    return cond if scale == 1.0 else uncond + scale * (cond - uncond)


def autoregressive(
    model: Any,
    context: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    guidance: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generators: Sequence[torch.Generator],
    callback: Callback | None = None,
) -> torch.Tensor:
    """Codes [B, N] drawn one at a time in raster order with a KV cache (LlamaGen):
    c_i ~ softmax(filter(ℓ_i / T)) with ℓ_i the guided logits given the codes before;
    temperature 0 takes the argmax (greedy)."""
    _check_sampling(temperature, top_k, top_p)
    B, paired, ctx = _contexts(context, uncond, guidance, generators)
    n = model.num_tokens
    codes = torch.full((B, n), model.mask_id, dtype=torch.long, device=context.device)
    logits, cache = model.start(ctx)
    for i in range(n):
        guided = _guided(logits, B, paired, guidance)
        dist = _distribution(guided, temperature, top_k, top_p)
        codes[:, i] = _draw(dist, temperature, generators)
        if callback is not None:
            callback(i, codes.clone())
        if i < n - 1:
            logits = model.extend(codes[:, i].repeat(2 if paired else 1), cache)
    return codes


def beam_search(
    model: Any,
    context: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    guidance: float = 1.0,
    beams: int = 4,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Codes [B, N]: per item, the sequence of highest score Σ_i log softmax(ℓ_i)[c_i] (ℓ the
    guided logits) among ``beams`` kept at each step (deterministic; beams = 1 is greedy).

    Each step scores every (beam, code) continuation, keeps the ``beams`` best per item and
    reorders the KV cache to them. ``callback`` sees the best beam so far.
    """
    if not (isinstance(beams, int) and not isinstance(beams, bool) and beams > 0):
        raise ValueError(f"beams must be a positive integer, got {beams!r}")
    B, paired, ctx = _contexts(context, uncond, guidance, None)
    n = model.num_tokens
    logits, cache = model.start(ctx)  # (B or 2B, V)
    V = logits.shape[-1]
    seqs = torch.empty(B, 1, 0, dtype=torch.long, device=context.device)  # (B, beams, i)
    scores = torch.zeros(B, 1, device=context.device)  # (B, beams) summed log-probabilities
    for i in range(n):
        kept = seqs.shape[1]  # beams per item so far; cache row b·kept + j is beam j of item b
        logp = _guided(logits, B * kept, paired, guidance).log_softmax(dim=-1)  # (B·kept, V)
        total = (scores[..., None] + logp.view(B, kept, V)).flatten(1)  # (B, kept·V)
        scores, index = total.topk(min(beams, total.shape[1]), dim=-1)  # best first
        beam, code = index // V, index % V  # (B, beams')
        seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, i)), code[..., None]], 2)
        if callback is not None:
            callback(i, _pad(seqs[:, 0], n, model.mask_id))
        if i == n - 1:
            break
        rows = (torch.arange(B, device=beam.device)[:, None] * kept + beam).flatten()
        if paired:  # the unconditional rows follow the conditional ones
            rows = torch.cat([rows, rows + B * kept])
        cache = cache.select(rows)
        logits = model.extend(code.flatten().repeat(2 if paired else 1), cache)
    return seqs[:, 0]


def maskgit(
    model: Any,
    context: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    guidance: float = 1.0,
    steps: int = 8,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    choice_temperature: float = 4.5,
    generators: Sequence[torch.Generator],
    callback: Callback | None = None,
) -> torch.Tensor:
    """Codes [B, N] by MaskGIT's parallel decoding (Chang et al. 2022, Sec. 3.2 and 3.3).

    Start all masked. Pass t = 1 … T: sample a code c_i ~ softmax(filter(ℓ_i/T_s)) for every
    masked position (known codes stay); score it by its confidence
    ``log p(c_i) + τ·(1 − t/T)·g_i`` (g_i Gumbel noise, τ = ``choice_temperature``, known
    codes +∞; the official implementation's ``mask_by_random_topk``); keep the N − n_t most
    confident and mask the rest again, n_t = ⌊γ(t/T)·N⌋ with the cosine schedule
    γ(r) = cos(π r / 2), at most the masked count − 1 so that each pass fixes a code. γ(1) = 0:
    the last pass leaves nothing masked; ``steps=1`` fills every code in one pass.
    """
    _check_sampling(temperature, top_k, top_p)
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (math.isfinite(choice_temperature) and choice_temperature >= 0):
        raise ValueError(
            f"choice_temperature must be a finite number ≥ 0, got {choice_temperature}"
        )
    B, paired, ctx = _contexts(context, uncond, guidance, generators)
    n, mask_id = model.num_tokens, model.mask_id
    codes = torch.full((B, n), mask_id, dtype=torch.long, device=context.device)
    for t in range(1, steps + 1):
        unknown = codes == mask_id  # (B, N)
        masked = int(unknown[0].sum())  # every row has the same count
        if masked == 0:
            break
        logits = model.forward(codes.repeat(2 if paired else 1, 1), ctx)  # (B or 2B, N, V)
        guided = _guided(logits, B, paired, guidance)
        dist = _distribution(guided, temperature, top_k, top_p)  # (B, N, V)
        sampled = _draw(dist, temperature, generators)  # (B, N)
        logp = dist.float().log_softmax(dim=-1)
        confidence = logp.gather(-1, sampled[..., None])[..., 0]  # (B, N)
        noise = _gumbel(generators, (n,), confidence.device)
        confidence = confidence + choice_temperature * (1 - t / steps) * noise
        confidence = confidence.masked_fill(~unknown, math.inf)
        sampled = torch.where(unknown, sampled, codes)
        remask = min(math.floor(math.cos(math.pi / 2 * t / steps) * n), masked - 1)
        keep = confidence.topk(n - remask, dim=-1).indices  # (B, N − n_t)
        codes = torch.full_like(codes, mask_id).scatter(1, keep, sampled.gather(1, keep))
        if callback is not None:
            callback(t - 1, codes.clone())
    return codes


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _contexts(
    context: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float,
    generators: Sequence[torch.Generator] | None,
) -> tuple[int, bool, torch.Tensor]:
    """(B, whether guidance runs an unconditional half, the model's context [B or 2B, L, C])."""
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}")
    B = context.shape[0]
    if generators is not None and len(generators) != B:
        raise ValueError(f"got {len(generators)} generators for a batch of {B}: pass one per row")
    paired = uncond is not None and guidance != 1.0
    if not paired:
        return B, False, context
    if uncond.shape[0] == 1:
        uncond = uncond.expand(B, -1, -1)
    if uncond.shape != context.shape:
        raise ValueError(
            f"uncond must be shaped like context {list(context.shape)}, got {list(uncond.shape)}"
        )
    return B, True, torch.cat([context, uncond.to(context.dtype)])


def _guided(logits: torch.Tensor, rows: int, paired: bool, guidance: float) -> torch.Tensor:
    """The guided logits of the first ``rows`` rows (the conditional half when paired)."""
    return guide(logits[:rows], logits[rows:], guidance) if paired else logits


def _distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """The logits a code is drawn from: filter(ℓ/T); at T = 0 the logits themselves."""
    return filter_logits(logits / temperature, top_k, top_p) if temperature > 0 else logits


def _gumbel(
    generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Standard Gumbel noise [B, *shape], row b from generator b (float32, drawn on each
    generator's device)."""
    rows = []
    for g in generators:
        u = torch.rand(shape, generator=g, device=g.device, dtype=torch.float32)
        rows.append(-torch.log(-torch.log(u)))  # u = 0 gives −inf: never chosen
    return torch.stack(rows).to(device)


def _draw(
    dist: torch.Tensor, temperature: float, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Codes [B, …] from the logits [B, …, V] of :func:`_distribution`: the argmax at temperature
    0, else Gumbel-max with row b's noise from generator b."""
    if temperature == 0:
        return dist.argmax(dim=-1)
    dist = dist.float()
    return (dist + _gumbel(generators, tuple(dist.shape[1:]), dist.device)).argmax(dim=-1)


def _pad(codes: torch.Tensor, n: int, mask_id: int) -> torch.Tensor:
    """[B, i] codes completed to [B, N] with ``mask_id``."""
    return torch.nn.functional.pad(codes, (0, n - codes.shape[1]), value=mask_id)


def _check_filter(top_k: int, top_p: float) -> None:
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"top_k must be an integer ≥ 0 (0: off), got {top_k!r}")
    if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p!r}")


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number ≥ 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0 (0: greedy), got {temperature}")
    _check_filter(top_k, top_p)
