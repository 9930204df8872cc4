"""Broken inputs for the CLI's reliability checks (tests/test_reliability_cli.py and
benchmarks/reliability_cli.py): corrupt copies of the bundled model, files that are not images,
damaged generation parameters, and simulated full or read-only disks."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "BROKEN_MODELS",
    "broken_model",
    "disk_full_after",
    "latent_model",
    "read_only",
    "write_inputs",
]


def _edit_json(path: Path, **changes) -> None:
    """Set keys of the JSON object in ``path``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def _unet_config(**changes) -> Callable[[Path], None]:
    return lambda folder: _edit_json(folder / "unet" / "config.json", **changes)


def _model_index(**changes) -> Callable[[Path], None]:
    return lambda folder: _edit_json(folder / "model_index.json", **changes)


def _weights(folder: Path) -> Path:
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


def _truncate(folder: Path) -> None:
    path = _weights(folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _shard_index(shard: str) -> Callable[[Path], None]:
    """Replace the weights by a sharded index whose one shard is ``shard``."""

    def mutate(folder: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(_weights(folder)), "pt") as f:
            keys = list(f.keys())
        _weights(folder).unlink()
        index = {"metadata": {}, "weight_map": dict.fromkeys(keys, shard)}
        (folder / "unet" / "model.safetensors.index.json").write_text(json.dumps(index))

    return mutate


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(_weights(folder)))
    state = {k: v.float().fill_(float("nan")) for k, v in state.items()}
    save_file(state, str(_weights(folder)))


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: shutil.rmtree(folder / name)


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text, encoding="utf-8")


# name → what is broken in a copy of the bundled model
BROKEN_MODELS: dict[str, Callable[[Path], None]] = {
    "index_not_json": _write("model_index.json", "{oops"),
    "index_a_list": _write("model_index.json", "[1, 2]"),
    "no_unet": _remove("unet"),
    "no_scheduler": _remove("scheduler"),
    "unet_config_not_json": _write("unet/config.json", "garbage"),
    "zero_groups": _unet_config(norm_num_groups=0),
    "groups_not_dividing": _unet_config(norm_num_groups=5),
    "huge_sample_size": _unet_config(sample_size=100_000),
    "negative_channels": _unet_config(block_out_channels=[-32, 64, 128]),
    "zero_layers": _unet_config(layers_per_block=0),
    "zero_heads": _unet_config(attention_head_dim=0),
    "channels_as_text": _unet_config(in_channels="three"),
    "truncated_weights": _truncate,
    "self_shard": _shard_index("model.safetensors.index.json"),
    "pickle_shard": _shard_index("weights.bin"),
    "nan_weights": _nan_weights,
    "unknown_scheduler": _write("scheduler/scheduler_config.json", '{"_class_name": "Bogus"}'),
    "unknown_text_encoder": _model_index(text_encoder=["x", "Bogus"]),
    "bad_default_sampler": _model_index(destatic_defaults={"sampler": "bogus"}),
    "bad_default_steps": _model_index(destatic_defaults={"steps": "many"}),
    "defaults_a_list": _model_index(destatic_defaults=[1]),
    "negative_text_length": _model_index(destatic_text_max_length=-1),
}


def broken_model(root: Path, name: str) -> Path:
    """A copy of the bundled model in ``root/name`` with :data:`BROKEN_MODELS`\\ [name] applied."""
    import destatic

    folder = root / name
    shutil.copytree(destatic.DEFAULT_MODEL, folder)
    BROKEN_MODELS[name](folder)
    return folder


