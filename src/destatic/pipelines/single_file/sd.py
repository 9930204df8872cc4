"""Stable Diffusion 1.x / 2.x single files in the original LDM layout (``model.diffusion_model.``
U-Net, ``first_stage_model.`` autoencoder, ``cond_stage_model.`` text tower), their inpainting
variants (a U-Net ``conv_in`` over 9 channels: latents, mask, masked-image latents; 2.x's
predicts ε), and a standalone autoencoder file (``vae=``). The loaders of the parts (U-Net,
autoencoder, CLIP, T5) serve the other formats too."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from destatic.io import CheckpointError, read_safetensors_header
from destatic.models.autoencoder import AutoencoderConfig, AutoencoderKL
from destatic.models.ldm_keys import ldm_unet_name, ldm_vae_name, open_clip_name
from destatic.models.registry import load_component
from destatic.models.text import CLIPTextEncoder
from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.pipelines.families import STABLE_DIFFUSION, Components, Family
from destatic.pipelines.single_file.common import (
    CONFIG_PARTS,
    Header,
    Loader,
    Piece,
    SingleFileFormat,
    Source,
    configs,
    fill,
    find_tokenizer,
    plain,
    register_single_file,
)
from destatic.process.schedulers import (
    process_from_scheduler_config,
    scheduler_sampling_defaults,
)

__all__ = [
    "clip_from_file",
    "clip_names",
    "load_unet",
    "load_vae",
    "open_clip_names",
    "t5_from_file",
    "vae_from_file",
]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
_SD1_CLIP = "cond_stage_model.transformer."
_SD2_CLIP = "cond_stage_model.model."
_T5 = "text_encoders.t5xxl.transformer."


def unet_names(config: UNetConfig) -> Callable[[str], str]:
    """Our U-Net key → its name in the file (``model.diffusion_model.`` + the LDM name)."""
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise CheckpointError("per-block layers_per_block is not supported in single files yet")
    up = {i for i, t in enumerate(config.up_block_types) if t.startswith("CrossAttn")}
    return lambda k: UNET + ldm_unet_name(k, layers, up)


def vae_names(config: AutoencoderConfig, prefix: str) -> Callable[[str], str]:
    n = len(config.block_out_channels)
    return lambda k: prefix + ldm_vae_name(k, n)


def clip_names(header: Header, prefix: str) -> Callable[[str], str]:
    """Our CLIPTextModel key → the file's (``…transformer.text_model.`` or, in older files,
    ``…transformer.`` without ``text_model.``)."""
    short = not any(k.startswith(prefix + "text_model.") for k in header)
    inner = "" if short else "text_model."
    return lambda key: prefix + inner + key.removeprefix("text_model.")


def open_clip_names(prefix: str) -> Callable[[str], Source]:
    """Our CLIPTextModel(WithProjection) key → OpenCLIP's under ``prefix`` (fused q/k/v sliced;
    ``text_projection`` stored as the matrix ``P`` of ``x @ P``, the transposed Linear weight)."""

    def name(key: str) -> Source:
        if key == "text_projection.weight":
            return Piece(prefix + "text_projection", transpose=True)
        found = open_clip_name(key)
        if isinstance(found, str):
            return prefix + found
        return Piece(prefix + found[0], part=(found[1], found[2]))

    return name


def load_unet(path: Path, header: Header, config: dict) -> UNet2DCondition:
    """The U-Net of an LDM/SGM-layout file under the diffusers config ``config``."""
    unet_config = UNetConfig.from_diffusers(config)
    build = lambda: UNet2DCondition(unet_config)  # noqa: E731
    return fill(build, path, header, unet_names(unet_config), "U-Net")


def vae_from_file(path: Path, header: Header, config: dict, prefix: str = VAE) -> AutoencoderKL:
    """The autoencoder of an LDM-layout file (under ``prefix``) with the diffusers ``config``."""
    vae_config = AutoencoderConfig.from_diffusers(config)
    names = vae_names(vae_config, prefix)
    return fill(lambda: AutoencoderKL(vae_config), path, header, names, "autoencoder")


def clip_from_file(
    path: Path,
    header: Header,
    config: dict,
    names: Callable[[str], Source],
    where: str,
    absent: dict | None = None,
):
    """A transformers CLIP text model (with projection when ``config`` names that class);
    ``absent``: as :func:`~destatic.pipelines.single_file.common.fill`'s."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    projection = "CLIPTextModelWithProjection" in config.get("architectures", [])
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return fill(lambda: cls(CLIPTextConfig(**plain(config))), path, header, names, where, absent)


