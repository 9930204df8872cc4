"""Open Clip Art Library 0.18 (Debian ``openclipart-png`` + ``openclipart-svg``) as a captioned
image dataset.

Every ``/usr/share/openclipart/png/<category>/…/name.png`` is decoded with the folder loader's
helper (:func:`destatic.data.folder.open_rgb`: alpha on white, any mode), its white margin is
cropped, it is padded with white to a square and resized (LANCZOS) to ``size``². Files over
``MAX_PIXELS`` (a few posters of up to 20,990×29,700) and unreadable or blank ones are skipped;
so are the 1,375 generated "gramastar" stars of ``shapes/stars`` (one shape at 1,375 point
counts). Images identical to an earlier one at ``DEDUP_SIZE``² are dropped (whatever ``size``,
so every size holds the same items) and their captions kept as alternatives when they differ.

Captions come from the matching ``svg/…/name.svg``: its ``<dc:title>`` unless that is generic
(a collection or theme name, an author credit, empty, …: see :func:`is_generic_title`), else the
file name minus its author suffix and counter (``chemistry_flask_matthew__02`` by "Matthew
Wardrop" gives "chemistry flask"). See :func:`clean_caption`. The train/held-out split is
:func:`destatic.data.emoji.split_of` of the caption, so all images of one caption share a split.

The result is cached as ``clipart_{size}.npz`` (uint8 NHWC) + ``clipart_{size}.json``
(metadata) under ``$DESTATIC_CACHE/clipart``.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from destatic.data.base import SplitDataset, cache_root, read_cache
from destatic.data.emoji import split_of
from destatic.data.folder import ImageTooLarge, open_rgb, resize_square
from destatic.io import write_atomic

CLIPART_ROOT = Path("/usr/share/openclipart")  # holds png/ and svg/
INSTALL_HINT = "apt-get install openclipart-png openclipart-svg"

MAX_PIXELS = 16_000_000  # 19 files are larger (posters); decoding one takes seconds and GBs
DEDUP_SIZE = 32  # duplicates are found at this size, whatever the output size
WHITE_TOLERANCE = 8  # a margin pixel differs from white by at most this in every channel
STAR_TITLE = "gramastar"  # the generated stars: one shape at 1,375 point counts
FORMAT_VERSION = 1

# Titles shared by a whole collection (lower case, compared after collapsing spaces).
GENERIC_TITLES = frozenset(
    {
        "",
        "advertising",
        "aiga_symbol_signs",
        "australian maps",
        "blueberry - iconset",
        "clip art",
        "clipart",
        "drawing",
        "etiquette icons",
        "gold-theme",
        "homes clipart",
        "image",
        "lemon svg theme",
        "map symbols",
        "people",
        "plastik-icon-theme",
        "r16 sibmission",
        "road signs",
        "sallite",
        "simple arrows",
        "svg road signs",
        "untitled",
        "various cliparts",
    }
)
GENERIC_PATTERNS = re.compile(
    r"^(part of the flat icon|clipart by |svg gradient collection)"
    r"|\b(icon ?set|icon theme|svg theme)\b"
)
# File names that say nothing (besides those matching GENERIC_PATTERNS).
MEANINGLESS_NAMES = frozenset({"", "clip art", "clipart", "drawing", "image", "untitled"})
# Generic titles that still say what every image of the collection shows.
TITLE_FIXES = {"card": "playing card"}

_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_AGENT = re.compile(r"<cc:Agent\b.*?</cc:Agent>", re.S)
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_CREATOR = re.compile(r"<dc:creator>\s*<cc:Agent[^>]*>\s*<dc:title>(.*?)</dc:title>", re.S)


@dataclass
class ClipartDataset(SplitDataset):
    """Images ``(N, size, size, 3)`` uint8 on white, a caption, the PNG's path below ``png/``,
    the raw SVG title and the top-level category each."""

    images: np.ndarray
    captions: list[str]
    names: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    alt_captions: list[list[str]] = field(default_factory=list)
    split: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U7"))


def default_root() -> Path:
    """``$DESTATIC_CACHE/clipart``, else ``~/.cache/destatic/clipart``."""
    return cache_root() / "clipart"


def cache_paths(size: int, root: Path | None = None) -> tuple[Path, Path]:
    root = Path(root) if root is not None else default_root()
    return root / f"clipart_{size}.npz", root / f"clipart_{size}.json"


def _text(raw: str) -> str:
    # some titles are escaped twice ("&amp;quot;")
    return " ".join(html.unescape(html.unescape(raw)).split())


def svg_metadata(svg: str) -> tuple[str | None, str | None]:
    """``(title, creator)`` of the SVG text's ``cc:Work`` (``None`` where absent)."""
    work = _WORK.search(svg)
    if work is None:
        return None, None
    title = _TITLE.search(_AGENT.sub("", work.group(0)))  # not the publisher's or creator's
    creator = _CREATOR.search(work.group(0))
    return (
        _text(title.group(1)) if title else None,
        _text(creator.group(1)) if creator else None,
    )


