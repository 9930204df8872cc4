"""LoRA fine-tuning and DreamBooth on a frozen pipeline (``[train] task = "lora"``).

The base pipeline (``[lora] base``; "" = the bundled model) is frozen; a fresh LoRA adapter
(:mod:`destatic.models.lora`, B = 0 so step 0 is the base model) on its attention and
feed-forward projections is the only thing that learns, with the objective of ``[objective]``
(use the base's own). The task's model is :class:`~destatic.models.lora.AdapterWeights`: the
optimizer, the EMA and the checkpoints hold the adapter's weights alone, so a run resumes
exactly and the export (``model/``) is an adapter file for ``pipe.load_lora`` or
``destatic generate --lora``, not a whole model.

DreamBooth (Ruiz et al. 2022): with ``instance_prompt`` every image of ``data.path`` (a folder,
captions not needed, no held-out split) is trained under that one prompt ("a sks emoji"). With
``class_prompt`` too, prior preservation: the frozen base draws ``num_class_images`` images for
the class prompt once (cached as PNGs in ``class_dir`` with the settings that made them, reused
when they match), and each step's loss per sample is

    L = ‖D(x_inst) − target‖² + λ · ‖D(x_class) − target‖²,    λ = ``prior_weight``,

both halves in one batched network call, each with its own σ and noise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from destatic.data.select import CaptionedSplit
from destatic.models.lora import AdapterWeights, LoraError, LoraSpec, add_lora, applied
from destatic.models.mmdit import MMDiT
from destatic.pipelines import load
from destatic.sampling import SAMPLERS
from destatic.training.config import Config, ConfigError, choice, require
from destatic.training.data import CaptionBank, LatentCache, load_training_images, pixels
from destatic.training.objectives import OBJECTIVES
from destatic.training.tasks.base import Batch, register
from destatic.training.tasks.denoiser import DenoiserTask

__all__ = ["LoraTask", "LoraTrainConfig", "class_images", "instance_images"]


@dataclass
class LoraTrainConfig:
    """The ``[lora]`` table."""

    base: str = ""  # the pipeline folder to adapt ("" = the bundled default model)
    rank: int = 8
    alpha: float = 0.0  # 0 = rank (α/r = 1)
    targets: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    )
    dropout: float = 0.0
    instance_prompt: str = ""  # DreamBooth: every image of data.path under this prompt
    class_prompt: str = ""  # prior preservation with class images for this prompt ("" = off)
    num_class_images: int = 100
    prior_weight: float = 1.0  # λ of the prior-preservation loss
    class_steps: int = 20  # how the base draws the class images
    class_sampler: str = "dpmpp_2m"
    class_guidance: float = 3.0
    class_dir: str = ""  # where they are cached ("" = <output.dir>/class_images)

    def check(self) -> None:
        require(1 <= self.rank <= 1024, f"lora.rank = {self.rank}: use 1 … 1024")
        require(self.alpha >= 0, f"lora.alpha = {self.alpha}: use > 0 (0 = the rank)")
        require(len(self.targets) >= 1, "lora.targets needs at least one module name")
        require(0 <= self.dropout < 1, f"lora.dropout = {self.dropout}: use [0, 1)")
        require(
            not self.class_prompt or bool(self.instance_prompt),
            "lora.class_prompt (prior preservation) needs lora.instance_prompt",
        )
        require(
            self.num_class_images >= 1,
            f"lora.num_class_images = {self.num_class_images}: use a positive integer",
        )
        require(self.prior_weight >= 0, f"lora.prior_weight = {self.prior_weight}: use ≥ 0")
        require(
            1 <= self.class_steps <= 1000, f"lora.class_steps = {self.class_steps}: use 1 … 1000"
        )
        choice("lora.class_sampler", self.class_sampler, tuple(SAMPLERS))
        require(self.class_guidance >= 0, f"lora.class_guidance = {self.class_guidance}: use ≥ 0")


_CLASS_INFO = "class_images.json"


def instance_images(folder: str | Path, size: int) -> np.ndarray:
    """Every readable image under ``folder`` (sorted by path), centre-cropped and resized to
    ``size``², uint8 (N, size, size, 3); captions are not needed."""
    from destatic.data.folder import IMAGE_SUFFIXES, open_rgb, resize_square

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"data.path = {str(folder)!r} is not a folder of instance images")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    images = []
    for path in files:
        try:
            im = open_rgb(path)
        except Exception:  # unreadable files are skipped, as the image-folder dataset does
            continue
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        images.append(resize_square(im, size))
    if not images:
        raise ConfigError(f"data.path = {str(folder)!r} holds no readable images")
    return np.stack(images)


def class_images(
    pipe,
    prompt: str,
    count: int,
    folder: Path,
    *,
    steps: int,
    sampler: str,
    guidance: float,
    base: str,
    progress: bool = True,
    batch_size: int = 16,
) -> np.ndarray:
    """``count`` images of ``prompt`` by ``pipe`` (seeds 0 … count−1) as uint8 NHWC, cached as
    PNGs in ``folder``: kept while the prompt, base and sampler settings match, redrawn when not.
    """
    from PIL import Image

    settings = {
        "prompt": prompt,
        "base": base,
        "steps": steps,
        "sampler": sampler,
        "guidance": guidance,
        "size": pipe.default_size,
    }
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / _CLASS_INFO
    try:
        same = json.loads(info.read_text(encoding="utf-8")) == settings
    except (OSError, json.JSONDecodeError):
        same = False
    if not same:
        for old in folder.glob("class-*.png"):
            old.unlink()
        tmp = info.with_name(f".tmp-{os.getpid()}-{_CLASS_INFO}")
        tmp.write_text(json.dumps(settings, indent=1), encoding="utf-8")
        os.replace(tmp, info)

    def path(i: int) -> Path:
        return folder / f"class-{i:05d}.png"

    missing = [i for i in range(count) if not path(i).is_file()]
    from tqdm.auto import tqdm

    starts = range(0, len(missing), batch_size)
    for start in tqdm(starts, desc="class images", disable=not progress or not missing):
        seeds = missing[start : start + batch_size]
        images = pipe.generate(
            [prompt] * len(seeds), steps=steps, sampler=sampler, guidance=guidance, seed=seeds
        )
        arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        for i, a in zip(seeds, arrays, strict=True):
            tmp = folder / f".tmp-{os.getpid()}-class-{i:05d}.png"
            Image.fromarray(a).save(tmp)
            os.replace(tmp, path(i))
    out = []
    for i in range(count):
        with Image.open(path(i)) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return np.stack(out)


@register
class LoraTask(DenoiserTask):
    """A LoRA adapter (and optionally DreamBooth's prior preservation) on a frozen pipeline."""

    name = "lora"
    section = LoraTrainConfig

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.cfg = cfg
        lc = cfg.lora
        self.base = load(lc.base or None)
        network = self.base.network.to(device).requires_grad_(False).eval()
        if self.base.inpainting_model:
            raise ConfigError("lora.base is an inpainting model; LoRA training needs a text model")
        self.text_encoder = self.base.text_encoder
        self.autoencoder = self.base.autoencoder
        if self.autoencoder is not None:
            self.autoencoder.to(device).requires_grad_(False).eval()
        elif cfg.data.size != self.base.default_size:
            raise ConfigError(
                f"data.size = {cfg.data.size} but the base model draws {self.base.default_size}²"
            )
        if cfg.model.inpainting:
            raise ConfigError("model.inpainting does not apply to train.task = 'lora'")
        if lc.instance_prompt:
            if cfg.data.dataset != "folder":
                raise ConfigError("lora.instance_prompt needs data.dataset = 'folder' (data.path)")
            pics = instance_images(cfg.data.path, cfg.data.size)
            self.data = CaptionedSplit(pics, [[lc.instance_prompt] for _ in pics])
        else:
            self.data = load_training_images(cfg.data, progress=progress)
        prior = None
        if lc.class_prompt:
            folder = Path(lc.class_dir or Path(cfg.output.dir) / "class_images")
            prior = class_images(
                self.base,
                lc.class_prompt,
                lc.num_class_images,
                folder,
                steps=lc.class_steps,
                sampler=lc.class_sampler,
                guidance=lc.class_guidance,
                base=lc.base,
                progress=progress,
            )
        flat = [c for caps in self.data.captions for c in caps]
        self.bank = CaptionBank(
            self.text_encoder,
            [*flat, *([lc.class_prompt] if prior is not None else [])],
            progress=progress,
        )
        self.caption_ids = [self.bank.ids(caps) for caps in self.data.captions]
        self.class_id = self.bank.index[lc.class_prompt] if prior is not None else None
        self.prior_images = self.prior_latents = None
        if self.autoencoder is not None:
            self.latents = LatentCache(self.autoencoder, self.data.images, progress=progress)
            self.images = None
            if prior is not None:
                self.prior_latents = LatentCache(self.autoencoder, prior, progress=progress)
        else:
            self.latents = None
            self.images = torch.from_numpy(self.data.images)
            if prior is not None:
                self.prior_images = torch.from_numpy(prior)
        try:
            self.objective = OBJECTIVES[cfg.objective.kind](**cfg.objective.options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[objective]: {e}") from e
        spec_alpha = lc.alpha or None
        try:
            spec = LoraSpec(lc.rank, spec_alpha, tuple(lc.targets), lc.dropout)
            add_lora(network, spec, name="default")
        except LoraError as e:
            raise ConfigError(f"[lora]: {e}") from e
        self.trainable = AdapterWeights(network, "default")
        self.pipeline = self.base

    @property
    def prior(self) -> bool:
        return self.class_id is not None

    def conditioning(self, caption: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        cond = {"context": self.bank.tokens[caption].to(device)}
        if isinstance(self.base.network, MMDiT):
            cond["pooled"] = self.bank.pooled[caption].to(device)
        return cond

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        batch = super().draw(index, generator)
        if not self.prior:
            return batch
        n = len(index)
        count = len(self.prior_images if self.prior_images is not None else self.prior_latents.mean)
        rows = torch.randint(count, (n,), generator=generator)
        if self.prior_latents is not None:
            shape = (n, *self.prior_latents.mean.shape[1:])
            x0 = self.prior_latents.draw(rows, torch.randn(shape, generator=generator))
        else:
            x0 = pixels(self.prior_images[rows])
        batch["prior_x0"] = x0
        batch["prior_sigma"] = self.objective.sample_sigma(n, generator)
        batch["prior_noise"] = torch.randn(x0.shape, generator=generator)
        return batch

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        if "prior_x0" not in batch:
            return super().loss(model, batch, device)
        b = len(batch["x0"])
        captions = torch.cat([batch["caption"], torch.full((b,), self.class_id)])
        per = self.objective.loss(
            model,
            torch.cat([batch["x0"], batch["prior_x0"]]).to(device),
            self.conditioning(captions, device),
            sigma=torch.cat([batch["sigma"], batch["prior_sigma"]]),
            noise=torch.cat([batch["noise"], batch["prior_noise"]]),
        )
        return per[:b] + self.cfg.lora.prior_weight * per[b:]

    def export(self, trainable: nn.Module, folder: Path) -> None:
        """The adapter file (``pytorch_lora_weights.safetensors`` + ``lora_config.json``)."""
        lc = self.cfg.lora
        assert isinstance(trainable, AdapterWeights)
        trainable.save(
            folder,
            base=lc.base,
            instance_prompt=lc.instance_prompt,
            class_prompt=lc.class_prompt,
        )

    def sample_grid(self, trainable: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """The adapted model on the sample prompts (DreamBooth: the instance and class prompts
        on four seeds each)."""
        assert isinstance(trainable, AdapterWeights)
        s, lc = cfg.sample, cfg.lora
        if lc.instance_prompt:
            prompts = [lc.instance_prompt] * 4 + ([lc.class_prompt] * 4 if lc.class_prompt else [])
            seeds = [s.seed + i % 4 for i in range(len(prompts))]
        else:
            prompts, seeds = list(s.prompts), [s.seed + i for i in range(len(s.prompts))]
        with applied(trainable):
            images = self.base.run(s.request(prompt=prompts, seed=seeds))
        return images.cpu(), prompts
