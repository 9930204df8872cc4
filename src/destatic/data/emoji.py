"""Noto Color Emoji as a captioned image dataset.

Every fully-qualified emoji of Unicode's ``emoji-test.txt`` (Debian ``unicode-data``) is drawn with
Pillow + raqm from ``NotoColorEmoji.ttf`` (Debian ``fonts-noto-color-emoji``: one CBDT strike at
109 ppem), composited on white and resized (LANCZOS) to ``size``². Sequences the font does not draw
as one glyph are dropped; images identical to an earlier one are dropped too and their names kept
as alternative captions. Captions are the lower-case emoji-test names (``"flag: germany"``,
``"woman technologist: medium skin tone"``). The train/held-out split is a pure function of the
main caption (sha1), so it does not depend on build order, size or machine.

The result is cached as ``emoji_{size}.npz`` (uint8 NHWC) + ``emoji_{size}.json`` (metadata).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from destatic.data.base import SplitDataset, cache_root, read_cache
from destatic.io import write_atomic

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
INSTALL_HINT = "apt-get install fonts-noto-color-emoji unicode-data"

FONT_PPEM = 109  # the font's only bitmap strike; any other size raises "invalid pixel size"
CANVAS = 136  # the glyph box is 136×128: draw at y=4 on a 136² canvas to centre it
MAX_GLYPH_WIDTH = 140  # wider than one glyph: the sequence did not ligate
HELDOUT_PERCENT = 10
# Flags that share artwork with a territory earlier in the file: caption them by the country.
PREFERRED_NAMES = frozenset({"flag: norway", "flag: france", "flag: spain", "flag: united states"})
FORMAT_VERSION = 1


@dataclass
class EmojiDataset(SplitDataset):
    """Images ``(N, size, size, 3)`` uint8 on white with one main caption each."""

    images: np.ndarray
    captions: list[str]
    alt_captions: list[list[str]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    subgroups: list[str] = field(default_factory=list)
    split: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U7"))


def split_of(caption: str) -> str:
    """``"heldout"`` for a fixed ~10% of captions (by sha1), else ``"train"``."""
    h = int.from_bytes(hashlib.sha1(caption.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


#: The five Fitzpatrick-based skin tones of emoji names, in order.
SKIN_TONES = (
    "light skin tone",
    "medium-light skin tone",
    "medium skin tone",
    "medium-dark skin tone",
    "dark skin tone",
)


def tone_variants(caption: str) -> list[str] | None:
    """The caption in each of the five skin tones (its own among them) when it names exactly
    one tone (``"raised hand: medium skin tone"``); None otherwise. A held-out caption whose
    concept was trained in other tones is a composition the model never saw: the evaluator's
    choice among these variants says whether the tone followed the prompt."""
    found = [t for t in SKIN_TONES if re.search(rf"(^|[ :,]){re.escape(t)}", caption)]
    if len(found) != 1 or caption.count("skin tone") != 1:
        return None
    return [re.sub(rf"(^|[ :,]){re.escape(found[0])}", rf"\g<1>{t}", caption) for t in SKIN_TONES]


def default_root() -> Path:
    """``$DESTATIC_CACHE/emoji``, else ``~/.cache/destatic/emoji``."""
    return cache_root() / "emoji"


def cache_paths(size: int, root: Path | None = None) -> tuple[Path, Path]:
    root = Path(root) if root is not None else default_root()
    return root / f"emoji_{size}.npz", root / f"emoji_{size}.json"


def parse_emoji_test(path: Path) -> list[tuple[str, str, str, str]]:
    """Fully-qualified entries of emoji-test.txt as ``(sequence, name, group, subgroup)``."""
    entries = []
    group = subgroup = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        if line.startswith("#") or not line.strip():
            continue
        cps, rest = line.split(";", 1)
        status, comment = rest.split("#", 1)
        if status.strip() != "fully-qualified":
            continue
        seq = "".join(chr(int(c, 16)) for c in cps.split())
        name = comment.split(None, 2)[2].strip().lower()  # '😀 E1.0 grinning face'
        entries.append((seq, name, group, subgroup))
    return entries


def _check_requirements() -> None:
    for path in (FONT_PATH, EMOJI_TEST_PATH):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found: {INSTALL_HINT}")
    from PIL import features

    if not features.check("raqm"):
        raise RuntimeError(
            "Pillow was built without raqm (PIL.features.check('raqm') is False): ZWJ, flag and "
            "skin-tone sequences would not ligate. Install libraqm (apt-get install libraqm0) "
            "or the PyPI Pillow wheel, which bundles it."
        )


def build_emoji(size: int = 64, out: Path | None = None, progress: bool = True) -> EmojiDataset:
    """Render the dataset at ``size``² and write it to ``out`` (default: the cache)."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    _check_requirements()
    from PIL import Image, ImageDraw, ImageFont
    from tqdm import tqdm

    font = ImageFont.truetype(str(FONT_PATH), FONT_PPEM, layout_engine=ImageFont.Layout.RAQM)
    entries = parse_emoji_test(Path(EMOJI_TEST_PATH))
    images: list[np.ndarray] = []
    captions: list[str] = []
    alts: list[list[str]] = []
    groups: list[str] = []
    subgroups: list[str] = []
    seen: dict[bytes, int] = {}
    for seq, name, group, subgroup in tqdm(
        entries, desc=f"emoji {size}²", unit="emoji", disable=not progress
    ):
        if font.getlength(seq) > MAX_GLYPH_WIDTH:
            continue  # not a single glyph in this font
        glyph = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 0))
        ImageDraw.Draw(glyph).text((0, 4), seq, font=font, embedded_color=True)
        bg = Image.new("RGBA", glyph.size, "white")
        bg.alpha_composite(glyph)
        full = bg.convert("RGB")
        key = hashlib.md5(full.tobytes()).digest()  # dedupe at full resolution: size-independent
        if key in seen:
            i = seen[key]
            if name in PREFERRED_NAMES:
                alts[i].insert(0, captions[i])
                captions[i] = name
            else:
                alts[i].append(name)
            continue
        seen[key] = len(captions)
        small = full if size == CANVAS else full.resize((size, size), Image.Resampling.LANCZOS)
        images.append(np.asarray(small, dtype=np.uint8))
        captions.append(name)
        alts.append([])
        groups.append(group)
        subgroups.append(subgroup)

    ds = EmojiDataset(
        images=np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
        captions=captions,
        alt_captions=alts,
        groups=groups,
        subgroups=subgroups,
        split=np.array([split_of(c) for c in captions], dtype="<U7"),
    )
    _save(ds, size, out)
    return ds