def latent_model(root: Path) -> Path:
    """A copy of the bundled model in ``root/latent`` behind a tiny random 3-channel VAE that
    halves the side: its images must have even sides (``size_multiple`` 2)."""
    import destatic
    from destatic.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from destatic.models.registry import save_component

    folder = root / "latent"
    shutil.copytree(destatic.DEFAULT_MODEL, folder)
    config = AutoencoderConfig(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=3,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(config)
    save_component(vae, folder / "vae", class_name="AutoencoderKL", config=config.to_dict())
    _edit_json(folder / "model_index.json", vae=["destatic", "AutoencoderKL"])
    return folder


def write_inputs(root: Path) -> None:
    """Input files in ``root``: ``rgb.png`` (32×32), ``mask16.png`` (16×16), ``junk.png`` (not an
    image), ``notes.txt``, ``plain.png`` (no parameters), ``damaged.png`` (parameters that are
    not JSON), ``bad-sampler.png`` / ``bad-steps.png`` / ``bad-model.png`` (parameters naming
    what does not exist), ``junk.safetensors`` and ``wrong-keys.safetensors`` (bad LoRAs), and
    ``captioned/`` (40 captioned swatches, a ``--data folder`` dataset)."""
    from safetensors.torch import save_file
    from torch import zeros

    from destatic.pipelines import GenerationRequest

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.new("L", (16, 16), 255).save(root / "mask16.png")
    Image.new("RGB", (32, 32)).save(root / "plain.png")
    (root / "junk.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("not an image\n", encoding="utf-8")
    from PIL.PngImagePlugin import PngInfo

    damaged = PngInfo()
    damaged.add_itxt("destatic", "{not json")
    Image.new("RGB", (32, 32)).save(root / "damaged.png", pnginfo=damaged)
    for name, params in {
        "bad-sampler": GenerationRequest("x", steps=1, sampler="bogus"),
        "bad-steps": GenerationRequest("x", steps=-5),
        "bad-model": GenerationRequest("x", steps=1, model=str(root / "missing-model")),
    }.items():
        Image.new("RGB", (32, 32)).save(root / f"{name}.png", pnginfo=params.png_info())
    (root / "junk.safetensors").write_bytes(b"\x00" * 64)
    save_file({"foo": zeros(2, 2)}, str(root / "wrong-keys.safetensors"))
    captioned = root / "captioned"
    captioned.mkdir(exist_ok=True)
    for k in range(40):
        colour = rng.integers(0, 256, 3, dtype=np.uint8)
        Image.new("RGB", (32, 32), tuple(int(c) for c in colour)).save(captioned / f"{k:02d}.png")
        (captioned / f"{k:02d}.txt").write_text(f"colour swatch {k}", encoding="utf-8")


@contextlib.contextmanager
def disk_full_after(images: int) -> Iterator[None]:
    """PIL's ``Image.save`` writes ``images`` images, then runs out of space: it writes a few
    bytes of the next one and raises ``OSError(ENOSPC)``, as a full disk does."""
    original = Image.Image.save
    count = 0

    def save(self, fp, *args, **kwargs):
        nonlocal count
        count += 1
        if count <= images:
            return original(self, fp, *args, **kwargs)
        if isinstance(fp, str | os.PathLike):
            with builtins.open(fp, "wb") as f:
                f.write(b"\x89PNG")
        else:
            fp.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    Image.Image.save = save
    try:
        yield
    finally:
        Image.Image.save = original


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Files and folders under ``folder`` cannot be created or written (``OSError(EROFS)``), as
    on a read-only mount; works for root too, for whom ``chmod`` blocks nothing."""
    folder = Path(os.path.abspath(folder))
    patched = {
        (builtins, "open"): builtins.open,
        (io, "open"): io.open,
        (os, "open"): os.open,
        (os, "mkdir"): os.mkdir,
    }

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(folder)

    def refuse(original, writes: Callable[..., bool]):
        def wrapper(path, *args, **kwargs):
            if inside(path) and writes(path, *args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
            return original(path, *args, **kwargs)

        return wrapper

    def mode_writes(path, mode: str = "r", *args, **kwargs) -> bool:
        return any(c in mode for c in "wax+")

    def flags_write(path, flags: int, *args, **kwargs) -> bool:
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    def creates(path, *args, **kwargs) -> bool:
        return not os.path.lexists(path)  # an existing folder: FileExistsError, as on a mount

    rules = {"open": mode_writes, "mkdir": creates}
    for (module, name), original in patched.items():
        writes = flags_write if (module, name) == (os, "open") else rules[name]
        setattr(module, name, refuse(original, writes))
    try:
        yield
    finally:
        for (module, name), original in patched.items():
            setattr(module, name, original)
