import pytest
import torch

from destatic.data.motion import (
    MOTIONS,
    MotionClips,
    is_heldout,
    motion_of,
    object_path,
    parse_caption,
)


@pytest.fixture(scope="module")
def train():
    return MotionClips(progress=False)


@pytest.fixture(scope="module")
def heldout():
    return MotionClips(split="heldout", progress=False)


def _single(ds: MotionClips, motion: str, count: int = 6) -> torch.Tensor:
    m = MOTIONS.index(motion)
    sel = (ds.objects[:, 0, 1] == m) & (ds.objects[:, 1, 0] < 0)
    return sel.nonzero().squeeze(1)[:: max(1, int(sel.sum()) // count)][:count]


def _ink_stats(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centroid x, y and inked area per clip and frame of [n, 3, F, H, W] clips."""
    ink = ((1 - clips) / 2).amax(dim=1)  # [n, F, H, W]
    h, w = ink.shape[-2:]
    mass = ink.sum((-2, -1))
    xs = (ink * torch.arange(w).view(1, 1, 1, w)).sum((-2, -1)) / mass
    ys = (ink * torch.arange(h).view(1, 1, h, 1)).sum((-2, -1)) / mass
    return xs, ys, mass


def test_shapes_range_and_determinism(train):
    index = torch.arange(0, len(train), len(train) // 20)
    a = train.render(index, torch.Generator().manual_seed(3))
    b = train.render(index, torch.Generator().manual_seed(3))
    c = train.render(index, torch.Generator().manual_seed(4))
    assert a.shape == (len(index), 3, 8, 32, 32) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert (a[:, :, :, 0, 0] > 0.9).float().mean() > 0.8  # mostly white paper at a corner
    assert torch.equal(a, b) and not torch.equal(a, c)
    # an item's clip does not depend on the rest of the batch's items, only on the draws
    assert torch.equal(train.render(index[:3], torch.Generator().manual_seed(3)), a[:3])


def test_other_sizes_and_frames(tmp_path):
    ds = MotionClips(size=16, frames=5, pairs=False, progress=False)
    clips = ds.render(torch.arange(4), torch.Generator().manual_seed(0))
    assert clips.shape == (4, 3, 5, 16, 16)
    assert all(len(motion_of(c[0]) or "") for c in ds.captions[:50])
    with pytest.raises(ValueError, match="split"):
        MotionClips(split="test", progress=False)


def test_split_is_by_pair_and_disjoint(train, heldout):
    def pairs(ds):
        return {(ds.names[e], MOTIONS[m]) for e, m in ds.objects[:, 0].tolist()} | {
            (ds.names[e], MOTIONS[m]) for e, m in ds.objects[:, 1].tolist() if e >= 0
        }

    seen, unseen = pairs(train), pairs(heldout)
    assert not seen & unseen
    assert all(is_heldout(n, m) for n, m in unseen) and not any(is_heldout(n, m) for n, m in seen)
    assert 0.05 < len(unseen) / (len(seen) + len(unseen)) < 0.15
    # composition: every held-out emoji and motion also occurs in train
    assert {n for n, _ in unseen} <= {n for n, _ in seen}
    assert {m for _, m in unseen} == set(MOTIONS)
    assert (heldout.objects[:, 1, 0] < 0).all()  # held-out items are one-object clips
    two = (train.objects[:, 1, 0] >= 0).float().mean()
    assert 0.03 < two < 0.15


def test_captions_parse_back(train):
    for spec, captions in zip(train.objects[::97].tolist(), train.captions[::97], strict=True):
        objects = [(train.names[e], MOTIONS[m]) for e, m in spec if e >= 0]
        assert parse_caption(captions[0]) == objects
        assert motion_of(captions[0]) == (objects[0][1] if len(objects) == 1 else None)
        for alt in captions[1:]:
            assert motion_of(alt) == objects[0][1]
    assert motion_of("red heart moves left") == "moves left"
    assert motion_of("a red heart") is None
    assert parse_caption("a red heart moves left while a cat face falls") == [
        ("red heart", "moves left"),
        ("cat face", "falls"),
    ]


@pytest.mark.parametrize(
    ("motion", "stat", "sign"),
    [
        ("moves left", "x", -1),
        ("moves right", "x", 1),
        ("moves up", "y", -1),
        ("moves down", "y", 1),
        ("falls", "y", 1),
        ("zooms in", "area", 1),
        ("zooms out", "area", -1),
    ],
)
def test_motion_moves_as_named(train, motion, stat, sign):
    clips = train.render(_single(train, motion), torch.Generator().manual_seed(1))
    xs, ys, area = _ink_stats(clips)
    value = {"x": xs, "y": ys, "area": area}[stat]
    change = sign * (value[:, -1] - value[:, 0])
    assert (change > 0).all(), (motion, value)
    if stat != "area":
        assert (change > 2).all()  # pixels, at 32²
        other = ys if stat == "x" else xs
        assert ((other[:, -1] - other[:, 0]).abs() < 1).all()  # the other axis stays
    else:
        assert (area[:, -1] / area[:, 0]).log().abs().min() > 0.5
    # "falls" accelerates: the second half covers more than the first
    if motion == "falls":
        half = ys.shape[1] // 2
        assert ((ys[:, -1] - ys[:, half]) > (ys[:, half] - ys[:, 0])).all()


def test_rotation_keeps_area_and_turns_the_named_way(train):
    g = torch.Generator().manual_seed(2)
    for motion, sign in (("rotates clockwise", 1), ("rotates anticlockwise", -1)):
        clips = train.render(_single(train, motion, 4), g)
        area = _ink_stats(clips)[2]
        assert ((area[:, -1] / area[:, 0] - 1).abs() < 0.3).all()
        assert ((clips[:, :, -1] - clips[:, :, 0]).abs().amax((1, 2, 3)) > 0.5).all()
        # a mark on the sprite's right edge goes down (clockwise on screen, y down)
        n = 4
        u = torch.full((n, 4), 0.5, dtype=torch.float64)
        box = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64).repeat(n, 1)
        motion_id = torch.full((n,), MOTIONS.index(motion))
        _, _, _, theta = object_path(
            motion_id, torch.full((n,), 0.5), u, box, torch.tensor([0, 1.0])
        )
        assert (sign * theta[:, 1] > 0).all()


def test_bounces_stay_in_frame_and_return(train):
    clips = train.render(_single(train, "bounces"), torch.Generator().manual_seed(5))
    _, ys, area = _ink_stats(clips)
    assert ((ys.amax(1) - ys.amin(1)) > 3).all()
    assert ((ys[:, -1] - ys[:, 0]).abs() < 1).all()  # back on the floor
    assert (ys.amin(1) < ys[:, 0] - 3).all()  # up first (y grows downwards)
    # most of each object stays in the frame on every frame
    assert (area.amin(1) / area.amax(1) > 0.8).all()


def test_two_objects_are_both_drawn(train):
    """Two objects that neither move vertically share the frame as top and bottom halves."""
    vertical = torch.tensor([m in ("moves up", "moves down", "bounces", "falls") for m in MOTIONS])
    two = train.objects[:, 1, 0] >= 0
    flat = two & ~vertical[train.objects[:, :, 1].clamp(min=0)].any(1)
    index = flat.nonzero().squeeze(1)[:8]
    clips = train.render(index, torch.Generator().manual_seed(0))
    ink = ((1 - clips) / 2).amax(dim=1)  # [n, F, H, W]
    top, bottom = ink[:, :, :16].sum((-2, -1)), ink[:, :, 16:].sum((-2, -1))
    assert (top.amax(1) > 5).all() and (bottom.amax(1) > 5).all()


def test_render_speed(train):
    import time

    index = torch.randint(0, len(train), (64,), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    train.render(index, g)
    best = min(_timed(lambda: train.render(index, g), time.perf_counter) for _ in range(5))
    assert best < 0.25  # ~0.03 s on a busy 2-core machine; loose for CI


def _timed(fn, clock) -> float:
    t = clock()
    fn()
    return clock() - t
