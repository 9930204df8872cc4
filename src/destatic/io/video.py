"""Video files in and out: ``.mp4`` (PyAV: H.264, yuv420p), ``.gif`` and ``.webp`` (Pillow,
looping; WebP lossless), plus reading ``.webm`` / ``.mov`` / ``.mkv`` / ``.avi`` through PyAV.

Writes are atomic (:func:`destatic.io.files.atomic_file`: a temporary name in the same folder,
fsync, rename). A ``comment`` string (the lead stores the generation request as JSON) goes in
the container's metadata: the MP4 ``comment`` tag, the GIF comment extension, the WebP XMP
packet; :func:`read_video_comment` reads it back.

H.264 in yuv420p needs even sizes and many players refuse tiny frames, so :func:`write_video`
enlarges an MP4 by the smallest integer factor (nearest neighbour: every pixel becomes a k×k
block) that makes its short side at least :data:`MP4_MIN_SIDE` and its sides even (a 32² clip is
written at 128²); GIF and WebP keep the frames' own size.

Pillow merges identical consecutive frames of a GIF or WebP into one of longer duration;
:func:`iter_frames` repeats such a frame by its duration over the shortest one (at most
:data:`MAX_REPEAT` times), so a clip reads back with the frame count it was written with (a
clip whose frames are all the same reads back as one frame).
"""

from __future__ import annotations

import html
import math
import os
import re
import struct
from collections.abc import Iterator
from fractions import Fraction
from itertools import islice
from pathlib import Path

import numpy as np

from destatic.io.files import atomic_file, write_error_reason

__all__ = [
    "PILLOW_SUFFIXES",
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "count_frames",
    "iter_frames",
    "read_video",
    "read_video_comment",
    "write_video",
]

PILLOW_SUFFIXES = frozenset({".gif", ".webp"})
AV_SUFFIXES = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"})
READ_SUFFIXES = PILLOW_SUFFIXES | AV_SUFFIXES
WRITE_SUFFIXES = frozenset({".mp4", ".gif", ".webp"})
MP4_MIN_SIDE = 128
MP4_CRF = 17  # H.264 quality: visually lossless
MAX_REPEAT = 60  # a long-held GIF / WebP frame repeats at most this often
_XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    'xmlns:destatic="https://destatic.invalid/ns/1.0/"><destatic:request>{}</destatic:request>'
    "</rdf:Description></rdf:RDF></x:xmpmeta>"
)
_XMP_RE = re.compile(r"<destatic:request>(.*?)</destatic:request>", re.DOTALL)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[:3]) < 1:
        raise ValueError(f"frames must be (F, H, W, 3) with F, H, W ≥ 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}: scale to 0–255 first")
    return np.ascontiguousarray(frames)


def mp4_scale(height: int, width: int) -> int:
    """The integer factor k ≥ 1 an MP4 of ``height × width`` is enlarged by: the smallest with
    ``min(h, w)·k ≥ MP4_MIN_SIDE`` and both sides even."""
    k = max(1, math.ceil(MP4_MIN_SIDE / min(height, width)))
    while (height * k) % 2 or (width * k) % 2:
        k += 1
    return k


