"""destatic's own video models: a :class:`~destatic.models.video_dit.VideoDiT` trained here on
clips (pixels or per-frame latents), or one of our image U-Nets animated with AnimateDiff motion
modules (:class:`~destatic.models.animatediff.UNetMotion`), conditioned on all-MiniLM-L6-v2 like
the image models.

The state is ``(B, C, F, H, W)``: frames are one more axis of the same σ-space process, so the
samplers, grids and guidance run unchanged; only the latent shape (a frame axis, its length
the network's ``num_frames`` unless the request asks for more or fewer) and the output (frames,
not an image) differ from the image family."""

from __future__ import annotations

from destatic.pipelines.families.base import Family, entry, register_family
from destatic.pipelines.families.own import OWN

__all__ = ["VIDEO", "is_video_network"]

VIDEO_NETWORKS = ("VideoDiT",)


def _video_latents(
    batch: int, channels: int, width: int, height: int, factor: int, frames: int | None
) -> tuple[int, ...]:
    """``(B, C, F, H/f, W/f)``; ``frames`` is filled from the network before this is asked
    (:meth:`~destatic.pipelines.base.PipelineBase.latent_shape`)."""
    if frames is None or type(frames) is not int or frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {frames!r}")
    return (batch, channels, frames, height // factor, width // factor)


def is_video_network(network: object) -> bool:
    """Whether ``network`` draws clips: its config has a default frame count."""
    return getattr(getattr(network, "config", None), "num_frames", None) is not None


VIDEO = register_family(
    Family(
        name="destatic-video",
        description="destatic's own video DiT on MiniLM text",
        matches=lambda index: (
            entry(index, "transformer") in VIDEO_NETWORKS
            or (
                entry(index, "unet") == "UNetMotionModel"
                and entry(index, "text_encoder") == "MiniLMTextEncoder"
            )
        ),
        text_encoder=OWN.text_encoder,
        save_text_encoder=OWN.save_text_encoder,
        defaults=dict(OWN.defaults),
        latent_shape=_video_latents,
        media="video",
    )
)