def is_generic_title(title: str | None) -> bool:
    """Whether ``title`` names a collection, theme or credit rather than the picture."""
    if title is None:
        return True
    t = " ".join(title.lower().split())
    return t in GENERIC_TITLES or GENERIC_PATTERNS.search(t) is not None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def name_caption(stem: str, creator: str | None = None) -> str:
    """A caption from a file name: the package names files ``<title>_<author>`` cut to 24
    characters, then ``_NN``; drop the counter, the (possibly cut) author and any digits."""
    s = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", stem)  # MatieresInflammables
    s = re.sub(r"[^a-z0-9]+", "_", s.lower())
    s = re.sub(r"_\d+[a-z]?_?$", "", s).strip("_")  # the _01 / _05b counter
    author = _slug(creator or "")
    for k in range(len(author), 2, -1):  # the longest cut of the author that ends the name
        if s.endswith("_" + author[:k].rstrip("_")):
            s = s[: -len(author[:k].rstrip("_")) - 1]
            break
    words = [re.sub(r"\d+$", "", w) for w in s.split("_")]  # home4, arrow2_4_1, sm_021
    return " ".join(w for w in words if w)


def clean_caption(title: str | None, stem: str, creator: str | None = None) -> str:
    """The SVG title (lower case) unless it is generic, else :func:`name_caption` of the file
    name (``""`` when neither says anything: the file is then skipped)."""
    if title is not None and title.lower().strip() in TITLE_FIXES:
        return TITLE_FIXES[title.lower().strip()]
    if not is_generic_title(title):
        return " ".join(title.lower().split())  # type: ignore[union-attr]
    caption = name_caption(stem, creator)
    if caption in MEANINGLESS_NAMES or GENERIC_PATTERNS.search(caption):
        return ""  # e.g. a file named after its collection
    return caption


