"""Captioned emoji motion clips, rendered on the fly: ``"red heart moves left"``.

An item is a *spec*: one Noto emoji (:func:`destatic.data.emoji.load_emoji`, train split) and one
of :data:`MOTIONS`, or (``pairs``) a two-object scene ``"a red heart moves left while a cat face
moves right"`` (about one item in ten). :meth:`MotionClips.render` draws each clip's random
parameters (start, speed, size, …) from the caller's generator only and renders every frame of
every clip in one :func:`torch.nn.functional.grid_sample` call.

Rendering works in *ink* ``k = 1 − image`` (white = 0), so the zero padding of ``grid_sample``
is white paper. An object with centre ``c(t)``, size ``s(t)`` (the width of its glyph as a
fraction of the frame) and angle ``θ(t)`` (clockwise on screen) maps an output point ``p``
(normalised to ``[-1, 1]``, y down) to the sprite point

    q = R(−θ)·(p − c) / s,

a per-frame affine warp. Two objects composite "A over B" in ink space with A's alpha taken as
its ink's largest channel (the emoji sit on white, so distance from white is their coverage):
``k = k_A + (1 − α_A)·k_B``.

Sprites are the emoji at the clip size (``load_emoji(size)``: LANCZOS from the 136-px artwork),
1.4–2× the drawn object, so bilinear sampling barely aliases. Measured on 64 clips of 8×32²
against 4×-supersampled rendering from 64² sprites: 38 dB; sampling 64² sprites directly, 30 dB
(aliasing); 2× supersampling from 64², 44 dB at about five times the cost.

Motions, over normalised time ``t ∈ [0, 1]``: the four translations go a random distance
(half to all of the free room) in a straight line; ``zooms in`` / ``out`` grow / shrink the size
by a random factor 0.4–0.6 about a fixed centre; ``rotates`` turns 45–90° (more would make
the direction ambiguous between first and last frame); ``bounces`` follows
``y = floor − A·|sin(π·b·t)|`` with b = 1 or 2 bounces (ending on the floor); ``falls``
accelerates down, ``y = y₀ + d·t²``.
Objects stay (mostly: glyphs vary) inside the frame.

The split is over *(emoji, motion) pairs* of the train emoji: a fixed ~10% of them (sha1 of
``"emoji|motion"``, :func:`destatic.data.emoji.split_of`) is held out, so ``"heldout"`` tests
composition (seen emoji, seen motion, unseen pair). Held-out items are single-object clips.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from destatic.data.emoji import load_emoji, split_of

__all__ = ["MOTIONS", "MotionClips", "motion_of", "parse_caption"]

MOTIONS: tuple[str, ...] = (
    "moves left",
    "moves right",
    "moves up",
    "moves down",
    "zooms in",
    "zooms out",
    "rotates clockwise",
    "rotates anticlockwise",
    "bounces",
    "falls",
)
SIZE_RANGE = (0.45, 0.60)  # object width / frame width, one object
PAIR_SIZE_RANGE = (0.32, 0.42)  # two objects
PAIR_FRACTION = 0.1  # two-object items per one-object item (train split)
INSIDE = 1.0  # the part of a glyph's mean half-size kept inside the frame (or its region)
GLYPH_FILL = 0.83  # mean width of a Noto glyph's ink / its sprite's width
PAIR_SEED = 16
_HORIZONTAL = frozenset({"moves left", "moves right"})
_VERTICAL = frozenset({"moves up", "moves down", "bounces", "falls"})
N_UNIFORMS = 5  # per object: size, x, y and two motion parameters


def motion_of(caption: str) -> str | None:
    """The motion of a one-object caption (``"red heart moves left"`` → ``"moves left"``), else
    None (no motion, or a two-object caption: see :func:`parse_caption`)."""
    objects = parse_caption(caption)
    return objects[0][1] if len(objects) == 1 else None


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """``[(emoji name, motion), …]`` of a clip caption (one or two objects); ``[]`` if a part
    does not end with a motion."""
    text = caption.strip()
    parts = text.split(" while ") if text.startswith("a ") and " while " in text else [text]
    out = []
    for i, part in enumerate(parts):
        part = part[2:] if len(parts) > 1 and part.startswith("a ") else part
        motion = next((m for m in MOTIONS if part.endswith(" " + m)), None)
        if motion is None or (len(parts) > 1 and i > 1):
            return []
        out.append((part[: -len(motion) - 1], motion))
    return out


def is_heldout(name: str, motion: str) -> bool:
    """Whether the (emoji, motion) pair is in the fixed held-out ~10%."""
    return split_of(f"{name}|{motion}") == "heldout"


class MotionClips:
    """Captioned motion clips ``[n, 3, frames, size, size]`` in ``[-1, 1]``, drawn on demand.

    ``len(self)`` items, each with ``captions[i]`` (main caption first, then the emoji's
    alternative names) and a spec ``objects[i] = ((emoji, motion), …)`` of indices into
    ``names`` and :data:`MOTIONS`.
    """

    def __init__(
        self,
        size: int = 32,
        frames: int = 8,
        split: str = "train",
        *,
        pairs: bool = True,
        progress: bool = True,
        root: Path | None = None,
    ) -> None:
        if size < 2 or frames < 1:
            raise ValueError(f"need size ≥ 2 and frames ≥ 1, got size={size}, frames={frames}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.size, self.frames, self.split = size, frames, split
        emoji = load_emoji(size, root=root, progress=progress).train()
        self.names: list[str] = emoji.captions
        # ink (255 − image) as uint8 [E, 3, S, S]; floats only for the drawn clips
        self._ink = torch.from_numpy(255 - emoji.images).permute(0, 3, 1, 2).contiguous()
        singles = [
            (e, m)
            for e, name in enumerate(self.names)
            for m, motion in enumerate(MOTIONS)
            if is_heldout(name, motion) == (split == "heldout")
        ]
        specs = [[s, (-1, -1)] for s in singles]
        if pairs and split == "train":
            rng = np.random.default_rng(PAIR_SEED)
            ab = rng.integers(0, len(singles), size=(int(len(singles) * PAIR_FRACTION), 2))
            specs += [[singles[a], singles[b]] for a, b in ab if singles[a][0] != singles[b][0]]
        self.objects = torch.tensor(specs, dtype=torch.long)  # [N, 2 objects, (emoji, motion)]
        self.captions = [self._captions(spec, emoji.alt_captions) for spec in specs]

    def __len__(self) -> int:
        return len(self.captions)

    def _captions(self, spec: list[tuple[int, int]], alts: list[list[str]]) -> list[str]:
        (e, m), (e2, m2) = spec
        if e2 < 0:
            return [f"{name} {MOTIONS[m]}" for name in (self.names[e], *alts[e])]
        return [f"a {self.names[e]} {MOTIONS[m]} while a {self.names[e2]} {MOTIONS[m2]}"]

    def render(
        self, index: torch.Tensor, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The clips of items ``index`` as float ``[n, 3, frames, size, size]`` in ``[-1, 1]``;
        every random parameter comes from ``generator`` (CPU), so the same generator state
        gives the same clips."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        n = len(index)
        spec = self.objects[index]  # [n, 2, 2]
        u = torch.rand(n, 2, N_UNIFORMS, generator=generator, dtype=torch.float64)
        two = spec[:, 1, 0] >= 0
        lo = torch.where(two, PAIR_SIZE_RANGE[0], SIZE_RANGE[0]).double()
        hi = torch.where(two, PAIR_SIZE_RANGE[1], SIZE_RANGE[1]).double()
        size = lo + (hi - lo) * u[:, :, 0].T  # [2 objects, n]
        ink = self._draw(spec[:, 0], u[:, 0], _regions(spec, two, 0), size[0], device)
        if two.any():
            sub = two.nonzero().squeeze(1)
            box = _regions(spec[sub], two[sub], 1)
            b = self._draw(spec[sub, 1], u[sub, 1], box, size[1, sub], device)
            a = ink[sub]
            ink[sub] = a + (1 - a.amax(dim=1, keepdim=True)) * b
        h = w = self.size
        return ink.clamp_(0, 1).mul_(-2).add_(1).reshape(n, 3, self.frames, h, w)

    def _draw(
        self,
        spec: torch.Tensor,
        u: torch.Tensor,
        box: torch.Tensor,
        size: torch.Tensor,
        device: torch.device | str,
    ) -> torch.Tensor:
        """Ink ``[n, 3, frames·size, size]`` of one object per clip (frames stacked in height)."""
        t = torch.linspace(0, 1, self.frames, dtype=torch.float64)
        cx, cy, s, theta = object_path(spec[:, 1], size, u[:, 1:], box, t)
        grid = _grid(cx, cy, s, theta, self.size).to(device)
        sprites = self._ink[spec[:, 0]].to(device).float().div_(255)
        return F.grid_sample(sprites, grid, padding_mode="zeros", align_corners=False)


def _regions(spec: torch.Tensor, two: torch.Tensor, slot: int) -> torch.Tensor:
    """Each object's box ``[n, 4] = (x_lo, x_hi, y_lo, y_hi)`` (normalised): the whole frame for
    one object; for two, the top / bottom halves when neither moves vertically, else the
    left / right halves when neither moves horizontally, else the whole frame (they may cross)."""
    box = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64).repeat(len(spec), 1)
    vertical = torch.tensor([m in _VERTICAL for m in MOTIONS])
    horizontal = torch.tensor([m in _HORIZONTAL for m in MOTIONS])
    m = spec[:, :, 1].clamp(min=0)
    stack_y = two & ~vertical[m].any(dim=1)
    stack_x = two & ~stack_y & ~horizontal[m].any(dim=1)
    sign = -1.0 if slot == 0 else 1.0  # first object: top / left
    box[stack_y, 2:] = torch.tensor(sorted([0.0, sign]), dtype=torch.float64)
    box[stack_x, :2] = torch.tensor(sorted([0.0, sign]), dtype=torch.float64)
    return box


def object_path(
    motion: torch.Tensor, size: torch.Tensor, u: torch.Tensor, box: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre ``(cx, cy)``, size and clockwise angle ``[n, frames]`` of each object along its
    motion (see the module docstring), from 4 uniforms per object ``u`` and its box."""
    n = len(motion)
    half = INSIDE * size
    x_lo, x_hi = box[:, 0] + half, box[:, 1] - half
    y_lo, y_hi = box[:, 2] + half, box[:, 3] - half
    x_hi, y_hi = torch.maximum(x_hi, x_lo), torch.maximum(y_hi, y_lo)
    x0 = x_lo + (x_hi - x_lo) * u[:, 0]
    y0 = y_lo + (y_hi - y_lo) * u[:, 1]
    cx = x0[:, None].expand(n, len(t)).clone()
    cy = y0[:, None].expand(n, len(t)).clone()
    s = size[:, None].expand(n, len(t)).clone()
    theta = torch.zeros(n, len(t), dtype=torch.float64)
    frac = 0.5 + 0.5 * u[:, 2]  # of the free room, or of the strength range
    for k, name in enumerate(MOTIONS):
        sel = motion == k
        if not sel.any():
            continue
        f = frac[sel, None]
        if name in ("moves left", "moves right"):
            lo, hi = x_lo[sel, None], x_hi[sel, None]
            d = f * (hi - lo)
            if name == "moves left":
                cx[sel] = lo + d + (hi - lo - d) * u[sel, 3:4] - d * t
            else:
                cx[sel] = lo + (hi - lo - d) * u[sel, 3:4] + d * t
        elif name in ("moves up", "moves down", "falls"):
            lo, hi = y_lo[sel, None], y_hi[sel, None]
            d = f * (hi - lo)
            if name == "moves up":
                cy[sel] = lo + d + (hi - lo - d) * u[sel, 3:4] - d * t
            else:
                path = t**2 if name == "falls" else t
                cy[sel] = lo + (hi - lo - d) * u[sel, 3:4] + d * path
        elif name in ("zooms in", "zooms out"):
            ratio = 0.4 + 0.2 * u[sel, 3:4]
            grow = ratio + (1 - ratio) * (t if name == "zooms in" else 1 - t)
            s[sel] = size[sel, None] * grow
        elif name.startswith("rotates"):
            total = math.pi / 2 * f * (1 if name == "rotates clockwise" else -1)
            theta[sel] = total * t
        elif name == "bounces":
            lo, hi = y_lo[sel, None], y_hi[sel, None]
            bounces = 1 + (u[sel, 3:4] >= 0.5).double()
            cy[sel] = hi - f * (hi - lo) * torch.sin(math.pi * bounces * t).abs()
    return cx, cy, s, theta


def _grid(
    cx: torch.Tensor, cy: torch.Tensor, s: torch.Tensor, theta: torch.Tensor, px: int
) -> torch.Tensor:
    """The ``grid_sample`` grid ``[n, frames·px, px, 2]``: sprite point
    ``q = R(−θ)(p − c)/s`` of each output pixel centre ``p`` of each frame (``s`` scaled by the
    sprite's share of glyph, :data:`GLYPH_FILL`)."""
    n, frames = cx.shape
    cos, sin = torch.cos(theta), torch.sin(theta)
    inv = GLYPH_FILL / s
    p = ((torch.arange(px, dtype=torch.float64) + 0.5) * (2 / px) - 1).float()
    dx, dy = (cx[..., None] - p).float(), (cy[..., None] - p).float()  # [n, F, px] each, negated
    grid = torch.empty(n, frames, px, px, 2)
    for k, (along_x, along_y) in enumerate(((cos, sin), (-sin, cos))):
        wx, wy = (-along_x * inv).float()[..., None], (-along_y * inv).float()[..., None]
        torch.add((wx * dx)[:, :, None, :], (wy * dy)[:, :, :, None], out=grid[..., k])
    return grid.view(n, frames * px, px, 2)