def t5_from_file(path: Path, header: Header, config: dict, tokenizer: Path, prefix: str = _T5):
    """(T5EncoderModel, its tokenizer): the encoder in transformers' names under ``prefix``
    (SD3's and ComfyUI's ``text_encoders.t5xxl.transformer.``; the tied input embedding may be
    stored once, as ``shared.weight``)."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    def name(key: str) -> str:
        if key == "encoder.embed_tokens.weight" and prefix + key not in header:
            return prefix + "shared.weight"
        return prefix + key

    t5_config = T5Config(**plain(config))
    t5 = fill(lambda: T5EncoderModel(t5_config), path, header, name, "T5 encoder")
    return t5, AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def components(unet: UNet2DCondition, vae, encoder, scheduler: dict) -> Components:
    """The pipeline parts, the process and defaults read from the scheduler config."""
    process, target = process_from_scheduler_config(scheduler)
    embedded = unet.config.time_cond_proj_dim is not None
    defaults = scheduler_sampling_defaults(scheduler, embedded)
    return Components(unet.eval(), vae.eval(), encoder, process, target, dict(defaults))


# --- Stable Diffusion 1.x / 2.x --------------------------------------------------------------


def _in_channels(header: Header) -> int | None:
    shape = header.get(f"{UNET}input_blocks.0.0.weight", (None, ()))[1]
    return shape[1] if len(shape) == 4 else None


def _is(clip_prefix: str, inpainting: bool | None = None) -> Callable[[Header], bool]:
    def matches(header: Header) -> bool:
        if f"{UNET}input_blocks.0.0.weight" not in header:
            return False
        if inpainting is not None and (_in_channels(header) == 9) != inpainting:
            return False
        return any(k.startswith(clip_prefix) for k in header)

    return matches


def _sd_loader(
    name: str,
    label: str,
    text_names: Callable[[Header], Callable[[str], Source]],
    in_channels: int | None = None,
    prediction: str | None = None,
) -> Loader:
    """The loader of an SD 1.x / 2.x file: shipped configs ``name``, text tower names; an
    ``in_channels`` U-Net (inpainting) and a ``prediction`` target unless the ``config=`` folder
    gives its own U-Net / scheduler."""

    def load(
        path: Path, header: Header, config: Path | None, tokenizer: Path | None
    ) -> tuple[Components, Family]:
        cfg = configs(name, config)
        tok_dir = find_tokenizer(f"{path.name} ({label})", tokenizer, config, cfg["tokenizer"])
        shipped = {k: not (config and (config / rel).is_file()) for k, rel in CONFIG_PARTS.items()}
        if in_channels is not None and shipped["unet"]:
            cfg["unet"] = {**cfg["unet"], "in_channels": in_channels}
        if prediction is not None and shipped["scheduler"]:
            cfg["scheduler"] = {**cfg["scheduler"], "prediction_type": prediction}
        unet = load_unet(path, header, cfg["unet"])
        vae = vae_from_file(path, header, cfg["vae"])
        text = clip_from_file(path, header, cfg["text_encoder"], text_names(header), "text encoder")
        encoder = CLIPTextEncoder(text.eval(), clip_tokenizer(tok_dir))
        return components(unet, vae, encoder, cfg["scheduler"]), STABLE_DIFFUSION

    return load


register_single_file(
    SingleFileFormat(
        name="SD 1.x inpainting",  # before SD 1.x: the same keys, conv_in over 9 channels
        looks_for=f"{UNET}input_blocks.0.0.weight over 9 channels with {_SD1_CLIP}…",
        matches=_is(_SD1_CLIP, inpainting=True),
        load=_sd_loader("sd1", "SD 1.x inpainting", lambda h: clip_names(h, _SD1_CLIP), 9),
    )
)
register_single_file(
    SingleFileFormat(
        name="SD 1.x",
        looks_for=f"{UNET}input_blocks… with {_SD1_CLIP}text_model… (CLIP ViT-L)",
        matches=_is(_SD1_CLIP),
        load=_sd_loader("sd1", "SD 1.x", lambda h: clip_names(h, _SD1_CLIP)),
    )
)
register_single_file(
    SingleFileFormat(  # 512-inpainting-ema: ε-prediction (diffusers' stable-diffusion-2-inpainting)
        name="SD 2.x inpainting",
        looks_for=f"{UNET}input_blocks.0.0.weight over 9 channels with {_SD2_CLIP}…",
        matches=_is(_SD2_CLIP, inpainting=True),
        load=_sd_loader(
            "sd2", "SD 2.x inpainting", lambda h: open_clip_names(_SD2_CLIP), 9, "epsilon"
        ),
    )
)
register_single_file(
    SingleFileFormat(
        name="SD 2.x",
        looks_for=f"{UNET}input_blocks… with {_SD2_CLIP}… (OpenCLIP ViT-H)",
        matches=_is(_SD2_CLIP),
        load=_sd_loader("sd2", "SD 2.x", lambda h: open_clip_names(_SD2_CLIP)),
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
        return fill(build, source, header, lambda k: k, "autoencoder")
    prefix = "first_stage_model." if "first_stage_model.encoder.conv_in.weight" in header else ""
    if prefix + "encoder.conv_in.weight" not in header:
        raise CheckpointError(
            f"{source} is no autoencoder destatic knows: looked for encoder.conv_in.weight "
            "(LDM or diffusers names, optionally under first_stage_model.)"
        )
    return fill(build, source, header, vae_names(like.config, prefix), "autoencoder")
