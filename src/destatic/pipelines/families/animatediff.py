"""AnimateDiff text-to-video folders saved by diffusers (``AnimateDiffPipeline``; Guo et al.
2024): a Stable Diffusion 1.x U-Net with motion modules (``UNetMotionModel``, our
:class:`~destatic.models.animatediff.UNetMotion`), SD's CLIP text encoder and ``AutoencoderKL``,
and the scheduler config mapped onto our process as for SD.

diffusers saves the motion modules twice: inside ``unet/`` (the U-Net it built with
``UNetMotionModel.from_unet2d``) and alone in ``motion_adapter/``. Its ``from_pretrained`` draws
with ``unet/`` and never merges ``motion_adapter/`` again, so destatic loads ``unet/`` and
ignores ``motion_adapter/`` too.

The state is ``(B, 4, F, H/8, W/8)``: F frames of SD latents, F defaulting to the U-Net's
``num_frames`` (16, diffusers' default, when its config does not say). Each frame is drawn with
the clip's timestep and text (the network repeats them per frame) and decoded as an image by the
VAE (:meth:`~destatic.pipelines.base.PipelineBase.decode`: B·F images, diffusers'
``decode_latents`` in ``decode_chunk_size`` batches — the same maths). Text encoder, generation
defaults (guidance 7.5 as diffusers, 20 steps of ``dpmpp_2m``) and VAE are SD's
(:mod:`destatic.pipelines.families.stable_diffusion`).

The path most people have — an SD 1.x folder or single file and a separate ``MotionAdapter``
folder (guoyww/animatediff-motion-adapter-v1-5-*) — goes through :func:`animate`:
``destatic.load(sd, motion_adapter=adapter)`` (``--motion-adapter`` on the command line).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from destatic.io import CheckpointError, read_json
from destatic.models.animatediff import MotionAdapter, UNetMotion
from destatic.models.registry import load_component
from destatic.models.text import TextEncoder
from destatic.models.unet import UNet2DCondition
from destatic.pipelines.families.base import Family, entry, register_family
from destatic.pipelines.families.stable_diffusion import STABLE_DIFFUSION
from destatic.pipelines.families.video import VIDEO

__all__ = ["ANIMATEDIFF", "animate", "load_motion_adapter"]

MOTION_UNET = "UNetMotionModel"


def _matches(index: Mapping[str, Any]) -> bool:
    """A U-Net with motion modules on CLIP (destatic's own, on MiniLM, is ``destatic-video``);
    an SDXL one (``AnimateDiffSDXLPipeline``) is claimed here to fail in one line."""
    return (
        entry(index, "unet") == MOTION_UNET and entry(index, "text_encoder") != "MiniLMTextEncoder"
    )


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> TextEncoder:
    """SD's CLIP text encoder; two (AnimateDiff for SDXL) are refused."""
    if not STABLE_DIFFUSION.matches({**index, "unet": ["diffusers", "UNet2DConditionModel"]}):
        raise CheckpointError(
            f"{folder / 'model_index.json'}: only AnimateDiff for SD 1.x (one CLIP text encoder) "
            f"is supported, not {index.get('_class_name') or 'this text encoder'}"
        )
    return STABLE_DIFFUSION.text_encoder(folder, index, network)


ANIMATEDIFF = register_family(
    Family(
        name="animatediff",
        description="AnimateDiff: SD 1.x UNet with motion modules + CLIP",
        matches=_matches,
        text_encoder=_text_encoder,
        defaults=dict(STABLE_DIFFUSION.defaults),  # guidance 7.5 as diffusers
        latent_shape=VIDEO.latent_shape,
        media="video",
    )
)


def load_motion_adapter(folder: str | os.PathLike) -> MotionAdapter:
    """The motion modules of a diffusers ``MotionAdapter`` folder (``config.json`` +
    safetensors); anything else is one line saying what is expected."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(
            f"{folder} is no MotionAdapter folder (no config.json); give the folder diffusers "
            "saved the motion adapter in (e.g. guoyww/animatediff-motion-adapter-v1-5-3)"
        )
    found = read_json(config).get("_class_name")
    if found != "MotionAdapter":
        raise CheckpointError(f"{config}: expected a MotionAdapter, got {found!r}")
    adapter = load_component(folder, "MotionAdapter")
    assert isinstance(adapter, MotionAdapter)
    return adapter


def animate(
    network: nn.Module, family: Family, adapter: str | os.PathLike
) -> tuple[UNetMotion, Family]:
    """``network``, an SD 1.x/2.x U-Net, with the motion modules of the ``MotionAdapter``
    folder ``adapter`` (:meth:`UNetMotion.from_unet <destatic.models.animatediff.UNetMotion.
    from_unet>`, diffusers' ``from_unet2d``), and the family it then draws as. Another model,
    or an adapter made for other blocks, is one line."""
    if isinstance(network, UNetMotion):
        raise ValueError(
            "this model already has motion modules (a UNetMotionModel); drop the "
            "motion adapter (--motion-adapter)"
        )
    if family is not STABLE_DIFFUSION or type(network) is not UNet2DCondition:
        raise ValueError(
            f"a motion adapter (--motion-adapter) animates an SD 1.x/2.x U-Net; this model is "
            f"{family.name} ({family.description})"
        )
    modules = load_motion_adapter(adapter)
    try:
        return UNetMotion.from_unet(network, modules).eval(), ANIMATEDIFF
    except ValueError as e:
        raise ValueError(f"motion adapter {adapter}: {e}") from e
