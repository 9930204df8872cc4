"""Images from clients, decoded only once they are known to be small.

Pillow reads an image's header on ``Image.open`` and its pixels only on ``load``: a 0.4 MB PNG
can declare 12000×12000 pixels (432 MB decoded). So every image a client sends, to the API or
to the UI, is opened lazily (by the PNG, JPEG and WebP parsers only), refused unless it is
within the byte and side limits, and only then decoded; all failures are one-line
:class:`RequestError` messages.

    image = load_image(data, "image", max_side=512, max_bytes=8 << 20, mode="RGB")
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from destatic.serve.service import RequestError

__all__ = ["FORMATS", "load_image", "open_image"]

FORMATS = ("PNG", "JPEG", "WEBP")  # JPEG includes MPO, the JPEG of many phone cameras


def _size_of(source: bytes | str | os.PathLike) -> int:
    return len(source) if isinstance(source, bytes) else os.path.getsize(source)


def open_image(source: bytes | str | os.PathLike, name: str, max_side: int, max_bytes: int):
    """``source`` (encoded bytes or a file) opened without decoding its pixels; a
    :class:`RequestError` unless it is a PNG, JPEG or WebP of at most ``max_bytes`` bytes and
    ``max_side`` pixels per side."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = _size_of(source)
        if size > max_bytes:
            raise RequestError(f"{name} is {size:,} bytes; the limit is {max_bytes:,}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            file = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
            image = Image.open(file, formats=FORMATS)  # no other format's parser runs
    except Image.DecompressionBombError:
        raise RequestError(
            f"{name} has too many pixels; the limit is {max_side} per side"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise RequestError(f"{name} is not a readable PNG, JPEG or WebP image") from None
    w, h = image.size
    if w > max_side or h > max_side:
        raise RequestError(f"{name} is {w}×{h}; the limit is {max_side} per side")
    return image


def load_image(
    source: bytes | str | os.PathLike, name: str, max_side: int, max_bytes: int, mode: str
):
    """:func:`open_image`, then decoded (turned upright by its EXIF tag) and converted to
    ``mode`` ("RGB", "L"); blocking work, so run it off the event loop."""
    from PIL import ImageOps

    image = open_image(source, name, max_side, max_bytes)
    try:
        return ImageOps.exif_transpose(image).convert(mode)
    except Exception:  # a decoder failing on hostile bytes: the input's fault, not a bug
        raise RequestError(f"{name} could not be decoded") from None
