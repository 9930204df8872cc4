"""Single-file checkpoints as AUTOMATIC1111 and ComfyUI users download them
(``model.safetensors`` holding U-Net, autoencoder and text encoder in the original LDM names).

The family is told from the file's header alone (tensor names and shapes; no tensor is read
before it is recognised). Each format is one :class:`SingleFileFormat` in
:data:`SINGLE_FILE_FORMATS`: what keys it looks for, and how it loads. Architectures come from
small JSON configs shipped in ``destatic/pipelines/families/configs/`` (no weights), or from a
diffusers-layout ``config=`` folder (``unet/config.json``, ``vae/config.json``,
``text_encoder/config.json``, ``tokenizer/``, ``scheduler/scheduler_config.json``; each part it
has overrides the shipped one), as diffusers' ``from_single_file(config=...)``.

The tokenizer is never downloaded: it is ``tokenizer=`` (a folder), the ``config=`` folder's
``tokenizer/``, or a copy in the local Hugging Face cache (``openai/clip-vit-large-patch14`` for
SD 1.x); otherwise one line says what is missing and how to provide it.

Supported now: Stable Diffusion 1.x (CLIP ViT-L) and 2.x (OpenCLIP ViT-H, its fused q/k/v
split; the last of its 24 blocks unused, as SD 2.x takes the penultimate layer). A 2.x file does
not say whether it predicts ε or v: as diffusers' single-file rule, it is v (the 768-px models);
a 512-px ε model (2-1-base) needs ``config=`` with its scheduler config. SDXL, SD3 and Flux are
further formats here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from destatic.io import CheckpointError, read_json, read_safetensors_header
from destatic.io.hub_cache import cached_snapshot, hub_cache_dir
from destatic.models.autoencoder import AutoencoderConfig, AutoencoderKL
from destatic.models.ldm_keys import ldm_unet_name, ldm_vae_name, open_clip_name
from destatic.models.registry import load_component, load_into
from destatic.models.text import CLIPTextEncoder
from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.pipelines.families import STABLE_DIFFUSION, Components, Family
from destatic.process.schedulers import (
    process_from_scheduler_config,
    scheduler_sampling_defaults,
)

__all__ = ["SINGLE_FILE_FORMATS", "SingleFileFormat", "load_single_file", "load_vae"]

CONFIGS = Path(__file__).parent / "families" / "configs"
Header = Mapping[str, tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class SingleFileFormat:
    """One kind of single-file checkpoint: ``looks_for`` (the keys that tell it, for errors),
    ``matches(header)`` and ``load(path, header, config, tokenizer) -> (Components, Family)``."""

    name: str
    looks_for: str
    matches: Callable[[Header], bool]
    load: Callable[[Path, Header, Path | None, Path | None], tuple[Components, Family]]


SINGLE_FILE_FORMATS: dict[str, SingleFileFormat] = {}


def register_single_file(fmt: SingleFileFormat) -> SingleFileFormat:
    SINGLE_FILE_FORMATS[fmt.name] = fmt
    return fmt


def load_single_file(
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> tuple[Components, Family]:
    """The components and family of a single ``.safetensors`` checkpoint (see the module
    docstring); a file no format claims is one line listing what was looked for."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: single-file checkpoints load from .safetensors only (pickle files such as "
            ".ckpt are never unpickled); convert it to safetensors"
        )
    header = read_safetensors_header(path)
    for fmt in SINGLE_FILE_FORMATS.values():
        if fmt.matches(header):
            return fmt.load(
                path,
                header,
                None if config is None else Path(config),
                None if tokenizer is None else Path(tokenizer),
            )
    looked = "; ".join(f"{f.name}: {f.looks_for}" for f in SINGLE_FILE_FORMATS.values())
    sample = ", ".join(sorted(header)[:3]) or "no tensors"
    raise CheckpointError(
        f"{path} is no single-file checkpoint destatic knows (its keys start {sample}); "
        f"looked for {looked}"
    )


# --- configs and tokenizer -------------------------------------------------------------------


def _configs(name: str, folder: Path | None) -> dict[str, Any]:
    """The shipped config set ``name`` with each part the ``folder`` has put over it."""
    cfg = json.loads((CONFIGS / f"{name}.json").read_text(encoding="utf-8"))
    if folder is None:
        return cfg
    if not folder.is_dir():
        raise CheckpointError(f"config folder {folder} does not exist; check the path")
    parts = {
        "unet": "unet/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "scheduler": "scheduler/scheduler_config.json",
    }
    for part, rel in parts.items():
        if (folder / rel).is_file():
            cfg[part] = read_json(folder / rel)
    return cfg


