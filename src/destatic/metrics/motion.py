"""How a generated clip moves, measured from its frames: the object's track (centroid, size,
angle per frame), the motion that track shows, flicker, and the frames cut out around the
object (for identity checks with the evaluator).

The clips are objects on white (the emoji motion data, :mod:`destatic.data.motion`). Per frame
``k`` the object's *ink* is ``w_k(x) = max(0, 1 − mean_rgb(x) − τ)`` (τ ignores faint noise), and

* the centroid ``c_k = Σ w_k(x)·x / Σ w_k(x)`` (pixels, y down);
* the size ``s_k = sqrt(Σ w_k(x))`` (a length: doubling the object's side doubles it);
* the angle ``θ_k``: the rotation of frame 0's ink about its centroid that best matches frame
  k's ink about its own (least squares over a grid of angles; positive = clockwise on screen).

:func:`classify_motion` names the motion from the track by which of its normalised changes is
largest: translation ``(c_F − c_0) / H``, zoom ``log(s_F / s_0)``, rotation ``θ_F`` and, for
vertical paths, their shape (a bounce returns, a fall accelerates). The thresholds are checked
against the rendered training clips in the tests, where the estimate must name the rendered
motion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from destatic.data.motion import MOTIONS

__all__ = [
    "MOTION_NAMES",
    "Track",
    "classify_motion",
    "flicker",
    "motion_accuracy",
    "object_crops",
    "track",
]

#: The motions :func:`classify_motion` tells apart: the captions' wording.
MOTION_NAMES = MOTIONS

INK_FLOOR = 0.08  # τ: ink below this (JPEG-like noise, faint grain on white) is ignored
ANGLES = torch.arange(-90, 91, 6, dtype=torch.float32)  # the rotation search grid, degrees
STILL = 0.3  # below this every score is noise: the clip shows no motion ("still")


@dataclass
class Track:
    """Per clip and frame: centroid ``x``, ``y`` (pixels), ``size`` (pixels) and ``angle``
    (degrees, clockwise), each ``(B, F)``; ``height`` of the frames."""

    x: torch.Tensor
    y: torch.Tensor
    size: torch.Tensor
    angle: torch.Tensor
    height: int


def _ink(clips: torch.Tensor) -> torch.Tensor:
    """Clips ``(B, 3, F, H, W)`` in [0, 1] → ink ``(B, F, H, W)``."""
    return (1 - clips.float().mean(1) - INK_FLOOR).clamp(min=0)


def _centred(ink: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Ink ``(N, H, W)`` shifted so its centroid ``(cx, cy)`` sits at the frame's centre."""
    n, h, w = ink.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = (cx - (w - 1) / 2) * 2 / w
    theta[:, 1, 2] = (cy - (h - 1) / 2) * 2 / h
    grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
    return F.grid_sample(ink[:, None], grid, align_corners=False)[:, 0]


def _best_angles(
    first: torch.Tensor, frames: torch.Tensor, zoom: torch.Tensor, chunk: int = 128
) -> torch.Tensor:
    """For each pair (centred ink of frame 0, of frame k), the angle in :data:`ANGLES` whose
    rotation of the first, scaled by ``zoom`` (``s_k / s_0``, so a zoom is not mistaken for a
    turn), best matches the second (least squares), in degrees, clockwise."""
    n, h, w = first.shape
    k = len(ANGLES)
    a = torch.deg2rad(ANGLES)
    rotation = torch.stack([torch.cos(a), torch.sin(a), -torch.sin(a), torch.cos(a)], 1)
    best = torch.empty(n)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        # sampling the first at R(−θ)·p / zoom turns it θ clockwise on screen (y points down)
        theta = torch.zeros(m, k, 2, 3)
        theta[..., :2] = rotation.view(1, k, 2, 2) / zoom[lo : lo + m].clamp(min=1e-3).view(
            m, 1, 1, 1
        )
        grid = F.affine_grid(theta.view(m * k, 2, 3), (m * k, 1, h, w), align_corners=False)
        source = first[lo : lo + m, None].expand(m, k, h, w).reshape(m * k, 1, h, w)
        turned = F.grid_sample(source, grid, align_corners=False).view(m, k, h, w)
        err = (turned - frames[lo : lo + m, None]).pow(2).flatten(2).sum(2)  # (m, k)
        best[lo : lo + m] = ANGLES[err.argmin(1)]
    return best


