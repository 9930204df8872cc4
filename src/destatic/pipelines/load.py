"""Pipelines from and to folders in the diffusers layout (``model_index.json`` and one
sub-folder per component, safetensors weights; nothing is downloaded).

``load(path)`` asks the family registry (:mod:`destatic.pipelines.families`) which family the
folder is — destatic's own models, Stable Diffusion 1.x/2.x or SD3 saved by diffusers — and lets
it load the components. ``save(pipeline, path)`` writes any pipeline back in that layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from destatic.bundled import resolve
from destatic.io import read_model_index
from destatic.io.hub_cache import is_repo_id, resolve_repo_id
from destatic.models.flux import Flux
from destatic.models.mmdit import MMDiT
from destatic.models.registry import save_component
from destatic.models.text import (
    CLIPTextEncoder,
    FluxTextEncoder,
    SD3TextEncoder,
    SDXLTextEncoder,
)
from destatic.models.unet import UNet2DCondition
from destatic.pipelines.families import family_of
from destatic.pipelines.pipeline import Pipeline
from destatic.pipelines.single_file import load_single_file, load_vae
from destatic.process.schedulers import scheduler_config_from_process

__all__ = ["load", "save"]


def load(
    path: str | os.PathLike | None = None,
    *,
    vae: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> Pipeline:
    """A :class:`Pipeline` from a destatic or diffusers-layout folder on disk, a bundled model
    by name (:mod:`destatic.bundled`), a repo id in the local Hugging Face cache
    (:mod:`destatic.io.hub_cache`; never downloaded) or a single ``.safetensors`` checkpoint
    (:mod:`destatic.pipelines.single_file`; ``config``: a diffusers folder with its configs,
    ``tokenizer``: a tokenizer folder); ``None``: the bundled default model. The folder's
    family (:mod:`destatic.pipelines.families`) loads its components. ``vae``: another
    autoencoder (a ``vae/`` folder or a ``.safetensors`` file) in place of the model's."""
    folder = _locate(path)
    if folder.is_file():
        c, family = load_single_file(
            folder, config=None if config is None else _locate(config), tokenizer=tokenizer
        )
    else:
        index = read_model_index(folder)
        family = family_of(folder, index)
        c = family.load(folder, index)
    if vae is not None:
        c.autoencoder = load_vae(_locate(vae), c.autoencoder)
    return Pipeline(
        c.network, c.autoencoder, c.text_encoder, c.process, c.target, c.defaults, family
    )


def _locate(path: str | os.PathLike | None) -> Path:
    """A bundled name, an existing path, or a repo id found in the local Hugging Face cache."""
    found = resolve(path)
    if not found.exists() and is_repo_id(found):
        return resolve_repo_id(str(found))
    return found


def save(pipeline: Pipeline, path: str | os.PathLike, *, half: bool = False) -> None:
    """Write ``pipeline`` in the diffusers layout (``half``: fp16 weights)."""
    import torch

    if not isinstance(pipeline.network, UNet2DCondition | MMDiT | Flux):
        raise ValueError(
            f"saving a {pipeline.family.name} pipeline is not supported yet; copy the folder it "
            "was loaded from instead"
        )
    encoder = pipeline.text_encoder
    if isinstance(encoder, SD3TextEncoder) and encoder.clip_skip:
        raise ValueError("saving an SD3TextEncoder with clip_skip > 0 is not supported")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else None
    is_dit = isinstance(pipeline.network, MMDiT | Flux)
    network_key = "transformer" if is_dit else "unet"
    network_class = "MMDiT" if is_dit else "UNet2DCondition"
    if isinstance(pipeline.network, Flux):
        network_class = "FluxTransformer2DModel"  # the flux family matches diffusers' name
    save_component(
        pipeline.network,
        folder / network_key,
        class_name=network_class,
        config=pipeline.network.config.to_dict(),
        dtype=dtype,
    )
    if pipeline.autoencoder is not None:
        save_component(
            pipeline.autoencoder,
            folder / "vae",
            class_name="AutoencoderKL",
            config=pipeline.autoencoder.config.to_dict(),
            dtype=dtype,
        )
    text_entry, extra = _save_text_encoder(encoder, folder)
    from destatic.process import ConsistencyTarget

    target = pipeline.target
    if isinstance(target, ConsistencyTarget):
        extra["destatic_consistency"] = {"sigma_data": target.sigma_data, "scale": target.scale}
        target = target.base
    if pipeline.defaults:
        extra["destatic_defaults"] = dict(pipeline.defaults)
    scheduler = scheduler_config_from_process(pipeline.process, target)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "DestaticPipeline",
        network_key: ["destatic", network_class],
        "vae": ["destatic", "AutoencoderKL"] if pipeline.autoencoder is not None else [None, None],
        "text_encoder": text_entry,
        "scheduler": ["diffusers", scheduler["_class_name"]],
    }
    if isinstance(encoder, CLIPTextEncoder):
        index["tokenizer"] = ["transformers", type(encoder.tokenizer).__name__]
    index.update(extra)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _save_text_encoder(encoder, folder: Path) -> tuple[list, dict]:
    """Write the text towers (and tokenizers) of ``encoder`` under ``folder``: its
    ``model_index.json`` entry for ``text_encoder`` and the other keys it adds there."""
    if isinstance(encoder, CLIPTextEncoder):
        encoder.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        encoder.tokenizer.save_pretrained(folder / "tokenizer")
        return ["transformers", type(encoder.model).__name__], {}
    extra: dict = {}
    if isinstance(encoder, SD3TextEncoder):
        parts = [("", encoder.clip_l.model, encoder.clip_l.tokenizer)]
        parts.append(("_2", encoder.clip_g.model, encoder.clip_g.tokenizer))
        if encoder.t5 is not None:
            parts.append(("_3", encoder.t5, encoder.t5_tokenizer))
        else:
            extra["text_encoder_3"] = extra["tokenizer_3"] = [None, None]
        if encoder.max_sequence_length != 256:
            extra["destatic_max_sequence_length"] = encoder.max_sequence_length
    elif isinstance(encoder, SDXLTextEncoder):
        if encoder.clip_skip:
            raise ValueError("saving an SDXLTextEncoder with clip_skip > 0 is not supported")
        parts = [("_2", encoder.clip_g.model, encoder.clip_g.tokenizer)]
        if encoder.clip_l is None:  # the refiner
            extra["text_encoder"] = extra["tokenizer"] = [None, None]
        else:
            parts.insert(0, ("", encoder.clip_l.model, encoder.clip_l.tokenizer))
        extra["force_zeros_for_empty_prompt"] = encoder.force_zeros_for_empty_prompt
        extra["requires_aesthetics_score"] = encoder.requires_aesthetics_score
    elif isinstance(encoder, FluxTextEncoder):
        parts = [("", encoder.clip.model, encoder.clip.tokenizer)]
        parts.append(("_2", encoder.t5, encoder.t5_tokenizer))
        extra["destatic_max_sequence_length"] = encoder.max_sequence_length
    else:
        return ["destatic", type(encoder).__name__], {
            "destatic_text_max_length": encoder.max_length
        }
    for suffix, model, tokenizer in parts:  # (suffix, model, tokenizer) of each text tower
        model.save_pretrained(folder / f"text_encoder{suffix}", safe_serialization=True)
        tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
        extra[f"text_encoder{suffix}"] = ["transformers", type(model).__name__]
        extra[f"tokenizer{suffix}"] = ["transformers", type(tokenizer).__name__]
    return extra["text_encoder"], extra