def _has_tokenizer(folder: Path) -> bool:
    files = ("vocab.json", "merges.txt")
    return all((folder / f).is_file() for f in files) or (folder / "tokenizer.json").is_file()


def _find_tokenizer(
    what: str, tokenizer: Path | None, config: Path | None, repos: list[str]
) -> Path:
    """The first CLIP tokenizer folder among ``tokenizer``, ``config/tokenizer`` and the cached
    snapshots of ``repos`` (their root or ``tokenizer/``); else a one-line error."""
    if tokenizer is not None:
        for folder in (tokenizer, tokenizer / "tokenizer"):
            if _has_tokenizer(folder):
                return folder
        raise CheckpointError(
            f"tokenizer folder {tokenizer} has no vocab.json + merges.txt or tokenizer.json"
        )
    if config is not None and _has_tokenizer(config / "tokenizer"):
        return config / "tokenizer"
    for repo in repos:
        snapshot = cached_snapshot(repo)
        for folder in () if snapshot is None else (snapshot, snapshot / "tokenizer"):
            if _has_tokenizer(folder):
                return folder
    raise CheckpointError(
        f"{what} needs a CLIP tokenizer and none is available offline: looked in the Hugging "
        f"Face cache ({hub_cache_dir()}) for {', '.join(repos)}; give a tokenizer folder "
        "(tokenizer=… / --tokenizer DIR, or config=DIR with tokenizer/) or cache one with "
        f"`huggingface-cli download {repos[0]}` — destatic never downloads"
    )


# --- weights ---------------------------------------------------------------------------------


#: Where a parameter is in the file: a tensor's name, or (name, part, parts) for the ``part``-th
#: of ``parts`` equal slices along the first axis (OpenCLIP's fused q/k/v projection).
Source = str | tuple[str, int, int]


