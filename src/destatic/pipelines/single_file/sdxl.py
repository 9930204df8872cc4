"""SDXL single files in the original SGM layout (Podell et al. 2023): the micro-conditioned
U-Net under ``model.diffusion_model.`` (LDM names, ``label_emb`` for the size/crop MLP), the
autoencoder under ``first_stage_model.``, and the text towers under ``conditioner.embedders.``:

* base: ``0.transformer.text_model.…`` (CLIP ViT-L, transformers' names) and ``1.model.…``
  (OpenCLIP ViT-bigG: fused q/k/v, ``text_projection`` as the matrix of ``x @ P``);
* refiner: ``0.model.…`` (OpenCLIP ViT-bigG alone; five time ids with the aesthetic score).

The two tokenizers differ (CLIP-G pads with ``!``): each is looked for as ``tokenizer/`` and
``tokenizer_2/`` in ``tokenizer=``, ``config=`` and the local Hugging Face cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from destatic.models.text import CLIPTextEncoder, SDXLTextEncoder
from destatic.pipelines.families import Components, Family
from destatic.pipelines.families.sdxl import SDXL
from destatic.pipelines.single_file.common import (
    Header,
    Loader,
    SingleFileFormat,
    configs,
    find_tokenizer,
    register_single_file,
)
from destatic.pipelines.single_file.sd import (
    UNET,
    clip_from_file,
    clip_names,
    clip_tokenizer,
    components,
    load_unet,
    open_clip_names,
    vae_from_file,
)

_EMBEDDERS = "conditioner.embedders."


def _is(refiner: bool) -> Callable[[Header], bool]:
    """The base has OpenCLIP at embedder 1 (CLIP-L at 0); the refiner OpenCLIP at 0 alone."""
    open_clip = f"{_EMBEDDERS}{0 if refiner else 1}.model.positional_embedding"
    return lambda header: f"{UNET}input_blocks.0.0.weight" in header and open_clip in header


def _loader(name: str, refiner: bool) -> Loader:
    def load(
        path: Path, header: Header, config: Path | None, tokenizer: Path | None
    ) -> tuple[Components, Family]:
        cfg = configs(name, config)
        what = f"{path.name} (SDXL{' refiner' if refiner else ''})"
        g_dir = find_tokenizer(what, tokenizer, config, cfg["tokenizer_2"], sub="tokenizer_2")
        clip_l = None
        if not refiner:
            l_dir = find_tokenizer(what, tokenizer, config, cfg["tokenizer"])
            names = clip_names(header, f"{_EMBEDDERS}0.transformer.")
            text = clip_from_file(path, header, cfg["text_encoder"], names, "CLIP-L")
            clip_l = CLIPTextEncoder(text, clip_tokenizer(l_dir))
        g_names = open_clip_names(f"{_EMBEDDERS}{0 if refiner else 1}.model.")
        text_g = clip_from_file(path, header, cfg["text_encoder_2"], g_names, "CLIP-G")
        encoder = SDXLTextEncoder(
            clip_l,
            CLIPTextEncoder(text_g, clip_tokenizer(g_dir)),
            force_zeros_for_empty_prompt=not refiner,
            requires_aesthetics_score=refiner,
        )
        unet = load_unet(path, header, cfg["unet"])
        vae = vae_from_file(path, header, cfg["vae"])
        return components(unet, vae, encoder, cfg["scheduler"]), SDXL

    return load


register_single_file(
    SingleFileFormat(
        name="SDXL",
        looks_for=f"{UNET}input_blocks… with {_EMBEDDERS}1.model… (OpenCLIP ViT-bigG)",
        matches=_is(refiner=False),
        load=_loader("sdxl", refiner=False),
    )
)
register_single_file(
    SingleFileFormat(
        name="SDXL refiner",
        looks_for=f"{UNET}input_blocks… with {_EMBEDDERS}0.model… alone",
        matches=_is(refiner=True),
        load=_loader("sdxl_refiner", refiner=True),
    )
)
