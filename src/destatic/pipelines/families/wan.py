"""Wan 2.1 text-to-video folders saved by diffusers (``WanPipeline``; Wan-AI/Wan2.1-T2V-1.3B-
Diffusers, -14B-Diffusers): ``WanTransformer3DModel`` (our :class:`~destatic.models.wan.
WanTransformer3DModel`), UMT5 tokens over 512 tokens with zeroed padding
(:class:`~destatic.models.wan_text.UMT5TextEncoder`), the causal video VAE
(:class:`~destatic.models.wan_vae.AutoencoderKLWan`: its per-channel ``latents_mean`` /
``latents_std`` are applied by its ``images_from_latents``, so the generic decode serves) and
``UniPCMultistepScheduler`` with ``use_flow_sigmas`` → rectified flow shifted by ``flow_shift``
with integer network timesteps (:mod:`destatic.process.flow_sigmas`); a folder whose scheduler
is ``FlowMatchEulerDiscreteScheduler`` runs as plain shifted rectified flow.

Latents are ``(B, 16, 1 + (F-1)/4, H/8, W/8)`` for F frames: diffusers' rule, F rounded down to
the nearest 4k + 1 (with a warning). F defaults to 81 as in diffusers (the network config's
``num_frames``); the default size is 480 × 480 (diffusers: 480 × 832). Defaults as
``WanPipeline``: 50 steps, guidance 5 (plain classifier-free guidance on the velocity, the
negative prompt "" unless given), the ``uni_pc`` sampler on the ``sgm_uniform`` grid, which on
the UniPC folder's process is diffusers' grid (``tests/test_pipeline_wan.py`` draws diffusers'
frames with the defaults alone). ``save`` writes a ``WanPipeline`` folder that diffusers loads
too.

**Image→video** (``WanImageToVideoPipeline``; Wan-AI/Wan2.1-I2V-14B-480P-Diffusers, -720P):
family ``wan_i2v``. The transformer reads 36 channels, the 16 noisy latents and a condition
built once from the input image (the first frame, at the clip's size):

* 4 mask channels: pixel frame 0 is given (1), the others are not (0); frame 0 counted 4 times
  so that the 4(1 + k) flags fold into 4 channels per latent frame (latent frame j holds flags
  4j … 4j+3);
* the 16 diffusion-space latents of the clip [image, 0, 0, …] (1 + 4k frames, the image in
  [-1, 1] then grey), the VAE's posterior mean;

and, for Wan 2.1, CLIP's image tokens (:mod:`destatic.models.clip_vision`: penultimate layer
of ``image_encoder/`` on ``image_processor/``'s crop). All three are the same in both guidance
branches. A request without ``image=`` fails in one line; mask and strength do not apply.
Wan 2.2's two-expert and timestep-per-token variants are refused at load.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.io import CheckpointError, read_json
from destatic.models.clip_vision import CLIPImageEncoder
from destatic.models.wan import WanTransformer3DModel
from destatic.models.wan_text import WAN_TOKENS, UMT5TextEncoder, WanImagePromptEncoder
from destatic.pipelines.families.base import (
    Family,
    entry,
    register_family,
    save_text_tower,
)

__all__ = ["TEMPORAL_FACTOR", "WAN", "WAN_I2V", "wan_image_mask", "wan_latent_frames"]

#: frames per latent frame after the first (Wan 2.1's VAE)
TEMPORAL_FACTOR = 4


I2V_PIPELINE = "WanImageToVideoPipeline"


def _matches(index: Mapping[str, Any]) -> bool:
    return index.get("_class_name") == "WanPipeline" or (
        entry(index, "transformer") == "WanTransformer3DModel"
        and index.get("_class_name") != I2V_PIPELINE
    )


def _matches_i2v(index: Mapping[str, Any]) -> bool:
    return index.get("_class_name") == I2V_PIPELINE


def wan_latent_frames(frames: int) -> int:
    """Latent frames of a clip of ``frames`` frames: 1 + (F-1)/4, F first rounded down to
    4k + 1 as diffusers' WanPipeline does (with a warning)."""
    if type(frames) is not int or frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {frames!r}")
    if frames % TEMPORAL_FACTOR != 1:
        rounded = frames // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
        warnings.warn(
            f"num_frames - 1 must be a multiple of {TEMPORAL_FACTOR}; drawing {rounded} frames, "
            f"not {frames}",
            stacklevel=3,
        )
        frames = rounded
    return 1 + (frames - 1) // TEMPORAL_FACTOR


