"""FLUX.1 folders saved by diffusers: ``FluxTransformer2DModel`` (our :class:`~destatic.models.
flux.Flux`), CLIP-L pooled + T5 tokens (diffusers' ``FluxPipeline.encode_prompt``), the 16-channel
VAE with its shift factor, and the ``FlowMatchEulerDiscreteScheduler`` with
``use_dynamic_shifting`` → rectified flow whose shift follows the image size.

Two variants, told apart by the transformer's ``guidance_embeds``:

* **dev** is guidance-distilled: the scale w is a network input (one pass per step, no
  negative prompt; diffusers' ``guidance_scale`` 3.5), T5 over 512 tokens;
* **schnell** is timestep-distilled: no guidance input, guidance 1 (one pass: plain CFG at w ≠ 1
  is diffusers' ``true_cfg_scale``), 4 steps, T5 over 256 tokens.

The grid: diffusers' FluxPipeline runs ``sigmas = linspace(1, 1/N, N)`` (flow times, then
shifted by ``time_shift``), i.e. the unshifted times 1 - i/N. Our ``simple`` grid picks those
entries of the 1000-step table, so with N dividing 1000 (the defaults 20 and 4) it gives exactly
diffusers' σ's; other N differ by less than one training step.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from destatic.io import CheckpointError, read_json
from destatic.models.flux import PACK, Flux
from destatic.models.text import FluxTextEncoder
from destatic.pipelines.families.base import (
    Components,
    Family,
    entry,
    register_family,
    write_text_towers,
)
from destatic.process import Process, RectifiedFlow

__all__ = ["FLUX", "SCHNELL_DEFAULTS"]

#: What schnell changes in the family defaults (which are dev's).
SCHNELL_DEFAULTS = {"steps": 4, "guidance": 1.0}


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> FluxTextEncoder:
    where = folder / "model_index.json"
    for key, want in (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "T5EncoderModel")):
        if entry(index, key) != want:
            raise CheckpointError(f"{where}: Flux {key} must be {want}, got {entry(index, key)!r}")
    if not isinstance(network, Flux):
        raise CheckpointError(f"{folder}: a Flux pipeline needs a FluxTransformer2DModel")
    if network.config.joint_attention_dim != _t5_width(folder):
        raise CheckpointError(
            f"{folder}: transformer joint_attention_dim={network.config.joint_attention_dim} "
            "differs from the T5 encoder's d_model"
        )
    default_length = 512 if network.config.guidance_embeds else 256  # diffusers: dev / schnell
    length = int(index.get("destatic_max_sequence_length", default_length))
    return FluxTextEncoder.from_folders(folder, max_sequence_length=length)


def _t5_width(folder: Path) -> int | None:
    config = folder / "text_encoder_2" / "config.json"
    return read_json(config).get("d_model") if config.is_file() else None


def _process_for(process: Process, latent_shape: tuple[int, ...]) -> Process:
    """Rectified flow shifted for this many packed image tokens, (H/2)·(W/2) of the latents."""
    if not isinstance(process, RectifiedFlow):
        return process
    return process.at_resolution((latent_shape[-2] // PACK) * (latent_shape[-1] // PACK))


def _save_text_encoder(encoder: FluxTextEncoder, folder: Path) -> dict[str, Any]:
    """CLIP-L and T5 with their tokenizers, and the T5 length (dev 512, schnell 256)."""
    if not isinstance(encoder, FluxTextEncoder):
        raise ValueError(f"a Flux pipeline saves a FluxTextEncoder, not {type(encoder).__name__}")
    clip = ("", encoder.clip.model, encoder.clip.tokenizer)
    entries = write_text_towers(folder, [clip, ("_2", encoder.t5, encoder.t5_tokenizer)])
    return {**entries, "destatic_max_sequence_length": encoder.max_sequence_length}


class FluxFamily(Family):
    """The Flux family: dev's defaults, schnell's where the transformer has no guidance input."""

    def load(self, folder: Path, index: Mapping[str, Any]) -> Components:
        components = super().load(folder, index)
        if not components.network.config.guidance_embeds:
            components.defaults = {**SCHNELL_DEFAULTS, **components.defaults}
        return components


FLUX = register_family(
    FluxFamily(
        name="flux",
        description="FLUX.1 dev/schnell: Flux transformer + CLIP-L pooled + T5",
        matches=lambda index: entry(index, "transformer") == "FluxTransformer2DModel",
        text_encoder=_text_encoder,
        # 20 of diffusers' 28 steps: 20 divides the 1000-step table, so ``simple`` is exact
        defaults={"steps": 20, "sampler": "euler", "grid": "simple", "guidance": 3.5},
        process_for=_process_for,
        save_text_encoder=_save_text_encoder,
    )
)
