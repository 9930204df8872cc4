import random
from pathlib import Path

import numpy as np
import pytest

from destatic.data import emoji
from destatic.data.emoji import build_emoji, load_emoji, split_of

SKIP_REASON = (
    "fonts-noto-color-emoji not installed: apt-get install fonts-noto-color-emoji unicode-data"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[emoji.EmojiDataset, Path]:
    if not (emoji.FONT_PATH.is_file() and emoji.EMOJI_TEST_PATH.is_file()):
        pytest.skip(SKIP_REASON)
    root = tmp_path_factory.mktemp("emoji")
    return build_emoji(32, out=root, progress=False), root


def test_counts_and_images(built):
    ds, _ = built
    assert 3500 <= len(ds) <= 3700
    assert ds.images.dtype == np.uint8
    assert ds.images.shape == (len(ds), 32, 32, 3)
    assert len(ds.captions) == len(ds.alt_captions) == len(ds.groups) == len(ds.split)
    assert len(set(ds.captions)) == len(ds)
    # no image is blank white, and each one has some colour
    assert (ds.images.reshape(len(ds), -1).min(axis=1) < 200).all()
    assert not set(ds.captions) & {a for alts in ds.alt_captions for a in alts}


def test_captions(built):
    ds, _ = built
    captions = set(ds.captions)
    assert "grinning face" in captions
    assert "woman technologist: medium skin tone" in captions
    assert "flag: germany" in captions
    assert "flag: united states" in captions  # preferred over "u.s. outlying islands"
    assert sum("skin tone" in c for c in captions) > 1500
    assert sum(c.startswith("flag: ") for c in captions) > 250
    assert all(c == c.lower() and c.strip() == c for c in captions)
    assert "Smileys & Emotion" in ds.groups and "Flags" in ds.groups


def test_split(built):
    ds, _ = built
    n_held = len(ds.heldout())
    assert len(ds.train()) + n_held == len(ds)
    assert 0.07 < n_held / len(ds) < 0.13
    assert set(ds.split) == {"train", "heldout"}
    assert (ds.heldout().split == "heldout").all()
    # a pure function of the caption: the same under any order
    shuffled = list(ds.captions)
    random.Random(0).shuffle(shuffled)
    held = {c for c, s in zip(ds.captions, ds.split, strict=True) if s == "heldout"}
    assert {c for c in shuffled if split_of(c) == "heldout"} == held
    assert set(ds.heldout().captions) == held


def test_cache_round_trip(built, monkeypatch):
    ds, root = built
    assert (root / "emoji_32.npz").is_file() and (root / "emoji_32.json").is_file()
    assert not list(root.glob("*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("load_emoji rebuilt a cached dataset")

    monkeypatch.setattr(emoji, "build_emoji", fail)
    loaded = load_emoji(32, root=root)
    np.testing.assert_array_equal(loaded.images, ds.images)
    assert loaded.captions == ds.captions
    assert loaded.alt_captions == ds.alt_captions
    assert loaded.groups == ds.groups and loaded.subgroups == ds.subgroups
    np.testing.assert_array_equal(loaded.split, ds.split)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path))
    assert emoji.cache_paths(16)[0] == tmp_path / "emoji" / "emoji_16.npz"


def test_missing_font(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji, "FONT_PATH", tmp_path / "NotoColorEmoji.ttf")
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        build_emoji(32, out=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="unicode-data"):
        load_emoji(32, root=tmp_path)
    assert not list(tmp_path.iterdir())


def test_missing_raqm(monkeypatch, tmp_path):
    from PIL import features

    if not emoji.FONT_PATH.is_file() or not emoji.EMOJI_TEST_PATH.is_file():
        pytest.skip(SKIP_REASON)
    monkeypatch.setattr(features, "check", lambda name: False if name == "raqm" else True)
    with pytest.raises(RuntimeError, match="raqm"):
        build_emoji(32, out=tmp_path, progress=False)


def test_cli(built, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from destatic.cli import app

    ds, _ = built
    calls = []

    def fake_build(size, out=None, progress=True):
        calls.append((size, out))
        return ds

    monkeypatch.setattr(emoji, "build_emoji", fake_build)  # the build itself is tested above
    result = CliRunner().invoke(app, ["data", "emoji", "--size", "32", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert calls == [(32, tmp_path)]
    assert f"images {len(ds)}" in result.output
    assert f"train {len(ds.train())}" in result.output
    assert f"held-out {len(ds.heldout())}" in result.output
    assert str(tmp_path / "emoji_32.npz") in result.output


def test_cli_missing_font(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from destatic.cli import app

    monkeypatch.setattr(emoji, "FONT_PATH", tmp_path / "missing.ttf")
    result = CliRunner().invoke(app, ["data", "emoji", "--size", "8", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "apt-get install fonts-noto-color-emoji unicode-data" in result.output
