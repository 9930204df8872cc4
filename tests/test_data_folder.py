import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from destatic.data import CaptionedImages, load_image_folder
from destatic.data.emoji import split_of

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _half_red_half_blue(w: int = 120, h: int = 40) -> Image.Image:
    im = Image.new("RGB", (w, h), RED)
    im.paste(Image.new("RGB", (w // 2, h), BLUE), (w // 2, 0))
    return im


def _rgba() -> Image.Image:
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent: white after compositing
    im.paste(Image.new("RGBA", (16, 32), (0, 255, 0, 255)), (0, 0))
    return im


def _populate(root):
    """Valid images: green.png, sub/blue.jpg, wide.png, alpha.png; plus the problem files."""
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (50, 50), (0, 200, 0)).save(root / "green.png")
    Image.new("RGB", (64, 48), BLUE).save(root / "sub" / "blue.jpg", quality=95)
    _half_red_half_blue().save(root / "wide.png")
    _rgba().save(root / "alpha.png")
    (root / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    Image.new("RGB", (20, 20), "gray").save(root / "nocap.png")


def _checked_warning(record) -> str:
    assert len(record) == 1
    return str(record[0].message)


def test_sidecar_txt(tmp_path):
    _populate(tmp_path)
    for name, cap in [
        ("green", "a green square"),
        ("sub/blue", "blue\n"),
        ("wide", "red and blue"),
        ("alpha", "half green"),
        ("corrupt", "noise"),
    ]:
        (tmp_path / f"{name}.txt").write_text(cap, encoding="utf-8")
    with pytest.warns(UserWarning) as record:
        ds = load_image_folder(tmp_path, 16)
    msg = _checked_warning(record)
    assert "skipped 2" in msg
    assert "1 unreadable (corrupt.png)" in msg
    assert "1 without caption (nocap.png)" in msg

    assert isinstance(ds, CaptionedImages)
    assert ds.names == ["alpha.png", "green.png", "sub/blue.jpg", "wide.png"]
    assert ds.captions == ["half green", "a green square", "blue", "red and blue"]
    assert len(ds) == 4
    assert ds.images.shape == (4, 16, 16, 3) and ds.images.dtype == np.uint8

    green, blue, wide = ds.images[1], ds.images[2], ds.images[3]
    assert np.abs(green.astype(int) - (0, 200, 0)).max() <= 2
    assert np.abs(blue.astype(int) - BLUE).max() <= 10  # JPEG
    # centre crop of a 120×40 red|blue image keeps both halves: red on the left, blue on the right
    assert np.abs(wide[:, :6].astype(int) - RED).max() <= 2
    assert np.abs(wide[:, -6:].astype(int) - BLUE).max() <= 2
    # alpha composited on white: left half green, transparent right half white
    alpha = ds.images[0]
    assert np.abs(alpha[:, :6].astype(int) - (0, 255, 0)).max() <= 2
    assert (alpha[:, -6:] >= 253).all()


def test_metadata_jsonl(tmp_path):
    _populate(tmp_path)
    rows = [
        {"file_name": "green.png", "text": "a green square"},
        {"file_name": "sub/blue.jpg", "caption": "blue"},  # fallback field
        {"file_name": "wide.png", "text": "red and blue"},
        {"file_name": "alpha.png", "text": "half green"},
        {"file_name": "corrupt.png", "text": "noise"},
        {"file_name": "gone.png", "text": "missing file"},
        {"file_name": "nocap.png"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning) as record:
        ds = load_image_folder(tmp_path, 8)
    msg = _checked_warning(record)
    assert "skipped 4" in msg
    assert "1 missing (gone.png)" in msg
    assert "1 unreadable (corrupt.png)" in msg
    assert "1 without caption (nocap.png)" in msg
    assert "1 bad metadata line (metadata.jsonl:8)" in msg
    assert ds.names == ["alpha.png", "green.png", "sub/blue.jpg", "wide.png"]
    assert ds.captions == ["half green", "a green square", "blue", "red and blue"]
    assert ds.images.shape == (4, 8, 8, 3) and ds.images.dtype == np.uint8


def test_metadata_custom_field_and_unlisted_image(tmp_path):
    Image.new("RGB", (10, 30), RED).save(tmp_path / "a.png")
    Image.new("RGB", (10, 10), BLUE).save(tmp_path / "unlisted.webp")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "prompt": "tall red", "text": "other"}) + "\n"
    )
    with pytest.warns(UserWarning, match=r"1 without caption \(unlisted.webp\)"):
        ds = load_image_folder(tmp_path, 4, caption_field="prompt")
    assert ds.captions == ["tall red"]
    assert ds.images.shape == (1, 4, 4, 3)
    assert (ds.images[0] == RED).all()


def test_clean_folder_does_not_warn(tmp_path):
    for i in range(3):
        Image.new("RGB", (12, 12), (i * 80, 0, 0)).save(tmp_path / f"{i}.jpeg")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_image_folder(tmp_path, 12)
    assert ds.captions == ["image 0", "image 1", "image 2"]


def test_split_is_stable_by_name(tmp_path):
    for i in range(40):
        Image.new("RGB", (4, 4), (i, i, i)).save(tmp_path / f"img{i:02d}.png")
        (tmp_path / f"img{i:02d}.txt").write_text(f"caption {i}")
    ds = load_image_folder(tmp_path, 4)
    assert ds.split.tolist() == [split_of(n) for n in ds.names]
    train, held = ds.train(), ds.heldout()
    assert len(train) + len(held) == len(ds) == 40
    assert len(held) > 0 and len(train) > len(held)
    assert set(held.names) == {n for n, s in zip(ds.names, ds.split, strict=True) if s == "heldout"}
    assert held.images.shape == (len(held), 4, 4, 3)
    assert held.captions == [ds.captions[ds.names.index(n)] for n in held.names]


def test_empty_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="no captioned, readable images"):
        load_image_folder(tmp_path, 8)
    # only uncaptioned and corrupt files: still an error, which says what was skipped
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "bad.png").write_bytes(os.urandom(64))
    (tmp_path / "bad.txt").write_text("caption")
    with pytest.raises(ValueError, match=r"1 unreadable \(bad.png\).*1 without caption \(x.png\)"):
        load_image_folder(tmp_path, 8)


def test_bad_arguments(tmp_path):
    with pytest.raises(NotADirectoryError):
        load_image_folder(tmp_path / "nope", 8)
    with pytest.raises(ValueError, match="size"):
        load_image_folder(tmp_path, 0)
