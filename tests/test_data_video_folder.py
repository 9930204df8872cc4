import warnings

import numpy as np
import pytest

from destatic.data.emoji import split_of
from destatic.data.video_folder import CaptionedVideos, frame_indices, load_video_folder
from destatic.io.video import write_video


def _counting_clip(frames: int, h: int = 24, w: int = 32) -> np.ndarray:
    """Frame i is a flat grey of 10·i (readable back from any frame's centre)."""
    return np.stack([np.full((h, w, 3), 10 * i, np.uint8) for i in range(frames)])


def _add(root, name, clip, caption="a clip"):
    path = write_video(root / name, clip, fps=8)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _frame_ids(clips: np.ndarray) -> np.ndarray:
    centre = clips[..., clips.shape[2] // 2, clips.shape[3] // 2, 0].astype(float)
    return np.round(centre / 10).astype(int)


def test_frame_indices():
    assert frame_indices(10, 4) == [0, 3, 6, 9]
    assert frame_indices(10, 4, stride=2) == [0, 2, 4, 6]
    assert frame_indices(1, 1) == [0]
    with pytest.raises(ValueError, match="3 frames, needs 4"):
        frame_indices(3, 4)
    with pytest.raises(ValueError, match="6 frames, needs 7"):
        frame_indices(6, 4, stride=2)


def test_loads_every_format_with_sampling(tmp_path):
    (tmp_path / "sub").mkdir()
    _add(tmp_path, "a.gif", _counting_clip(10), "a cat waves")
    _add(tmp_path, "sub/b.webp", _counting_clip(10), "a dog runs")
    _add(tmp_path, "c.mp4", _counting_clip(10, 48, 64), "a bird flies")
    ds = load_video_folder(tmp_path, size=16, frames=4)
    assert isinstance(ds, CaptionedVideos)
    assert ds.clips.shape == (3, 4, 16, 16, 3) and ds.clips.dtype == np.uint8
    assert ds.names == ["a.gif", "c.mp4", "sub/b.webp"]
    assert ds.captions == ["a cat waves", "a bird flies", "a dog runs"]
    assert (_frame_ids(ds.clips) == [0, 3, 6, 9]).all()
    strided = load_video_folder(tmp_path, size=16, frames=3, stride=3)
    assert (_frame_ids(strided.clips) == [0, 3, 6]).all()
    assert list(ds.split) == [split_of(n) for n in ds.names]
    assert len(ds.train()) + len(ds.heldout()) == 3


def test_center_crop(tmp_path):
    clip = np.zeros((2, 20, 60, 3), np.uint8)
    clip[:, :, 20:40] = 200  # the middle third of a wide frame: all that stays
    clip[1, :, 20:40] = 220  # (a GIF stores identical frames once)
    _add(tmp_path, "wide.gif", clip)
    ds = load_video_folder(tmp_path, size=10, frames=2)
    assert ds.clips.min() > 190


def test_webm_and_mov_through_pyav(tmp_path):
    import av

    for suffix, codec in ((".webm", "libvpx-vp9"), (".mov", "libx264")):
        if codec not in av.codecs_available:
            pytest.skip(f"{codec} not in this PyAV")
        path = tmp_path / f"v{suffix}"
        with av.open(str(path), "w") as container:
            stream = container.add_stream(codec, rate=8)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for frame in _counting_clip(6, 32, 32):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        path.with_suffix(".txt").write_text("grey", encoding="utf-8")
    ds = load_video_folder(tmp_path, size=8, frames=3)
    assert ds.names == ["v.mov", "v.webm"]
    assert (_frame_ids(ds.clips) == [0, 2, 5]).all()


def test_skips_are_counted_and_warned(tmp_path):
    _add(tmp_path, "good.gif", _counting_clip(8))
    _add(tmp_path, "short.gif", _counting_clip(2))
    _add(tmp_path, "nocap.gif", _counting_clip(8), caption=None)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("x")
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(800))
    (tmp_path / "corrupt.txt").write_text("x")
    (tmp_path / ".hidden.gif").write_bytes(b"")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = load_video_folder(tmp_path, size=8, frames=4)
    assert ds.names == ["good.gif"]
    assert len(record) == 1
    message = str(record[0].message)
    for part in (
        "skipped 4",
        "1 empty (empty.mp4)",
        "1 unreadable (corrupt.mp4)",
        "1 too short (short.gif)",
        "1 without caption (nocap.gif)",
    ):
        assert part in message, message


def test_nothing_left_is_one_clear_error(tmp_path):
    _add(tmp_path, "short.gif", _counting_clip(2))
    with pytest.raises(ValueError, match=r"no captioned.*1 with a \.txt caption.*1 too short"):
        load_video_folder(tmp_path, size=8, frames=4)
    with pytest.raises(NotADirectoryError):
        load_video_folder(tmp_path / "missing", size=8, frames=4)
    with pytest.raises(ValueError, match="≥ 1"):
        load_video_folder(tmp_path, size=0, frames=4)
