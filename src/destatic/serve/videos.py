"""Clips out of the server: a video model's frames as H.264 MP4
(:func:`destatic.io.video.write_video`, enlarged for players as it does), with the request that
draws the clip as JSON in the file's ``comment`` metadata, as ``destatic generate`` writes it,
so ``destatic generate --from clip.mp4`` draws it again.

Files are written only under the server's own folder (``folder``: its private upload folder,
:func:`destatic.serve.security.private_upload_dir`); the API's are removed once read.

    path = write_mp4(frames, request, fps=8, folder=upload_dir)   # for the UI's gr.Video
    data = mp4_bytes(frames, request, fps=8, folder=upload_dir)   # for the HTTP API
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from destatic.pipelines import GenerationRequest

__all__ = ["mp4_bytes", "write_mp4"]


def write_mp4(
    frames: list[Any], request: GenerationRequest, fps: int, folder: str | os.PathLike
) -> Path:
    """The PIL ``frames`` of one clip as a new MP4 in a fresh folder under ``folder``, with
    ``request`` in its metadata; returns its path."""
    import numpy as np

    from destatic.io.video import write_video

    clip = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    where = Path(tempfile.mkdtemp(prefix="clip-", dir=folder))
    return write_video(where / "clip.mp4", clip, fps, comment=request.to_json())


def mp4_bytes(
    frames: list[Any], request: GenerationRequest, fps: int, folder: str | os.PathLike
) -> bytes:
    """:func:`write_mp4` as bytes, the file removed; blocking work (H.264), so run it off the
    event loop."""
    with tempfile.TemporaryDirectory(prefix="api-", dir=folder) as where:
        return write_mp4(frames, request, fps, where).read_bytes()
