"""Any folder of images with captions, as a captioned image dataset.

Two layouts are read (the first one found wins):

* the Hugging Face image-folder convention: ``metadata.jsonl`` files (at the root or in any
  sub-folder), one JSON object a line with ``"file_name"`` (relative to that metadata file's
  folder) and a caption under ``caption_field`` (``"text"`` by default; ``"text"`` and
  ``"caption"`` are accepted as fallbacks);
* otherwise a ``name.txt`` caption beside each ``name.png`` / ``.jpg`` / ``.jpeg`` / ``.webp``,
  searched recursively.

Images are decoded with Pillow (EXIF orientation applied), alpha composited on white, converted
to RGB, centre-cropped to a square and resized (LANCZOS) to ``size``², giving uint8 NHWC. Files
that are missing, unreadable or corrupt, and images without a (non-empty) caption, are skipped,
counted and reported in one warning; nothing in the folder makes loading crash. The
train/held-out split is the same pure function of a string as the emoji dataset's
(:func:`destatic.data.emoji.split_of`), applied to the file name relative to ``root``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from destatic.data.base import SplitDataset
from destatic.data.emoji import split_of

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
METADATA_NAME = "metadata.jsonl"
CAPTION_FALLBACKS = ("text", "caption")
SHOWN_NAMES = 3  # names listed per skip reason in the warning


@dataclass
class CaptionedImages(SplitDataset):
    """Images ``(N, size, size, 3)`` uint8 on white, a caption and a relative file name each."""

    images: np.ndarray
    captions: list[str]
    names: list[str]
    split: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U7"))


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _caption_of(entry: dict, caption_field: str) -> str | None:
    for key in dict.fromkeys((caption_field, *CAPTION_FALLBACKS)):
        value = entry.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _from_metadata(
    root: Path, metadata_files: list[Path], caption_field: str, skipped: dict[str, list[str]]
) -> list[tuple[Path, str, str]]:
    """``(path, name, caption)`` for each metadata entry with a caption (first one per file)."""
    found: dict[str, tuple[Path, str, str]] = {}
    named: set[Path] = set()  # every file some entry names, captioned or not
    for meta in metadata_files:
        meta_name = meta.relative_to(root).as_posix()
        lines = meta.read_text(encoding="utf-8", errors="replace").splitlines()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                skipped["bad metadata line"].append(f"{meta_name}:{lineno}")
                continue
            path = meta.parent / entry["file_name"]
            name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
            if name in found:
                continue
            named.add(path.resolve())
            caption = _caption_of(entry, caption_field)
            if caption is None:
                skipped["without caption"].append(name)
                continue
            found[name] = (path, name, caption)
    # images in the folder that no metadata entry names have no caption
    for path in sorted(root.rglob("*")):
        if (
            path.suffix.lower() in IMAGE_SUFFIXES
            and path.is_file()
            and _visible(path, root)
            and path.resolve() not in named
        ):
            skipped["without caption"].append(path.relative_to(root).as_posix())
    return sorted(found.values(), key=lambda t: t[1])


def _from_sidecars(
    root: Path, skipped: dict[str, list[str]], suffixes: frozenset[str] = IMAGE_SUFFIXES
) -> list[tuple[Path, str, str]]:
    """``(path, name, caption)`` for each file with one of ``suffixes`` (images by default)
    and a non-empty ``.txt`` beside it."""
    found = []
    for path in sorted(root.rglob("*")):
        if not (path.suffix.lower() in suffixes and path.is_file() and _visible(path, root)):
            continue
        name = path.relative_to(root).as_posix()
        txt = path.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
        except (OSError, UnicodeDecodeError):
            caption = ""
        if not caption:
            skipped["without caption"].append(name)
            continue
        found.append((path, name, caption))
    return found


class ImageTooLarge(ValueError):
    """More pixels than the caller allows (raised before decoding)."""


def open_rgb(path: Path, max_pixels: int | None = None):
    """The image at ``path`` as a Pillow RGB image: EXIF orientation applied, 16-bit grey scaled
    to 8 bits, alpha (or a transparency colour) composited on white. Raises
    :class:`ImageTooLarge` for more than ``max_pixels`` pixels (checked before decoding) and
    whatever Pillow raises for unreadable files."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise ImageTooLarge(f"{path}: {im.width}×{im.height} is over {max_pixels} pixels")
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert would clip at 255
            im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            bg.alpha_composite(rgba)
            return bg.convert("RGB")
        return im.convert("RGB")


def resize_square(im, size: int) -> np.ndarray:
    """A square Pillow image LANCZOS-resized to ``size``², as uint8 ``(size, size, 3)``."""
    from PIL import Image

    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def _decode(path: Path, size: int) -> np.ndarray:
    """RGB (alpha on white), centre-cropped to a square, LANCZOS-resized to ``size``²."""
    im = open_rgb(path)
    w, h = im.size
    s = min(w, h)
    if s < 1:
        raise ValueError(f"empty image {w}×{h}")
    left, top = (w - s) // 2, (h - s) // 2
    return resize_square(im.crop((left, top, left + s, top + s)), size)


def load_image_folder(
    root: str | Path, size: int, *, caption_field: str = "text"
) -> CaptionedImages:
    """Every captioned, readable image under ``root`` at ``size``² (see the module docstring)."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    skipped: dict[str, list[str]] = {
        "missing": [],
        "unreadable": [],
        "without caption": [],
        "bad metadata line": [],
    }
    metadata_files = sorted(p for p in root.rglob(METADATA_NAME) if _visible(p, root))
    if metadata_files:
        layout = f"{len(metadata_files)} {METADATA_NAME}"
        entries = _from_metadata(root, metadata_files, caption_field, skipped)
    else:
        layout = "image + .txt caption pairs"
        entries = _from_sidecars(root, skipped)

    images: list[np.ndarray] = []
    captions: list[str] = []
    names: list[str] = []
    for path, name, caption in entries:
        if not path.is_file():
            skipped["missing"].append(name)
            continue
        try:
            img = _decode(path, size)
        except Exception:  # any decoder failure (truncated, corrupt, bomb, odd mode) skips
            skipped["unreadable"].append(name)
            continue
        images.append(img)
        captions.append(caption)
        names.append(name)

    total = sum(len(v) for v in skipped.values())
    summary = ", ".join(
        f"{len(v)} {reason} ({', '.join(v[:SHOWN_NAMES])}{', …' if len(v) > SHOWN_NAMES else ''})"
        for reason, v in skipped.items()
        if v
    )
    if not images:
        raise ValueError(
            f"no captioned, readable images in {root} (layout: {layout}; "
            f"{len(entries)} captioned entries; skipped: {summary or 'nothing'}; "
            f"image suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    if total:
        warnings.warn(f"{root}: skipped {total}: {summary}", stacklevel=2)
    return CaptionedImages(
        images=np.stack(images),
        captions=captions,
        names=names,
        split=np.array([split_of(n) for n in names], dtype="<U7"),
    )
