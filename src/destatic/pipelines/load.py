"""Pipelines from and to folders in the diffusers layout (DESIGN.md, "Checkpoints").

``load(path)`` reads ``model_index.json`` and one sub-folder per component: a destatic folder,
or a Stable Diffusion 1.x/2.x folder saved by diffusers (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel + CLIPTokenizer and the scheduler config, mapped onto our process and target).
Weights are safetensors only; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from destatic.checkpoints import (
    CheckpointError,
    load_component,
    process_from_scheduler_config,
    read_json,
    read_model_index,
    save_component,
    scheduler_config_from_process,
)
from destatic.models.mmdit import MMDiT
from destatic.models.text import CLIPTextEncoder, MiniLMTextEncoder
from destatic.pipelines.text_to_image import Pipeline

__all__ = ["load", "save"]

_NETWORK_FOLDERS = ("unet", "transformer")


def _scheduler_config(folder: Path) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: a pipeline folder needs its scheduler config")
    return read_json(path)


def _text_encoder(folder: Path, entry: list | None):
    library, name = (entry or [None, None])[:2]
    if name == "MiniLMTextEncoder":
        return MiniLMTextEncoder.from_package()
    if name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        return CLIPTextEncoder.from_folders(folder / "text_encoder", folder / "tokenizer")
    raise CheckpointError(
        f"text encoder {library}/{name} in {folder / 'model_index.json'} is not supported "
        "(supported: CLIPTextModel, CLIPTextModelWithProjection, destatic MiniLMTextEncoder)"
    )


def load(path: str | os.PathLike) -> Pipeline:
    """A :class:`Pipeline` from a destatic or diffusers-layout folder on disk."""
    folder = Path(path)
    index = read_model_index(folder)
    if "text_encoder_3" in index or "text_encoder_2" in index:
        raise CheckpointError(
            f"{folder}: pipelines with several text encoders (SD3, SDXL) do not load yet; "
            "load the transformer alone with destatic.checkpoints.load_component"
        )
    network_key = next((k for k in _NETWORK_FOLDERS if k in index), None)
    if network_key is None:
        raise CheckpointError(f"{folder / 'model_index.json'} names no 'unet' or 'transformer'")
    for key in ("vae", "scheduler", "text_encoder"):
        if key not in index:
            raise CheckpointError(f"{folder / 'model_index.json'} names no {key!r} component")
    network = load_component(folder / network_key)
    autoencoder = load_component(folder / "vae")
    process, target = process_from_scheduler_config(_scheduler_config(folder))
    text_encoder = _text_encoder(folder, index.get("text_encoder"))
    return Pipeline(network, autoencoder, text_encoder, process, target)


def save(pipeline: Pipeline, path: str | os.PathLike, *, half: bool = False) -> None:
    """Write ``pipeline`` in the diffusers layout (``half``: fp16 weights)."""
    import torch

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else None
    is_dit = isinstance(pipeline.network, MMDiT)
    network_key = "transformer" if is_dit else "unet"
    network_class = "MMDiT" if is_dit else "UNet2DCondition"
    save_component(
        pipeline.network,
        folder / network_key,
        class_name=network_class,
        config=pipeline.network.config.to_dict(),
        dtype=dtype,
    )
    save_component(
        pipeline.autoencoder,
        folder / "vae",
        class_name="AutoencoderKL",
        config=pipeline.autoencoder.config.to_dict(),
        dtype=dtype,
    )
    encoder = pipeline.text_encoder
    if isinstance(encoder, CLIPTextEncoder):
        encoder.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        encoder.tokenizer.save_pretrained(folder / "tokenizer")
        text_entry = ["transformers", type(encoder.model).__name__]
    else:
        text_entry = ["destatic", type(encoder).__name__]
    scheduler = scheduler_config_from_process(pipeline.process, pipeline.target)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "DestaticPipeline",
        network_key: ["destatic", network_class],
        "vae": ["destatic", "AutoencoderKL"],
        "text_encoder": text_entry,
        "scheduler": ["diffusers", scheduler["_class_name"]],
    }
    if isinstance(encoder, CLIPTextEncoder):
        index["tokenizer"] = ["transformers", type(encoder.tokenizer).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
