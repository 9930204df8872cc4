"""The text → video denoiser task (``[train] task = "video"``): a
:class:`~destatic.models.video_dit.VideoDiT` on pixel clips ``(B, 3, F, H, W)`` in [-1, 1],
trained with the objective of ``[objective]`` — the image denoiser's loss with a frame axis.

Data (``[video] dataset``):

* ``"emoji_motion"``: Noto emoji moving on white, rendered on the fly from per-clip random
  parameters (:class:`destatic.data.motion.MotionClips`), so every step sees new clips of the
  same captions; emoji × motion pairs held out of training test composition;
* ``"folder"``: a user's folder of videos with captions beside them (``[data] path``;
  :func:`destatic.data.video_folder.load_video_folder`).

Network: a :class:`~destatic.models.video_dit.VideoDiT` from scratch (``[video.network]`` its
fields), or — with ``[video] base`` an image model (``"emoji"`` or a folder) — AnimateDiff: the
image U-Net inflated with motion modules (:class:`~destatic.models.animatediff.UNetMotion`,
``[video.network]`` the adapter's fields) of which only the motion modules train unless
``train_base``; the image model keeps its appearance, the modules learn the motion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.models.text import MiniLMTextEncoder
from destatic.models.video_dit import VideoDiT, VideoDiTConfig
from destatic.pipelines import Pipeline, save
from destatic.pipelines.output import film_strips
from destatic.training.config import Config, ConfigError, choice, require
from destatic.training.data import CaptionBank, draw_captions
from destatic.training.objectives import OBJECTIVES
from destatic.training.tasks.base import Batch, Task, evaluating, network_config, register

__all__ = ["VideoTask", "VideoTrainConfig"]

DATASETS = ("emoji_motion", "folder")


@dataclass
class VideoTrainConfig:
    """The ``[video]`` table."""

    dataset: str = "emoji_motion"  # emoji_motion | folder (the videos of [data] path)
    frames: int = 8  # frames per clip (the exported model's default num_frames)
    pairs: bool = True  # emoji_motion: also two-object scenes
    fps: int = 8  # playback rate of the sample clips
    network: dict[str, Any] = field(default_factory=dict)  # VideoDiT or motion adapter fields
    base: str = ""  # an image model to animate (AnimateDiff): "emoji" or a pipeline folder
    train_base: bool = False  # with base: train the image U-Net's weights too

    def check(self) -> None:
        choice("video.dataset", self.dataset, DATASETS)
        require(1 <= self.frames <= 256, f"video.frames = {self.frames}: use 1 … 256")
        require(1 <= self.fps <= 120, f"video.fps = {self.fps}: use 1 … 120")


class FolderClips:
    """A folder of captioned videos with :class:`~destatic.data.motion.MotionClips`' interface:
    ``captions`` per item and ``render(index, generator)`` (the stored clips, in [-1, 1])."""

    def __init__(self, path: str, size: int, frames: int, progress: bool = True):
        from destatic.data.video_folder import load_video_folder

        videos = load_video_folder(path, size=size, frames=frames, progress=progress)
        self.clips = torch.from_numpy(videos.clips)  # (N, F, H, W, 3) uint8
        self.captions = [[c] for c in videos.captions]

    def __len__(self) -> int:
        return len(self.captions)

    def render(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        clips = self.clips[index].permute(0, 4, 1, 2, 3).contiguous()  # (n, 3, F, H, W)
        return clips.float() / 127.5 - 1


@register
class VideoTask(Task):
    """Text → video denoiser on pixel clips (see the module docstring)."""

    name = "video"
    section = VideoTrainConfig

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.cfg = cfg
        v: VideoTrainConfig = cfg.video
        self.clips = self._clips(progress)
        try:
            self.objective = OBJECTIVES[cfg.objective.kind](**cfg.objective.options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[objective]: {e}") from e
        if v.base:
            self.text_encoder, self.trainable = self._animate(v)
        else:
            self.text_encoder = MiniLMTextEncoder.from_package(max_length=cfg.model.text_max_length)
            self.trainable = self._video_dit(v)
        self.trainable.to(device)
        flat = [c for caps in self.clips.captions for c in caps]
        self.bank = CaptionBank(self.text_encoder, flat, progress=progress)
        self.caption_ids = [self.bank.ids(caps) for caps in self.clips.captions]

    def _video_dit(self, v: VideoTrainConfig) -> nn.Module:
        fields = {
            **v.network,
            "in_channels": 3,
            "out_channels": 3,
            "sample_size": self.cfg.data.size,
            "num_frames": v.frames,
        }
        fields.setdefault("context_dim", self.text_encoder.dim)
        fields.setdefault("pooled_dim", self.text_encoder.pooled_dim)
        return VideoDiT(network_config(VideoDiTConfig, fields, "video.network"))

    def _animate(self, v: VideoTrainConfig) -> tuple[Any, nn.Module]:
        """(text encoder, U-Net with motion modules) of the image model ``video.base``, which
        must draw pixels at ``data.size`` with this run's noise process."""
        from destatic.models.animatediff import UNetMotion
        from destatic.models.unet import UNet2DCondition
        from destatic.pipelines import load

        base = load(v.base)
        if not isinstance(base.network, UNet2DCondition) or base.autoencoder is not None:
            raise ConfigError(
                f"video.base = {v.base!r} is not a pixel-space U-Net image model (like 'emoji')"
            )
        if self.cfg.data.size != base.default_size:
            raise ConfigError(
                f"data.size = {self.cfg.data.size} but video.base draws {base.default_size}²"
            )
        if base.process != self.objective.process:
            raise ConfigError(
                f"[objective] makes {self.objective.process} but video.base was trained on "
                f"{base.process}: use the base model's objective"
            )
        try:
            model = UNetMotion.from_unet(base.network, num_frames=v.frames, **v.network)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[video.network]: {e}") from e
        if not v.train_base:
            model.requires_grad_(False)
            for p in model.motion_parameters():
                p.requires_grad_(True)
        return base.text_encoder, model

    def _clips(self, progress: bool):
        cfg, v = self.cfg, self.cfg.video
        if v.dataset == "folder":
            require(bool(cfg.data.path), 'video.dataset = "folder" needs [data] path')
            return FolderClips(cfg.data.path, cfg.data.size, v.frames, progress)
        from destatic.data.motion import MotionClips

        return MotionClips(cfg.data.size, v.frames, "train", pairs=v.pairs, progress=progress)

    @property
    def num_items(self) -> int:
        return len(self.caption_ids)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        ids = [self.caption_ids[int(i)] for i in index]
        captions = draw_captions(ids, generator, self.cfg.data.caption_dropout)
        sigma = self.objective.sample_sigma(len(index), generator)
        x0 = self.clips.render(index, generator)
        noise = torch.randn(x0.shape, generator=generator)
        return {"x0": x0, "caption": captions, "sigma": sigma, "noise": noise}

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        caption = batch["caption"]
        cond = {"context": self.bank.tokens[caption].to(device)}
        if getattr(self.trainable, "takes_pooled", False):  # model may be wrapped (DDP)
            cond["pooled"] = self.bank.pooled[caption].to(device)
        return self.objective.loss(
            model, batch["x0"].to(device), cond, sigma=batch["sigma"], noise=batch["noise"]
        )

    def pipeline(self, trainable: nn.Module) -> Pipeline:
        """The inference pipeline of ``trainable``; the sample grids' guidance becomes its
        default, as the image denoiser's."""
        o = self.objective
        defaults = {"guidance": self.cfg.sample.guidance}
        return Pipeline(trainable, None, self.text_encoder, o.process, o.target, defaults)

    def export(self, trainable: nn.Module, folder: Path) -> None:
        save(self.pipeline(trainable), folder)

    def sample_grid(self, trainable: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        with evaluating(trainable):
            videos = self.pipeline(trainable).run(cfg.sample.request())
        return film_strips(videos), list(cfg.sample.prompts)
