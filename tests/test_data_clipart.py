import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from destatic.data import clipart
from destatic.data.clipart import (
    ClipartDataset,
    build_clipart,
    clean_caption,
    load_clipart,
    svg_metadata,
)
from destatic.data.emoji import split_of

SKIP_REASON = "openclipart not installed: apt-get install openclipart-png openclipart-svg"


@pytest.mark.parametrize(
    ("title", "stem", "creator", "caption"),
    [
        # good titles are kept (lower case, spaces collapsed)
        ("Chemistry Flask", "chemistry_flask_matthew__02", "Matthew Wardrop", "chemistry flask"),
        (
            "Barattolo di pillole",
            "barattolo_di_pillole_arc_01",
            "Architetto F",
            "barattolo di pillole",
        ),
        ("Full  Moon", "full_moon_dan_gerhards_01", "Dan Gerhards", "full moon"),
        (
            "tree - RPG map elements",
            "tree_-_rpg_map_elements_02",
            "Nicu Buculei",
            "tree - rpg map elements",
        ),
        # collection names, themes and credits: the file name, minus counter and author
        (
            "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)",
            "add_task",
            "Danny Allen",
            "add task",
        ),
        ("Lemon SVG theme", "folder_new", "Jose Hevia", "folder new"),
        ("Etiquette Icons", "gnome-fs-trash-empty", "Andy Fitzsimon", "gnome fs trash empty"),
        ("AIGA_Symbol_Signs", "aiga_beauty_salon1", "Jean-Victor Balin", "aiga beauty salon"),
        (
            "Clipart by Nicu Buculei - jigsaw_red_10",
            "jigsaw_green_14",
            "Nicu Buculei",
            "jigsaw green",
        ),
        (
            "SVG Gradient Collection by Alan Horkan, 2004.",
            "gradient-pastel-pink",
            "Alan Horkan",
            "gradient pastel pink",
        ),
        ("Various Cliparts", "sega_per_legno", "Architetto Francesco Rollandin", "sega per legno"),
        ("advertising", "MatieresInflammables", "yves GUILLOU", "matieres inflammables"),
        ("gold-theme", "70a004", "Juliane Krug", "70a"),
        ("people", "people_juliane_krug_05b", "Juliane Krug", "people"),
        ("", "my_lovely_baby_enrique_m_02", "Enrique Meza C", "my lovely baby"),
        (None, "cfbulb_brightlit_benji_p_", "Benji Park", "cfbulb brightlit"),
        ("Sallite", "server_zazou", "zazou (shockwavedj@yahoo.es)", "server"),
        # a fix for a collection title that still says what the pictures are
        ("card", "ornamental_s_6", "Nicu Buculei", "playing card"),
        # a file named after its generic title says nothing: skipped
        (
            "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)",
            "part_of_the_flat_icon_c_01",
            "Danny Allen",
            "",
        ),
        (
            "Clipart by Nicu Buculei - baloon1_04",
            "clipart_by_nicu_buculei_-_baloon1_04_01",
            "Nicu Buculei",
            "",
        ),
    ],
)
def test_clean_caption(title, stem, creator, caption):
    assert clean_caption(title, stem, creator) == caption


def _svg(title: str | None, creator: str = "Some Author") -> str:
    work = "" if title is None else f"<dc:title>{title}</dc:title>"
    return (
        '<?xml version="1.0"?><svg xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:cc="http://web.resource.org/cc/"><metadata><cc:Work rdf:about="">'
        f"{work}<dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent>"
        f"</dc:publisher><dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent>"
        "</dc:creator></cc:Work></metadata></svg>"
    )


def test_svg_metadata():
    assert svg_metadata(_svg("Fish &amp;amp; Chips", "Jo")) == ("Fish & Chips", "Jo")
    # no work title: not the publisher's or the creator's
    assert svg_metadata(_svg(None, "Jo")) == (None, "Jo")
    assert svg_metadata("<svg/>") == (None, None)