def _save(ds: EmojiDataset, size: int, root: Path | None) -> None:
    npz_path, json_path = cache_paths(size, root)
    meta = {
        "version": FORMAT_VERSION,
        "size": size,
        "font": str(FONT_PATH),
        "emoji_test": str(EMOJI_TEST_PATH),
        "captions": ds.captions,
        "alt_captions": ds.alt_captions,
        "groups": ds.groups,
        "subgroups": ds.subgroups,
        "split": ds.split.tolist(),
    }
    write_atomic(npz_path, lambda f: np.savez_compressed(f, images=ds.images))
    write_atomic(json_path, lambda f: f.write(json.dumps(meta, ensure_ascii=False).encode("utf-8")))


def load_emoji(size: int = 64, root: Path | None = None, progress: bool = True) -> EmojiDataset:
    """The cached dataset at ``size``², built (and cached) first if missing or stale."""
    cached = read_cache(*cache_paths(size, root), version=FORMAT_VERSION, size=size)
    if cached is None:
        return build_emoji(size, out=root, progress=progress)
    images, meta = cached
    return EmojiDataset(
        images=images,
        captions=meta["captions"],
        alt_captions=meta["alt_captions"],
        groups=meta["groups"],
        subgroups=meta["subgroups"],
        split=np.array(meta["split"], dtype="<U7"),
    )