def track(clips: torch.Tensor) -> Track:
    """The object's track in each clip ``(B, 3, F, H, W)`` in [0, 1] (see the module
    docstring); a frame without ink keeps the previous frame's values."""
    if clips.ndim != 5 or clips.shape[1] != 3:
        raise ValueError(f"clips must be (B, 3, F, H, W), got {tuple(clips.shape)}")
    ink = _ink(clips.cpu())
    b, f, h, w = ink.shape
    mass = ink.flatten(2).sum(-1).clamp(min=1e-6)  # (B, F)
    ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    cx = (ink * xs).flatten(2).sum(-1) / mass
    cy = (ink * ys).flatten(2).sum(-1) / mass
    centred = _centred(ink.reshape(b * f, h, w), cx.reshape(-1), cy.reshape(-1)).view(b, f, h, w)
    first = centred[:, :1].expand(b, f, h, w).reshape(b * f, h, w)
    size = mass.sqrt()
    zoom = (size / size[:, :1]).reshape(-1)
    angle = _best_angles(first, centred.reshape(b * f, h, w), zoom).view(b, f)
    return Track(cx, cy, size, angle, h)


def classify_motion(t: Track) -> list[str]:
    """The motion each track shows, one of :data:`MOTION_NAMES`, or ``"still"`` when no score
    reaches :data:`STILL` (see the module docstring).

    Scores, each ≈ 1 at a clear instance of its motion over a clip: horizontal/vertical
    displacement as a share of a quarter of the frame, zoom as ``log(s_F/s_0) / log 1.4``,
    rotation as ``θ_F / 30°``. A vertical path that leaves its start and comes back by at least
    half its excursion is a bounce; one going down whose second half covers over 1.8× its
    first half is a fall."""
    quarter = t.height / 4
    dx = (t.x[:, -1] - t.x[:, 0]) / quarter
    dy = (t.y[:, -1] - t.y[:, 0]) / quarter
    # a bounce leaves its start (up or down) and comes back: its farthest point, and how far
    # the last frame is from that point
    offset = t.y - t.y[:, :1]
    far = offset.gather(1, offset.abs().argmax(1, keepdim=True))[:, 0]
    depth = far.abs() / quarter
    back = (far - offset[:, -1]).abs() / quarter
    zoom = torch.log(t.size[:, -1] / t.size[:, 0].clamp(min=1e-6)) / math.log(1.4)
    turn = t.angle[:, -1] / 30
    names = []
    for i in range(len(dx)):
        half = t.y.shape[1] // 2
        first_half = float(t.y[i, half] - t.y[i, 0])
        second_half = float(t.y[i, -1] - t.y[i, half])
        scores = {
            "moves left": -dx[i],
            "moves right": dx[i],
            "moves up": -dy[i],
            "moves down": dy[i],
            "zooms in": zoom[i],
            "zooms out": -zoom[i],
            "rotates clockwise": turn[i],
            "rotates anticlockwise": -turn[i],
            "bounces": depth[i] if back[i] >= 0.5 * depth[i] and depth[i] > 0.3 else 0.0,
        }
        best = max(scores, key=lambda k: float(scores[k]))
        if float(scores[best]) < STILL:
            best = "still"
        elif best == "moves down" and second_half > 1.8 * max(first_half, 1e-3):
            best = "falls"
        names.append(best)
    return names


def motion_accuracy(clips: torch.Tensor, motions: list[str]) -> float:
    """The share of clips whose estimated motion is the named one (``motions[i]`` for clip i;
    scenes with two objects are not scored: pass only single-object clips)."""
    if len(motions) != len(clips):
        raise ValueError(f"{len(motions)} motions for {len(clips)} clips")
    found = classify_motion(track(clips))
    return sum(a == b for a, b in zip(found, motions, strict=True)) / max(1, len(motions))


def flicker(clips: torch.Tensor) -> float:
    """Mean absolute difference between consecutive frames, per pixel and channel (0 … 1);
    compare with the real clips' value: far above it is flicker, far below a frozen clip."""
    if clips.ndim != 5 or clips.shape[2] < 2:
        raise ValueError("flicker needs clips (B, C, F, H, W) with at least two frames")
    return float((clips[:, :, 1:] - clips[:, :, :-1]).abs().mean())


def object_crops(clips: torch.Tensor, side: int = 32, margin: float = 1.6) -> torch.Tensor:
    """Per frame, the object cut out around its centroid (a square of ``margin`` × its size,
    on white) and resized to ``side``²: ``(B·F, 3, side, side)`` in [0, 1], frame-major per
    clip — what an image evaluator trained on full-frame emoji can recognise."""
    t = track(clips)
    b, _, f, h, w = clips.shape
    frames = clips.float().cpu().permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
    half = (t.size.reshape(-1) * margin / 2).clamp(min=2)
    theta = torch.zeros(b * f, 2, 3)
    theta[:, 0, 0] = half * 2 / w
    theta[:, 1, 1] = half * 2 / h
    theta[:, 0, 2] = (t.x.reshape(-1) - (w - 1) / 2) * 2 / w
    theta[:, 1, 2] = (t.y.reshape(-1) - (h - 1) / 2) * 2 / h
    grid = F.affine_grid(theta, (b * f, 3, side, side), align_corners=False)
    # sample 1 − image so the outside (zero padding) is white
    return 1 - F.grid_sample(1 - frames, grid, align_corners=False)