def _disc(mode: str, colour, size=(90, 60)) -> Image.Image:
    """A coloured disc on a transparent (or white) canvas, in ``mode``."""
    im = Image.new("RGBA", size, (255, 255, 255, 0))
    ImageDraw.Draw(im).ellipse((30, 10, 70, 50), fill=(*colour, 255))
    if mode == "RGBA":
        return im
    if mode == "LA":
        return im.convert("LA")
    if mode == "P":
        return im.convert("RGB").quantize(8)  # palette, white background
    return im.convert(mode)


def _populate(root: Path) -> None:
    """png/<category>/… + svg/<category>/…, like the package."""
    files = {
        "food/fruit/red_apple_jo_bloggs_01": (_disc("RGBA", (220, 0, 0)), "Red Apple", "Jo Bloggs"),
        "food/green_pear_01": (_disc("LA", (0, 160, 0)), "Lemon SVG theme", "Jo"),
        "animals/blue_fish_01": (_disc("P", (0, 0, 200)), "Blue Fish", "Jo"),
        "animals/bird": (_disc("RGB", (200, 200, 0), (40, 120)), "Yellow Bird", "Jo"),
        "shapes/apple_copy": (_disc("RGBA", (220, 0, 0)), "Apple Again", "Jo"),  # duplicate
        "shapes/stars/star_5pt1step": (
            _disc("RGBA", (250, 200, 0)),
            "gramastar",
            "codifiedivining",
        ),
        "shapes/blank": (Image.new("RGBA", (20, 20), (0, 0, 0, 0)), "Nothing", "Jo"),
    }
    for name, (im, title, creator) in files.items():
        png = root / "png" / f"{name}.png"
        svg = root / "svg" / f"{name}.svg"
        png.parent.mkdir(parents=True, exist_ok=True)
        svg.parent.mkdir(parents=True, exist_ok=True)
        im.save(png)
        svg.write_text(_svg(title, creator), encoding="utf-8")
    (root / "png" / "food" / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "svg" / "food" / "corrupt.svg").write_text(_svg("Corrupt"), encoding="utf-8")
    # no svg at all: the caption comes from the file name
    _disc("L", (90, 90, 90)).save(root / "png" / "animals" / "grey_mouse_02.png")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("openclipart")
    _populate(root)
    return root


def test_build_synthetic(tree, tmp_path):
    ds = build_clipart(16, out=tmp_path, progress=False, source=tree, processes=1)
    assert isinstance(ds, ClipartDataset)
    by_name = dict(zip(ds.names, ds.captions, strict=True))
    assert by_name == {
        "animals/bird.png": "yellow bird",
        "animals/blue_fish_01.png": "blue fish",
        "animals/grey_mouse_02.png": "grey mouse",
        "food/fruit/red_apple_jo_bloggs_01.png": "red apple",
        "food/green_pear_01.png": "green pear",
    }
    assert ds.images.shape == (5, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.categories == [n.split("/")[0] for n in ds.names]
    assert ds.titles[ds.names.index("food/green_pear_01.png")] == "Lemon SVG theme"
    assert ds.titles[ds.names.index("animals/grey_mouse_02.png")] == ""
    # the later copy of the apple is dropped and its caption kept as an alternative
    assert ds.alt_captions[ds.names.index("food/fruit/red_apple_jo_bloggs_01.png")] == [
        "apple again"
    ]
    assert ds.split.tolist() == [split_of(c) for c in ds.captions]
    meta = json.loads((tmp_path / "clipart_16.json").read_text(encoding="utf-8"))
    assert meta["skipped"] == {"blank": 1, "duplicate": 1, "star": 1, "unreadable": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_images_cropped_padded_on_white(tree, tmp_path):
    ds = build_clipart(32, out=tmp_path, progress=False, source=tree, processes=1)
    for name in ("food/fruit/red_apple_jo_bloggs_01.png", "food/green_pear_01.png"):
        img = ds.images[ds.names.index(name)].astype(int)
        # the margin was cropped: the disc fills the square, its corners are white
        assert (img[0, 0] >= 250).all() and (img[-1, -1] >= 250).all()
        assert (img[16, 16] < 200).any()
        assert (img[16, 2] < 200).any() and (img[2, 16] < 200).any()
    bird = ds.images[ds.names.index("animals/bird.png")].astype(int)  # 40×120 RGB, white bg
    assert (bird[16, 16] < 200).any()  # cropped to the disc, not a thin strip


def test_processes_and_sizes_agree(tree, tmp_path):
    one = build_clipart(16, out=tmp_path, progress=False, source=tree, processes=1)
    two = build_clipart(16, out=tmp_path, progress=False, source=tree, processes=2)
    np.testing.assert_array_equal(one.images, two.images)
    assert one.captions == two.captions and one.names == two.names
    big = build_clipart(24, out=tmp_path, progress=False, source=tree, processes=1)
    assert big.names == one.names  # dedup is size-independent


def test_cache_round_trip(tree, tmp_path, monkeypatch):
    ds = build_clipart(16, out=tmp_path, progress=False, source=tree, processes=1)

    def fail(*args, **kwargs):
        raise AssertionError("load_clipart rebuilt a cached dataset")

    monkeypatch.setattr(clipart, "build_clipart", fail)
    loaded = load_clipart(16, root=tmp_path, source=tree)
    np.testing.assert_array_equal(loaded.images, ds.images)
    for f in ("captions", "names", "titles", "categories", "alt_captions"):
        assert getattr(loaded, f) == getattr(ds, f)
    np.testing.assert_array_equal(loaded.split, ds.split)
    assert len(loaded.train()) + len(loaded.heldout()) == len(loaded)
    # another subset is another dataset: rebuilt
    with pytest.raises(AssertionError, match="rebuilt"):
        load_clipart(16, root=tmp_path, source=tree, categories=["food"])


def test_categories(tree, tmp_path):
    ds = build_clipart(16, out=tmp_path, progress=False, source=tree, categories=["food"])
    assert set(ds.categories) == {"food"} and len(ds) == 2


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path))
    assert clipart.cache_paths(16)[0] == tmp_path / "clipart" / "clipart_16.npz"