def _crop_pad(im):
    """Crop the white margin and pad with white to a square (``None`` when all white)."""
    from PIL import Image, ImageChops

    diff = ImageChops.difference(im, Image.new("RGB", im.size, (255, 255, 255))).convert("L")
    box = diff.point(lambda v: 255 if v > WHITE_TOLERANCE else 0).getbbox()
    if box is None:
        return None
    im = im.crop(box)
    w, h = im.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(im, ((side - w) // 2, (side - h) // 2))
    return square


def _convert(job: tuple[Path, Path, int]) -> tuple[str, np.ndarray | None, bytes, str, str]:
    """``(status, image, dedup key, title, creator)`` for one PNG (status "ok" or a skip
    reason). Runs in worker processes."""
    from PIL import Image

    png, svg, size = job
    try:
        title, creator = svg_metadata(svg.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        title, creator = None, None
    if title == STAR_TITLE:
        return "star", None, b"", "", ""
    try:
        with warnings.catch_warnings():
            # MAX_PIXELS below Pillow's bomb limit is checked first; no global setting needed
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = open_rgb(png, max_pixels=MAX_PIXELS)
    except (ImageTooLarge, Image.DecompressionBombError):
        return "too large", None, b"", "", ""
    except Exception:  # any decoder failure (truncated, corrupt, odd mode) skips
        return "unreadable", None, b"", "", ""
    square = _crop_pad(im)
    if square is None:
        return "blank", None, b"", "", ""
    small = resize_square(square, DEDUP_SIZE)
    image = small if size == DEDUP_SIZE else resize_square(square, size)
    return "ok", image, hashlib.md5(small.tobytes()).digest(), title or "", creator or ""


def _jobs(source: Path, size: int, categories: Sequence[str] | None) -> list[tuple]:
    png_root = source / "png"
    for folder in (png_root, source / "svg"):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: {INSTALL_HINT}")
    tops = [png_root / c for c in categories] if categories else [png_root]
    pngs = sorted(p for top in tops if top.is_dir() for p in top.rglob("*.png") if p.is_file())
    return [(p, source / "svg" / p.relative_to(png_root).with_suffix(".svg"), size) for p in pngs]


def build_clipart(
    size: int = 64,
    out: Path | None = None,
    progress: bool = True,
    *,
    source: Path | None = None,
    categories: Sequence[str] | None = None,
    processes: int | None = None,
) -> ClipartDataset:
    """Convert the clip art at ``size``² and write it to ``out`` (default: the cache).

    ``source`` is the folder holding ``png/`` and ``svg/`` (default :data:`CLIPART_ROOT`);
    ``categories`` keeps only those top-level folders; ``processes`` (default: up to 2) decode
    in parallel."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    from tqdm import tqdm

    source = Path(source) if source is not None else CLIPART_ROOT
    jobs = _jobs(source, size, categories)
    if processes is None:
        processes = min(2, os.cpu_count() or 1)
    images: list[np.ndarray] = []
    captions: list[str] = []
    names: list[str] = []
    titles: list[str] = []
    cats: list[str] = []
    alts: list[list[str]] = []
    skipped: Counter[str] = Counter()
    seen: dict[bytes, int] = {}
    pool = None
    if processes > 1 and len(jobs) > 1:
        import multiprocessing

        # fork where there is one: spawn would re-import a caller's script without a main guard
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = ctx.Pool(processes)
        results = pool.imap(_convert, jobs, chunksize=16)
    else:
        results = map(_convert, jobs)
    try:
        for (png, _, _), (status, image, key, title, creator) in zip(
            jobs,
            tqdm(
                results, total=len(jobs), desc=f"clipart {size}²", unit="img", disable=not progress
            ),
            strict=True,
        ):
            if status != "ok":
                skipped[status] += 1
                continue
            name = png.relative_to(source / "png").as_posix()
            caption = clean_caption(title, png.stem, creator)
            if not caption:
                skipped["without caption"] += 1
                continue
            if key in seen:
                skipped["duplicate"] += 1
                i = seen[key]
                if caption != captions[i] and caption not in alts[i]:
                    alts[i].append(caption)
                continue
            seen[key] = len(captions)
            images.append(image)
            captions.append(caption)
            names.append(name)
            titles.append(title)
            cats.append(name.split("/", 1)[0])
            alts.append([])
    finally:
        if pool is not None:
            pool.terminate()

    ds = ClipartDataset(
        images=np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
        captions=captions,
        names=names,
        titles=titles,
        categories=cats,
        alt_captions=alts,
        split=np.array([split_of(c) for c in captions], dtype="<U7"),
    )
    _save(ds, size, out, source, categories, dict(sorted(skipped.items())))
    return ds


def _save(
    ds: ClipartDataset,
    size: int,
    root: Path | None,
    source: Path,
    categories: Sequence[str] | None,
    skipped: dict[str, int],
) -> None:
    npz_path, json_path = cache_paths(size, root)
    meta = {
        "version": FORMAT_VERSION,
        "size": size,
        "source": str(source),
        "categories": list(categories) if categories else None,
        "skipped": skipped,
        "captions": ds.captions,
        "names": ds.names,
        "titles": ds.titles,
        "categories_of": ds.categories,
        "alt_captions": ds.alt_captions,
        "split": ds.split.tolist(),
    }
    write_atomic(npz_path, lambda f: np.savez_compressed(f, images=ds.images))
    write_atomic(json_path, lambda f: f.write(json.dumps(meta, ensure_ascii=False).encode("utf-8")))


def load_clipart(
    size: int = 64,
    root: Path | None = None,
    progress: bool = True,
    *,
    source: Path | None = None,
    categories: Sequence[str] | None = None,
) -> ClipartDataset:
    """The cached dataset at ``size``², built (and cached) first if missing or stale."""
    src = Path(source) if source is not None else CLIPART_ROOT
    cached = read_cache(
        *cache_paths(size, root),
        version=FORMAT_VERSION,
        size=size,
        source=str(src),
        categories=list(categories) if categories else None,
    )
    if cached is not None:
        images, meta = cached
        return ClipartDataset(
            images=images,
            captions=meta["captions"],
            names=meta["names"],
            titles=meta["titles"],
            categories=meta["categories_of"],
            alt_captions=meta["alt_captions"],
            split=np.array(meta["split"], dtype="<U7"),
        )
    return build_clipart(size, out=root, progress=progress, source=source, categories=categories)