def _latents(
    batch: int, channels: int, width: int, height: int, factor: int, frames: int | None
) -> tuple[int, ...]:
    """``(B, C, 1 + (F-1)/4, H/f, W/f)``; F is filled from the network before this is asked."""
    if frames is None:
        raise ValueError("num_frames must be a positive integer, got None")
    return (batch, channels, wan_latent_frames(frames), height // factor, width // factor)


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> UMT5TextEncoder:
    """UMT5 over 512 tokens (or the folder's ``destatic_max_sequence_length``), checked
    against the transformer's ``text_dim``."""
    where = folder / "model_index.json"
    found = entry(index, "text_encoder")
    if found != "UMT5EncoderModel":
        raise CheckpointError(f"{where}: Wan text_encoder must be UMT5EncoderModel, got {found!r}")
    if not isinstance(network, WanTransformer3DModel):
        raise CheckpointError(f"{folder}: a Wan pipeline needs a WanTransformer3DModel")
    config = folder / "text_encoder" / "config.json"
    width = read_json(config).get("d_model") if config.is_file() else None
    if width != network.config.text_dim:
        raise CheckpointError(
            f"{folder}: transformer text_dim={network.config.text_dim} differs from the UMT5 "
            f"encoder's d_model ({width})"
        )
    length = index.get("destatic_max_sequence_length", WAN_TOKENS)
    if type(length) is not int or not 1 <= length <= 4096:
        raise CheckpointError(f"{where}: destatic_max_sequence_length must be an integer 1 … 4096")
    return UMT5TextEncoder.from_folders(folder, max_sequence_length=length)


WAN = register_family(
    Family(
        name="wan",
        description="Wan 2.1 text-to-video: Wan transformer + UMT5, causal video VAE",
        matches=_matches,
        text_encoder=_text_encoder,
        defaults={"steps": 50, "sampler": "uni_pc", "grid": "sgm_uniform", "guidance": 5.0},
        latent_shape=_latents,
        media="video",
        diffusers_pipeline="WanPipeline",
    )
)


def _i2v_text_encoder(
    folder: Path, index: Mapping[str, Any], network: nn.Module
) -> WanImagePromptEncoder:
    """UMT5 as for text→video, and the CLIP image encoder when the transformer reads CLIP
    tokens (``image_dim``); Wan 2.2's variants fail in one line."""
    where = folder / "model_index.json"
    if index.get("boundary_ratio") is not None or entry(index, "transformer_2") is not None:
        raise CheckpointError(f"{where}: Wan 2.2's two-expert image→video is not supported")
    if index.get("expand_timesteps"):
        raise CheckpointError(f"{where}: Wan 2.2's expand_timesteps image→video is not supported")
    text = _text_encoder(folder, index, network)
    assert isinstance(network, WanTransformer3DModel)  # checked by _text_encoder
    cfg = network.config
    if cfg.in_channels != 2 * cfg.out_channels + TEMPORAL_FACTOR:
        raise CheckpointError(
            f"{folder}: an image→video transformer reads 2·{cfg.out_channels} + "
            f"{TEMPORAL_FACTOR} channels (latents, mask, image latents), got {cfg.in_channels}"
        )
    image = None
    if cfg.image_dim is not None:
        found = entry(index, "image_encoder")
        if found != "CLIPVisionModel":
            raise CheckpointError(f"{where}: image_encoder must be CLIPVisionModel, got {found!r}")
        image = CLIPImageEncoder.from_folders(folder)
        if image.dim != cfg.image_dim:
            raise CheckpointError(
                f"{folder}: transformer image_dim={cfg.image_dim} differs from the CLIP image "
                f"encoder's hidden_size ({image.dim})"
            )
    return WanImagePromptEncoder(text.model, text.tokenizer, image, text.max_length)


def _save_i2v_encoders(encoder: WanImagePromptEncoder, folder: Path) -> dict[str, Any]:
    """UMT5 and its tokenizer, and the CLIP image encoder and processor when there is one."""
    entries = save_text_tower(encoder, folder)
    image = getattr(encoder, "image_encoder", None)
    if image is not None:
        image.model.save_pretrained(folder / "image_encoder", safe_serialization=True)
        image.processor.save_pretrained(folder / "image_processor")
        entries["image_encoder"] = ["transformers", type(image.model).__name__]
        entries["image_processor"] = ["transformers", type(image.processor).__name__]
    return entries


def wan_image_mask(latent_frames: int, height: int, width: int) -> torch.Tensor:
    """The 4 mask channels (1, 4, T, h, w) of image→video: pixel frame 0 given (1), the
    4(T-1) after it not (0), frame 0's flag repeated 4 times so that latent frame j's channels
    are the flags of frames 4j … 4j+3 (module doc)."""
    given = torch.zeros(TEMPORAL_FACTOR * latent_frames)
    given[:TEMPORAL_FACTOR] = 1.0
    mask = given.view(1, latent_frames, TEMPORAL_FACTOR, 1, 1).transpose(1, 2)
    return mask.expand(1, TEMPORAL_FACTOR, latent_frames, height, width)


def _first_frame_latents(autoencoder: nn.Module, image: torch.Tensor, frames: int) -> torch.Tensor:
    """Diffusion-space latents (posterior mean) of the clip [image, grey, …] of ``frames``
    frames; ``image`` (B, 3, H, W) in [0, 1]. One encoding when the batch holds one image."""
    p = next(autoencoder.parameters())
    one = bool((image == image[:1]).all())
    first = (image[:1] if one else image).to(p.device, p.dtype) * 2 - 1
    clip = first.new_zeros(*first.shape[:2], frames, *first.shape[2:])
    clip[:, :, 0] = first
    latents = autoencoder.latents_from_images(clip, sample=False)
    return latents.expand(len(image), *latents.shape[1:]) if one else latents


def _image_inputs(pipe, r, inputs) -> dict[str, torch.Tensor]:
    """:attr:`Family.image_conditioning` of image→video: ``condition`` (B, 4 + 16, T, h, w),
    the mask and the image's latents, and ``image_context``, its CLIP tokens (module doc)."""
    if inputs is None or inputs.image is None:
        raise ValueError(
            "this Wan model is image→video: give the first frame as image= (--image on the "
            "command line)"
        )
    if inputs.mask is not None or r.strength != 1:
        raise ValueError("Wan image→video takes no mask or strength: the image is frame 0")
    batch, _, frames, height, width = pipe.latent_shape(
        len(r.prompts), inputs.width, inputs.height, r.num_frames
    )
    pixel_frames = 1 + TEMPORAL_FACTOR * (frames - 1)
    latents = _first_frame_latents(pipe.autoencoder, inputs.image, pixel_frames)
    mask = wan_image_mask(frames, height, width).expand(batch, -1, -1, -1, -1)
    out = {"condition": torch.cat([mask.to(latents), latents], dim=1)}
    if pipe.network.config.image_dim is not None:
        out["image_context"] = pipe.text_encoder.image_encoder.encode(inputs.image)
    return {k: v.to(pipe.device, pipe.dtype) for k, v in out.items()}


WAN_I2V = register_family(
    Family(
        name="wan_i2v",
        description="Wan 2.1 image-to-video: Wan transformer + UMT5 + CLIP image tokens",
        matches=_matches_i2v,
        text_encoder=_i2v_text_encoder,
        defaults=WAN.defaults,
        latent_shape=_latents,
        media="video",
        save_text_encoder=_save_i2v_encoders,
        diffusers_pipeline=I2V_PIPELINE,
        image_conditioning=_image_inputs,
    )
)
