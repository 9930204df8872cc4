"""AUTOMATIC1111's prompt syntax for CLIP text encoders: attention weights and long prompts.

* ``(word)`` multiplies the attention of ``word`` by 1.1, ``[word]`` divides it by 1.1,
  ``(word:1.3)`` sets the factor, and they nest: ``((word))`` is 1.21. ``\\(``, ``\\)``,
  ``\\[``, ``\\]`` and ``\\\\`` are the literal characters. ``BREAK`` ends the current chunk.
* A prompt becomes chunks of 75 tokens, each encoded on its own as ``BOS + 75 tokens + EOS``
  (padded), and the chunks' states are concatenated: a prompt longer than CLIP's 77 positions
  is not truncated. As in A1111, a chunk that fills up breaks after its last comma when that
  comma is at most ``comma_backtrack`` (20) tokens back, moving the rest to the next chunk.
* The weights multiply each token's output state; then the mean of the states is restored
  (A1111's "Original" emphasis): ``z ← z·w · mean(z)/mean(z·w)``. A1111 takes that mean over the
  whole batch; here it is per prompt and chunk, so a prompt encodes the same alone or in a
  batch (the two agree for a batch of one).

:func:`parse_prompt_attention` is A1111's parser (same results, BREAK as ``["BREAK", -1]``);
:func:`chunk_prompt` its tokenisation into chunks; :func:`apply_weights` the emphasis;
:func:`encode_chunked` all three for a batch of prompts through one CLIP tower (any of its
layers), as A1111 runs each tower of SD 1.x/2.x and SDXL; :func:`plain_text` the prompt with the
syntax removed (for encoders that take no weights, e.g. SD3's T5).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Chunk",
    "apply_weights",
    "chunk_prompt",
    "encode_chunked",
    "is_plain",
    "parse_prompt_attention",
    "plain_text",
]

_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_prompt_attention(text: str) -> list[list[Any]]:
    """``[[text, weight], …]`` with runs of equal weight merged; ``BREAK`` as ``["BREAK", -1]``.

    >>> parse_prompt_attention("a (very beautiful:1.3) girl")
    [['a ', 1.0], ['very beautiful', 1.3], [' girl', 1.0]]
    >>> parse_prompt_attention("an (important) word")
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    res: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_open.append(len(res))
        elif part == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif part == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif part == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, piece in enumerate(_BREAK.split(part)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([piece, 1.0])
    for start in round_open:  # unclosed brackets still count (A1111)
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    if not res:
        return [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


def is_plain(text: str) -> bool:
    """Whether ``text`` uses none of the syntax: no brackets, escapes or BREAK."""
    return parse_prompt_attention(text) == [[text, 1.0]]


def plain_text(text: str) -> str:
    """``text`` without the syntax: brackets, weights and escapes dropped, ``BREAK`` a space.

    >>> plain_text("a (red:1.5) cat BREAK [dim]")
    'a red cat dim'
    """
    return "".join(" " if w == -1 else t for t, w in parse_prompt_attention(text))


@dataclass
class Chunk:
    """One encoder call's tokens: ``BOS + ≤ 75 tokens + EOS``, padded to ``length``."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)  # True for BOS, the tokens and EOS


def _comma_id(tokenizer: Any) -> int | None:
    ids = tokenizer(",", add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def chunk_prompt(
    text: str, tokenizer: Any, length: int = 77, comma_backtrack: int = 20
) -> list[Chunk]:
    """The chunks of ``text`` for a CLIP whose context is ``length`` tokens (A1111's
    ``tokenize_line``): ``length - 2`` tokens each, with their weights."""
    size = length - 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = _comma_id(tokenizer)
    parsed = parse_prompt_attention(text)
    pieces = tokenizer([t for t, _ in parsed], add_special_tokens=False)["input_ids"]
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        n = len(ids)
        chunks.append(
            Chunk(
                [bos, *ids, eos] + [pad] * (size - n),
                [1.0, *weights, 1.0] + [1.0] * (size - n),
                [True] * (n + 2) + [False] * (size - n),
            )
        )
        ids, weights, last_comma = [], [], -1

    for tokens, (piece, weight) in zip(pieces, parsed, strict=True):
        if piece == "BREAK" and weight == -1:
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == size and last_comma != -1 and size - last_comma <= comma_backtrack:
                cut = last_comma + 1
                moved, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved, moved_weights
            if len(ids) == size:
                close()
            ids.append(token)
            weights.append(float(weight))
    if ids or not chunks:
        close()
    return chunks


def apply_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token states ``[N, T, D]`` scaled by ``weights [N, T]``, each row's mean restored (A1111's
    emphasis; per row rather than over the batch). All-one weights return ``states`` as is."""
    if bool((weights == 1).all()):
        return states
    weighted = states * weights.unsqueeze(-1).to(states.dtype)
    dims = tuple(range(1, states.ndim))
    return weighted * (states.mean(dims, keepdim=True) / weighted.mean(dims, keepdim=True))


#: ``states(ids [N, T], mask [N, T]) -> (per-token states [N, T, D], pooled [N, P])``
States = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def encode_chunked(
    prompts: list[str], tokenizer: Any, length: int, states: States, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A1111's weighted, chunked encoding of ``prompts`` by one CLIP tower: each prompt in
    chunks of ``length`` tokens (a batch padded to its longest prompt with chunks of the empty
    prompt, as A1111 does), each chunk encoded alone by ``states`` and weighted
    (:func:`apply_weights`), the chunks' states concatenated. Returns ``(tokens [B, k·length,
    D], pooled [B, P], mask [B, k·length])``; the pooled vector is the first chunk's, unweighted
    (A1111: ``zs[0].pooled``; weights touch the token states only)."""
    chunked = [chunk_prompt(p, tokenizer, length) for p in prompts]
    count = max(len(c) for c in chunked)
    empty = chunk_prompt("", tokenizer, length)[0]
    flat = [chunk for c in chunked for chunk in c + [empty] * (count - len(c))]
    ids = torch.tensor([c.ids for c in flat], device=device)
    mask = torch.tensor([c.mask for c in flat], device=device)
    tokens, pooled = states(ids, mask)
    tokens = apply_weights(tokens, torch.tensor([c.weights for c in flat], device=device))
    n = len(prompts)
    return (
        tokens.reshape(n, count * length, -1),
        pooled.reshape(n, count, -1)[:, 0],
        mask.reshape(n, count * length),
    )
