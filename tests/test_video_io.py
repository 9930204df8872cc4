import json

import numpy as np
import pytest

from destatic.io.video import (
    count_frames,
    iter_frames,
    mp4_scale,
    read_video,
    read_video_comment,
    write_video,
)

REQUEST = json.dumps({"prompt": "a red heart moves left <&> ☃", "seed": 3}, ensure_ascii=False)


def _palette_clip(frames: int = 6, size: int = 24) -> np.ndarray:
    """Frames of few colours (exact in a GIF's palette), each different from the last."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    return colours[rng.integers(0, 16, (frames, size, size))]


def _smooth_clip(frames: int = 8, size: int = 64) -> np.ndarray:
    """A gradient sliding right: what H.264 keeps well."""
    y, x = np.mgrid[0:size, 0:size] / size
    out = [
        np.stack([x + t / frames, y, 0.5 + 0.4 * np.sin(6 * (x + y) + t / 2)], -1) % 1
        for t in range(frames)
    ]
    return (np.stack(out) * 200 + 20).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_pillow_formats_round_trip_exactly(tmp_path, suffix):
    clip = _palette_clip()
    path = write_video(tmp_path / f"clip{suffix}", clip, fps=8)
    assert np.array_equal(read_video(path), clip)
    assert count_frames(path) == len(clip)
    assert np.array_equal(read_video(path, max_frames=2), clip[:2])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_repeated_frames_keep_the_frame_count(tmp_path):
    clip = _palette_clip(4)
    clip = np.concatenate([clip[:2], clip[1:2], clip[1:2], clip[2:]])  # a frame shown 3 times
    for suffix in (".gif", ".webp"):
        assert np.array_equal(read_video(write_video(tmp_path / f"r{suffix}", clip)), clip)


def test_webp_lossless_on_any_colours(tmp_path):
    clip = np.random.default_rng(1).integers(0, 256, (3, 16, 20, 3), dtype=np.uint8)
    assert np.array_equal(read_video(write_video(tmp_path / "x.webp", clip)), clip)


def test_mp4_is_close_and_enlarges_tiny_clips(tmp_path):
    clip = _smooth_clip()
    path = write_video(tmp_path / "clip.mp4", clip, fps=8)
    back = read_video(path)
    k = mp4_scale(64, 64)
    assert k == 2 and back.shape == (8, 128, 128, 3)
    assert _psnr(back, clip.repeat(k, 1).repeat(k, 2)) > 30
    assert count_frames(path) == 8
    tiny = read_video(write_video(tmp_path / "tiny.mp4", clip[:, :32, :32]))
    assert tiny.shape == (8, 128, 128, 3)
    assert mp4_scale(33, 50) == 4 and mp4_scale(200, 300) == 1 and mp4_scale(201, 300) == 2


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".webp"])
def test_comment_round_trip(tmp_path, suffix):
    path = write_video(tmp_path / f"c{suffix}", _palette_clip(2, 16), comment=REQUEST)
    assert json.loads(read_video_comment(path)) == json.loads(REQUEST)
    bare = write_video(tmp_path / f"bare{suffix}", _palette_clip(2, 16))
    assert read_video_comment(bare) is None


def test_write_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "v.gif"
    write_video(path, _palette_clip(2))
    write_video(path, _palette_clip(3))
    assert len(read_video(path)) == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["v.gif"]


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".webp", ".webm"])
def test_corrupt_file_is_one_clear_error(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(700))
    with pytest.raises(ValueError, match="not a readable video"):
        read_video(path)
    with pytest.raises(ValueError, match="not a readable video"):
        read_video_comment(path)
    # truncated: a good file cut in half
    good = write_video(
        tmp_path / f"good{suffix}" if suffix != ".webm" else tmp_path / "g.mp4", _smooth_clip(4, 32)
    )
    cut = tmp_path / f"cut{good.suffix}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(ValueError, match=r"not a readable video|no frames"):
        read_video(cut)


def test_bad_arguments(tmp_path):
    clip = _palette_clip(2)
    with pytest.raises(ValueError, match=r"\.gif"):
        write_video(tmp_path / "v.avi", clip)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "v.gif", clip.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        write_video(tmp_path / "v.gif", clip[0])
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "v.gif", clip, fps=0)
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="read a video as"):
        next(iter_frames(tmp_path / "x.txt"))
