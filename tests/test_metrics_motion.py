"""Motion estimation from frames (destatic.metrics.motion): on drawn clips of a known motion,
the estimate names it; flicker and crops behave."""

import math

import pytest
import torch

from destatic.metrics.motion import (
    MOTION_NAMES,
    classify_motion,
    flicker,
    motion_accuracy,
    object_crops,
    track,
)


def drawn_clip(kind: str, frames: int = 8, side: int = 32) -> torch.Tensor:
    """A dark, asymmetric shape on white doing ``kind``: (3, F, H, W) in [0, 1]."""
    ys, xs = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    out = []
    for k in range(frames):
        t = k / (frames - 1)
        cx, cy, s, turn = 16.0, 16.0, 6.0, 0.0
        cx = {"moves left": 22 - 12 * t, "moves right": 10 + 12 * t}.get(kind, cx)
        cy = {
            "moves up": 22 - 12 * t,
            "moves down": 10 + 12 * t,
            "falls": 8 + 16 * t * t,
            "bounces": 24 - 14 * abs(math.sin(math.pi * t)),
        }.get(kind, cy)
        s = {"zooms in": 4 + 5 * t, "zooms out": 9 - 5 * t}.get(kind, s)
        turn = {"rotates clockwise": 60 * t, "rotates anticlockwise": -60 * t}.get(kind, turn)
        a = math.radians(turn)
        u = (xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)
        v = -(xs - cx) * math.sin(a) + (ys - cy) * math.cos(a)
        body = ((u.abs() < s) & (v.abs() < s / 2)).float()
        flag = ((u > 0) & (u < s) & (v.abs() < s)).float() * 0.5
        out.append(torch.ones(3, side, side) - 0.9 * torch.maximum(body, flag))
    return torch.stack(out, 1)


def test_each_drawn_motion_is_named():
    clips = torch.stack([drawn_clip(k) for k in MOTION_NAMES])
    assert classify_motion(track(clips)) == list(MOTION_NAMES)
    assert motion_accuracy(clips, list(MOTION_NAMES)) == 1.0


def test_a_still_clip_is_not_a_motion_it_does_not_show():
    still = drawn_clip("none")[None]
    t = track(still)
    assert torch.allclose(t.x, t.x[:, :1]) and torch.all(t.angle == 0)
    assert classify_motion(t) == ["still"]
    # the wrong name scores zero
    assert motion_accuracy(drawn_clip("moves right")[None], ["moves left"]) == 0.0


def test_flicker_and_crops():
    clip = drawn_clip("moves right")[None]
    assert flicker(drawn_clip("none")[None]) == 0
    assert flicker(clip) > 0.01
    crops = object_crops(clip, side=16)
    assert crops.shape == (8, 3, 16, 16)
    # the object sits in the middle of each crop: its ink centroid is near the centre
    ink = (1 - crops.mean(1)).clamp(min=0)
    xs = torch.arange(16).float()
    cx = (ink.sum(1) * xs).sum(1) / ink.sum((1, 2))
    assert torch.all((cx - 7.5).abs() < 2)


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="B, 3, F, H, W"):
        track(torch.ones(2, 3, 8, 8))
    with pytest.raises(ValueError, match="2 motions for 1 clips"):
        motion_accuracy(drawn_clip("none")[None], ["moves left", "falls"])


def test_the_rendered_emoji_clips_are_named_by_their_captions():
    """The estimator's ceiling on the real data: held-out emoji motion clips."""
    from destatic.data.motion import MotionClips, motion_of

    clips = MotionClips(32, 8, "heldout", progress=False)
    index = torch.arange(0, len(clips), len(clips) // 60)
    rendered = clips.render(index, torch.Generator().manual_seed(1)) / 2 + 0.5
    motions = [motion_of(clips.captions[i][0]) for i in index]
    assert motion_accuracy(rendered, motions) >= 0.95


def test_video_scores_of_real_clips_against_themselves_and_a_frozen_copy():
    from destatic.data.motion import MotionClips, parse_caption
    from destatic.metrics import load_evaluator
    from destatic.metrics.video import heldout_captions, score_clips, video_table

    clips = MotionClips(32, 8, "heldout", progress=False)
    captions, index = heldout_captions(clips, 24)
    real = clips.render(index, torch.Generator().manual_seed(0)) / 2 + 0.5
    names = sorted({parse_caption(c)[0][0] for c in captions} | set(clips.names[:40]))
    evaluator = load_evaluator()
    same = score_clips("same", real, captions, real, evaluator, names)
    assert same.motion_accuracy >= 0.95 and same.fid < 1e-3 and same.identity > 0.3
    frozen = real[:, :, :1].expand_as(real)  # the first frame held: no motion, no flicker
    still = score_clips("frozen", frozen, captions, real, evaluator, names)
    assert still.flicker == 0 and still.motion_accuracy == 0 and still.identity == 1
    assert "| frozen | 24 |" in video_table([same, still])
