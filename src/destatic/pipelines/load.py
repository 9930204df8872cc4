"""Pipelines from and to folders in the diffusers layout (DESIGN.md, "Checkpoints").

``load(path)`` reads ``model_index.json`` and one sub-folder per component: a destatic folder,
or a Stable Diffusion 1.x/2.x folder saved by diffusers (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel + CLIPTokenizer and the scheduler config, mapped onto our process and target),
or a Stable Diffusion 3 folder (SD3Transformer2DModel, CLIP-L + CLIP-G + optional T5, the
FlowMatchEulerDiscreteScheduler config → :class:`~destatic.process.RectifiedFlow` + "flow").
Weights are safetensors only; nothing is downloaded.

A distilled model keeps two more keys in ``model_index.json``: ``destatic_defaults`` (its
generation defaults, e.g. ``{"sampler": "lcm", "steps": 4, "guidance": 3.0, "guidance_range":
[1, 6]}``) and ``destatic_consistency`` (``{"sigma_data": …, "scale": …}``: the network is a
consistency function, :class:`~destatic.process.ConsistencyTarget` over the scheduler's target).
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
from destatic.models.text import CLIPTextEncoder, MiniLMTextEncoder, SD3TextEncoder
from destatic.pipelines.text_to_image import Pipeline

__all__ = ["load", "save"]

_NETWORK_FOLDERS = ("unet", "transformer")


def _scheduler_config(folder: Path) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: a pipeline folder needs its scheduler config")
    return read_json(path)


def _text_encoder(folder: Path, entry: list | None, index: dict):
    library, name = (entry or [None, None])[:2]
    if name == "MiniLMTextEncoder":
        return MiniLMTextEncoder.from_package(int(index.get("destatic_text_max_length", 77)))
    if name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        return CLIPTextEncoder.from_folders(folder / "text_encoder", folder / "tokenizer")
    raise CheckpointError(
        f"text encoder {library}/{name} in {folder / 'model_index.json'} is not supported "
        "(supported: CLIPTextModel, CLIPTextModelWithProjection, destatic MiniLMTextEncoder)"
    )


def _sd3_text_encoder(folder: Path, index: dict, network) -> SD3TextEncoder:
    for key in ("text_encoder", "text_encoder_2"):
        name = (index.get(key) or [None, None])[1]
        if name != "CLIPTextModelWithProjection":
            raise CheckpointError(
                f"{folder / 'model_index.json'}: SD3 {key} must be CLIPTextModelWithProjection, "
                f"got {name!r}"
            )
    t5 = (index.get("text_encoder_3") or [None, None])[1]
    if t5 not in (None, "T5EncoderModel"):
        raise CheckpointError(
            f"{folder / 'model_index.json'}: SD3 text_encoder_3 must be T5EncoderModel or null, "
            f"got {t5!r}"
        )
    if t5 is None and (folder / "text_encoder_3").is_dir():
        raise CheckpointError(f"{folder}: text_encoder_3/ exists but model_index.json names none")
    if not isinstance(network, MMDiT):
        raise CheckpointError(f"{folder}: an SD3 pipeline needs an SD3Transformer2DModel/MMDiT")
    max_sequence_length = int(index.get("destatic_max_sequence_length", 256))
    return SD3TextEncoder.from_folders(
        folder,
        joint_attention_dim=network.config.joint_attention_dim,
        max_sequence_length=max_sequence_length,
    )


def load(path: str | os.PathLike) -> Pipeline:
    """A :class:`Pipeline` from a destatic or diffusers-layout folder on disk."""
    folder = Path(path)
    index = read_model_index(folder)
    several = "text_encoder_3" in index or "text_encoder_2" in index
    if several and "transformer" not in index:
        raise CheckpointError(
            f"{folder}: pipelines with several text encoders and a UNet (SDXL) do not load yet; "
            "load the UNet alone with destatic.checkpoints.load_component"
        )
    if several and "text_encoder_2" not in index:
        raise CheckpointError(
            f"{folder / 'model_index.json'} names text_encoder_3 but no text_encoder_2; "
            "an SD3 pipeline needs CLIP-L (text_encoder) and CLIP-G (text_encoder_2)"
        )
    network_key = next((k for k in _NETWORK_FOLDERS if k in index), None)
    if network_key is None:
        raise CheckpointError(f"{folder / 'model_index.json'} names no 'unet' or 'transformer'")
    for key in ("vae", "scheduler", "text_encoder"):
        if key not in index:
            raise CheckpointError(f"{folder / 'model_index.json'} names no {key!r} component")
    network = load_component(folder / network_key)
    pixel_space = (index["vae"] or [None, None])[1] is None  # destatic pixel-space model
    autoencoder = None if pixel_space else load_component(folder / "vae")
    process, target = process_from_scheduler_config(_scheduler_config(folder))
    consistency = index.get("destatic_consistency")
    if consistency is not None:
        from destatic.process import ConsistencyTarget

        try:
            target = ConsistencyTarget(target, **consistency)
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{folder / 'model_index.json'}: destatic_consistency is invalid ({e})"
            ) from e
    defaults = index.get("destatic_defaults", {})
    if not isinstance(defaults, dict):
        raise CheckpointError(f"{folder / 'model_index.json'}: destatic_defaults must be an object")
    if several:
        text_encoder = _sd3_text_encoder(folder, index, network)
    else:
        text_encoder = _text_encoder(folder, index.get("text_encoder"), index)
    return Pipeline(network, autoencoder, text_encoder, process, target, dict(defaults))


def save(pipeline: Pipeline, path: str | os.PathLike, *, half: bool = False) -> None:
    """Write ``pipeline`` in the diffusers layout (``half``: fp16 weights)."""
    import torch

    encoder = pipeline.text_encoder
    if isinstance(encoder, SD3TextEncoder) and encoder.clip_skip:
        raise ValueError("saving an SD3TextEncoder with clip_skip > 0 is not supported")
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
    if pipeline.autoencoder is not None:
        save_component(
            pipeline.autoencoder,
            folder / "vae",
            class_name="AutoencoderKL",
            config=pipeline.autoencoder.config.to_dict(),
            dtype=dtype,
        )
    extra: dict = {}
    if isinstance(encoder, SD3TextEncoder):
        text_entry = ["transformers", type(encoder.clip_l.model).__name__]
        parts = [("", encoder.clip_l.model, encoder.clip_l.tokenizer)]
        parts.append(("_2", encoder.clip_g.model, encoder.clip_g.tokenizer))
        if encoder.t5 is not None:
            parts.append(("_3", encoder.t5, encoder.t5_tokenizer))
        for suffix, model, tokenizer in parts:
            model.save_pretrained(folder / f"text_encoder{suffix}", safe_serialization=True)
            tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
            extra[f"text_encoder{suffix}"] = ["transformers", type(model).__name__]
            extra[f"tokenizer{suffix}"] = ["transformers", type(tokenizer).__name__]
        if encoder.t5 is None:
            extra["text_encoder_3"] = [None, None]
            extra["tokenizer_3"] = [None, None]
        if encoder.max_sequence_length != 256:
            extra["destatic_max_sequence_length"] = encoder.max_sequence_length
    elif isinstance(encoder, CLIPTextEncoder):
        encoder.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        encoder.tokenizer.save_pretrained(folder / "tokenizer")
        text_entry = ["transformers", type(encoder.model).__name__]
    else:
        text_entry = ["destatic", type(encoder).__name__]
        extra["destatic_text_max_length"] = encoder.max_length
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