def test_missing_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install openclipart-png openclipart-svg"):
        build_clipart(16, out=tmp_path / "out", progress=False, source=tmp_path)
    with pytest.raises(FileNotFoundError, match="openclipart-svg"):
        load_clipart(16, root=tmp_path / "out", source=tmp_path)
    assert not (tmp_path / "out").exists()


def test_cli(tree, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from destatic.cli import app

    monkeypatch.setattr(clipart, "CLIPART_ROOT", tree)
    result = CliRunner().invoke(app, ["data", "clipart", "--size", "16", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "images 5" in result.output
    assert "distinct captions 5" in result.output
    assert "skipped 4" in result.output
    assert str(tmp_path / "clipart_16.npz") in result.output


def test_cli_missing_package(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from destatic.cli import app

    monkeypatch.setattr(clipart, "CLIPART_ROOT", tmp_path)
    result = CliRunner().invoke(app, ["data", "clipart", "--size", "8", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "apt-get install openclipart-png openclipart-svg" in result.output


def test_real_package(tmp_path):
    """One category of the real package (the full build takes ~20 s on 2 cores)."""
    if not (clipart.CLIPART_ROOT / "png").is_dir() or not (clipart.CLIPART_ROOT / "svg").is_dir():
        pytest.skip(SKIP_REASON)
    t = time.perf_counter()
    ds = build_clipart(32, out=tmp_path, progress=False, categories=["food"], processes=1)
    assert time.perf_counter() - t < 20
    assert 150 <= len(ds) <= 400
    assert set(ds.categories) == {"food"}
    assert all(c and c == c.lower() and c.strip() == c for c in ds.captions)
    assert not any(clipart.is_generic_title(c) for c in ds.captions)
    assert (ds.images.reshape(len(ds), -1).min(axis=1) < 250).all()  # nothing blank
    # the white margin is cropped: something touches the border of each image
    border = np.concatenate(
        [ds.images[:, 0], ds.images[:, -1], ds.images[:, :, 0], ds.images[:, :, -1]], axis=1
    )
    assert (border.min(axis=(1, 2)) < 200).mean() > 0.9
    assert "ice cream cone" in ds.captions or len(set(ds.captions)) > 100