def _fill(
    build: Callable[[], nn.Module],
    path: Path,
    header: Header,
    name: Callable[[str], Source],
    where: str,
) -> nn.Module:
    """The module ``build()`` makes, every parameter loaded from the file tensor ``name(key)``
    (1×1-conv tensors fit Linear slots; extra file tensors are ignored). Names and shapes are
    checked against the header on a weightless (meta-device) copy first, so a file that does
    not fit fails at once, before a full-size network is built or a tensor is read."""
    import torch
    from safetensors import safe_open

    with torch.device("meta"):
        own = build().state_dict()
    names = {k: (s, 0, 1) if isinstance(s, str) else s for k, s in ((k, name(k)) for k in own)}

    def fits(k: str, n: str, parts: int) -> bool:
        shape = header[n][1]
        shape = (shape[0] // parts, *shape[1:]) if shape and shape[0] % parts == 0 else shape
        return _squeeze(shape) == _squeeze(tuple(own[k].shape))

    missing = sorted({n for n, _, _ in names.values() if n not in header})
    shapes = [
        f"{n}: expected {tuple(own[k].shape)} vs file {header[n][1]}"
        for k, (n, _, parts) in names.items()
        if n in header and not fits(k, n, parts)
    ]
    problems = [
        f"{label} {', '.join(items[:3])}{f' (+{len(items) - 3} more)' if len(items) > 3 else ''}"
        for label, items in (("missing keys", missing), ("shape mismatches", shapes))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{path}: the {where} does not fit its config: {'; '.join(problems)}; give "
            "config=FOLDER (--config) with the matching diffusers configs"
        )
    module = build()
    state = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for k, (n, part, parts) in names.items():
            tensor = f.get_tensor(n)
            if parts > 1:
                tensor = tensor.chunk(parts, dim=0)[part]
            state[k] = tensor.reshape(own[k].shape).contiguous()
    load_into(module, state, where=f"{path} ({where})")
    return module.eval()


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without trailing unit axes (a 1×1 convolution's kernel is a Linear weight)."""
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _unet_names(config: UNetConfig) -> Callable[[str], str]:
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise CheckpointError("per-block layers_per_block is not supported in single files yet")
    up = {i for i, t in enumerate(config.up_block_types) if t.startswith("CrossAttn")}
    return lambda k: "model.diffusion_model." + ldm_unet_name(k, layers, up)


def _vae_names(config: AutoencoderConfig, prefix: str) -> Callable[[str], str]:
    n = len(config.block_out_channels)
    return lambda k: prefix + ldm_vae_name(k, n)


def _clip_names(header: Header, prefix: str) -> Callable[[str], str]:
    """Our CLIPTextModel key → the file's (``…transformer.text_model.`` or, in older files,
    ``…transformer.`` without ``text_model.``)."""
    short = not any(k.startswith(prefix + "text_model.") for k in header)
    inner = "" if short else "text_model."

    def name(key: str) -> str:
        return prefix + inner + key.removeprefix("text_model.")

    return name


# --- Stable Diffusion 1.x --------------------------------------------------------------------

_SD1_CLIP = "cond_stage_model.transformer."
_SD2_CLIP = "cond_stage_model.model."
_UNET = "model.diffusion_model."


def _is_sd1(header: Header) -> bool:
    return f"{_UNET}input_blocks.0.0.weight" in header and any(
        k.startswith(_SD1_CLIP) for k in header
    )


def _is_sd2(header: Header) -> bool:
    return f"{_UNET}input_blocks.0.0.weight" in header and any(
        k.startswith(_SD2_CLIP) for k in header
    )


def _sd_loader(
    configs: str, label: str, clip_names: Callable[[Header], Callable[[str], Source]]
) -> Callable[[Path, Header, Path | None, Path | None], tuple[Components, Family]]:
    """The loader of an SD 1.x / 2.x file: shipped configs ``configs``, text tower names."""

    def load(
        path: Path, header: Header, config: Path | None, tokenizer: Path | None
    ) -> tuple[Components, Family]:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        cfg = _configs(configs, config)
        tok_dir = _find_tokenizer(f"{path.name} ({label})", tokenizer, config, cfg["tokenizer"])
        unet_config = UNetConfig.from_diffusers(cfg["unet"])
        unet = _fill(
            lambda: UNet2DCondition(unet_config), path, header, _unet_names(unet_config), "U-Net"
        )
        vae_config = AutoencoderConfig.from_diffusers(cfg["vae"])
        vae_names = _vae_names(vae_config, "first_stage_model.")
        vae = _fill(lambda: AutoencoderKL(vae_config), path, header, vae_names, "autoencoder")
        text_config = {k: v for k, v in cfg["text_encoder"].items() if not k.startswith("_")}
        text = _fill(
            lambda: CLIPTextModel(CLIPTextConfig(**text_config)),
            path,
            header,
            clip_names(header),
            "text encoder",
        )
        tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        process, target = process_from_scheduler_config(cfg["scheduler"])
        embedded = unet_config.time_cond_proj_dim is not None
        defaults = scheduler_sampling_defaults(cfg["scheduler"], embedded)
        encoder = CLIPTextEncoder(text.eval(), tok)
        parts = Components(unet.eval(), vae.eval(), encoder, process, target, dict(defaults))
        return parts, STABLE_DIFFUSION

    return load


def _open_clip_names(header: Header) -> Callable[[str], Source]:
    def name(key: str) -> Source:
        found = open_clip_name(key)
        if isinstance(found, str):
            return _SD2_CLIP + found
        return (_SD2_CLIP + found[0], *found[1:])

    return name


register_single_file(
    SingleFileFormat(
        name="SD 1.x",
        looks_for=f"{_UNET}input_blocks… with {_SD1_CLIP}text_model… (CLIP ViT-L)",
        matches=_is_sd1,
        load=_sd_loader("sd1", "SD 1.x", lambda h: _clip_names(h, _SD1_CLIP)),
    )
)
register_single_file(
    SingleFileFormat(
        name="SD 2.x",
        looks_for=f"{_UNET}input_blocks… with {_SD2_CLIP}… (OpenCLIP ViT-H)",
        matches=_is_sd2,
        load=_sd_loader("sd2", "SD 2.x", _open_clip_names),
    )
)


# --- a standalone autoencoder ----------------------------------------------------------------


def load_vae(source: str | os.PathLike, like: AutoencoderKL | None) -> AutoencoderKL:
    """An autoencoder to swap into a pipeline: a diffusers ``vae/`` folder, or one
    ``.safetensors`` file in the LDM layout (``vae-ft-mse-840000-ema-pruned.safetensors``:
    ``encoder.down.0…``, with or without ``first_stage_model.``) or in diffusers' names, with the
    architecture of ``like`` (the pipeline's own autoencoder)."""
    source = Path(source)
    if source.is_dir():
        return load_component(source, "AutoencoderKL")
    if like is None:
        raise CheckpointError(f"{source}: a VAE file needs a pipeline with an autoencoder")
    header = read_safetensors_header(source)

    def build() -> AutoencoderKL:
        return AutoencoderKL(like.config)

    if "encoder.conv_in.weight" in header and any(".down_blocks." in k for k in header):
        return _fill(build, source, header, lambda k: k, "autoencoder")
    prefix = "first_stage_model." if "first_stage_model.encoder.conv_in.weight" in header else ""
    if prefix + "encoder.conv_in.weight" not in header:
        raise CheckpointError(
            f"{source} is no autoencoder destatic knows: looked for encoder.conv_in.weight "
            "(LDM or diffusers names, optionally under first_stage_model.)"
        )
    return _fill(build, source, header, _vae_names(like.config, prefix), "autoencoder")