def write_video(
    path: str | os.PathLike, frames: np.ndarray, fps: float = 8, *, comment: str | None = None
) -> Path:
    """Write uint8 ``frames`` ``(F, H, W, 3)`` to ``path`` (``.mp4``, ``.gif`` or ``.webp``,
    by suffix) at ``fps``, atomically, with ``comment`` in its metadata; returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"{path}: write a video as one of {', '.join(sorted(WRITE_SUFFIXES))}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = _check_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        if suffix == ".mp4":
            _write_mp4(tmp, frames, fps, comment)
        else:
            _write_pillow(tmp, frames, fps, comment, "GIF" if suffix == ".gif" else "WEBP")
    return path


def _write_mp4(path: Path, frames: np.ndarray, fps: float, comment: str | None) -> None:
    import av

    k = mp4_scale(*frames.shape[1:3])
    if k > 1:
        frames = frames.repeat(k, axis=1).repeat(k, axis=2)
    with av.open(str(path), mode="w", format="mp4") as container:
        if comment is not None:
            container.metadata["comment"] = comment
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(MP4_CRF)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_pillow(
    path: Path, frames: np.ndarray, fps: float, comment: str | None, fmt: str
) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    extra: dict = {}
    if fmt == "WEBP":
        extra["lossless"] = True
        if comment is not None:
            extra["xmp"] = _XMP.format(html.escape(comment, quote=False)).encode("utf-8")
    elif comment is not None:
        extra["comment"] = comment.encode("utf-8")
    images[0].save(
        path,
        format=fmt,
        save_all=True,
        append_images=images[1:],
        duration=max(1, round(1000 / fps)),
        loop=0,
        **extra,
    )


def _unreadable(path: Path, e: BaseException) -> ValueError:
    return ValueError(f"{path}: not a readable video ({write_error_reason(e)})")


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What Pillow and PyAV raise for a damaged file (a missing one is not caught)."""
    import av
    from PIL import Image

    damaged = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)
    return (*damaged, av.FFmpegError, Image.DecompressionBombError)


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in READ_SUFFIXES:
        raise ValueError(f"{path}: read a video as one of {', '.join(sorted(READ_SUFFIXES))}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    return suffix


def iter_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """The frames of the video at ``path`` one by one as uint8 ``(H, W, 3)`` (alpha on white).
    A file that cannot be decoded raises a one-line ValueError."""
    path = Path(path)
    if _suffix(path) in PILLOW_SUFFIXES:
        return _pillow_frames(path)
    return _av_frames(path)


def _pillow_frames(path: Path) -> Iterator[np.ndarray]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            n = getattr(im, "n_frames", 1)
            durations = []
            for i in range(n):
                im.seek(i)
                im.load()
                durations.append(im.info.get("duration") or 0)
            shortest = min((d for d in durations if d > 0), default=0)
            for i, d in enumerate(durations):
                im.seek(i)
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                white.alpha_composite(rgba)
                frame = np.asarray(white.convert("RGB"), dtype=np.uint8)
                repeat = min(MAX_REPEAT, max(1, round(d / shortest))) if shortest else 1
                for _ in range(repeat):
                    yield frame
    except _decode_errors() as e:
        raise _unreadable(path, e) from e


def _av_frames(path: Path) -> Iterator[np.ndarray]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
    except _decode_errors() as e:
        raise _unreadable(path, e) from e


def count_frames(path: str | os.PathLike) -> int | None:
    """The number of frames the file declares (before decoding them), or None if it does not
    say (MP4 usually says; a GIF's or WebP's merged frames count once here)."""
    path = Path(path)
    try:
        if _suffix(path) in PILLOW_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                return int(getattr(im, "n_frames", 1))
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            return int(container.streams.video[0].frames) or None
    except _decode_errors() as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _unreadable(path, e) from e


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """The first ``max_frames`` frames (all if None) of a video as uint8 ``(F, H, W, 3)``;
    a file with no frame is a one-line ValueError."""
    frames = list(islice(iter_frames(path), max_frames))
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    return np.stack(frames)


def read_video_comment(path: str | os.PathLike) -> str | None:
    """The ``comment`` :func:`write_video` stored in the file, or None."""
    path = Path(path)
    try:
        if _suffix(path) in PILLOW_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                if "comment" in im.info:
                    return im.info["comment"].decode("utf-8", errors="replace")
                xmp = im.info.get("xmp")
                found = _XMP_RE.search(xmp.decode("utf-8", errors="replace")) if xmp else None
                return html.unescape(found.group(1)) if found else None
        import av

        with av.open(str(path)) as container:
            return container.metadata.get("comment")
    except _decode_errors() as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _unreadable(path, e) from e
