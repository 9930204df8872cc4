"""Text → image models over a frozen VQ tokenizer's codes (``[train] task = "autoregressive"`` or
``"maskgit"``, both read the ``[tokens]`` table).

The training images are tokenised once when the run starts: the tokenizer of ``tokens.tokenizer``
(a :class:`~destatic.models.vq.VQModel` folder, e.g. the ``tokenizer`` task's ``model/``), in
eval mode and without gradients, maps each image to its ``N = (size / downsample_factor)²``
codebook indices in raster order, kept as one LongTensor ``[items, N]``. Images are not flipped:
emoji such as arrows and text are direction-specific. Captions are drawn as in the denoiser
task, dropped to ``""`` with ``data.caption_dropout`` (the unconditional stream that
classifier-free guidance subtracts at sampling time), and encoded once by the frozen MiniLM
(:class:`~destatic.training.data.CaptionBank`); the transformer reads its per-token states as a
prefix (:class:`~destatic.models.token_transformer.TokenTransformer`).

* ``autoregressive`` (LlamaGen, Sun et al. 2024): a causal transformer, next-token
  cross-entropy over all ``N`` codes, ``L = −(1/N) Σ_i log p(c_i | text, c_<i)``.
* ``maskgit`` (Chang et al. 2022): a bidirectional transformer. Per sample ``u ~ U(0, 1)``, the
  mask ratio ``γ(u) = cos(π/2 · u)`` and ``⌈γ·N⌉ ≥ 1`` positions, those with the smallest random
  scores, replaced by ``mask_id``; ``L = −(1/|M|) Σ_{i∈M} log p(c_i | text, c_unmasked)``.

Both are one loss, ``Σ_i w_i · CE(logits_i, c_i)`` per sample, with weights ``1/N`` everywhere
(autoregressive) or ``1/|M|`` on the masked positions (maskgit); every random number is drawn in
:meth:`TokenTask.draw`. The export is a :class:`~destatic.pipelines.tokens.TokenPipeline`: the
tokenizer, the transformer, the text encoder and sampling defaults from ``[sample]`` and
``[tokens]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from destatic.io import CheckpointError
from destatic.models.registry import load_component
from destatic.models.text import MiniLMTextEncoder
from destatic.models.token_transformer import TokenTransformer, TokenTransformerConfig
from destatic.models.vq import VQModel
from destatic.pipelines import save
from destatic.pipelines.tokens import TokenPipeline
from destatic.training.config import Config, ConfigError, require
from destatic.training.data import CaptionBank, draw_captions, load_training_images, pixels
from destatic.training.tasks.base import Batch, Task, evaluating, network_config, register

__all__ = [
    "AutoregressiveTask",
    "MaskGITTask",
    "TokenTask",
    "TokensTrainConfig",
    "mask_positions",
    "tokenize",
]


@dataclass
class TokensTrainConfig:
    """The ``[tokens]`` table, shared by the autoregressive and maskgit tasks."""

    table: ClassVar[str] = "tokens"
    tokenizer: str = ""  # folder of a trained VQModel (required)
    config: dict[str, Any] = field(default_factory=dict)  # TokenTransformerConfig fields
    label_smoothing: float = 0.0
    # the exported model's sampling defaults (guidance comes from [sample] guidance)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def check(self) -> None:
        require(
            0 <= self.label_smoothing < 1,
            f"tokens.label_smoothing = {self.label_smoothing}: use a share in [0, 1)",
        )
        require(self.temperature >= 0, f"tokens.temperature = {self.temperature}: use ≥ 0")
        require(self.top_k >= 0, f"tokens.top_k = {self.top_k}: use ≥ 0 (0 = off)")
        require(0 < self.top_p <= 1, f"tokens.top_p = {self.top_p}: use (0, 1] (1 = off)")
        # the fields given must make a network (the filled ones are valid whatever they become),
        # so a bad [tokens.config] fails when the file is read
        network_config(TokenTransformerConfig, dict(self.config), "tokens.config")


class TokenTask(Task):
    """What the autoregressive and maskgit tasks share: the tokenizer, the code cache, the
    captions, one weighted cross-entropy, the export and the sample grids (module doc)."""

    section = TokensTrainConfig
    causal: ClassVar[bool]
    sampler: ClassVar[str]  # the exported model's decoder (destatic.sampling.tokens)

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.cfg = cfg
        self.tokenizer = _tokenizer(cfg.tokens.tokenizer).to(device).requires_grad_(False)
        side = _grid_size(cfg.data.size, self.tokenizer.downsample_factor)
        self.text_encoder = MiniLMTextEncoder.from_package(max_length=cfg.model.text_max_length)
        filled = {
            "num_codes": self.tokenizer.num_codes,
            "grid_size": side,
            "context_dim": self.text_encoder.dim,
            "context_length": cfg.model.text_max_length,
            "causal": self.causal,
        }
        self.config = network_config(
            TokenTransformerConfig, _filled(cfg.tokens.config, filled), "tokens.config"
        )
        data = load_training_images(cfg.data, progress=progress)
        self.codes = tokenize(self.tokenizer, torch.from_numpy(data.images), progress=progress)
        flat = [c for caps in data.captions for c in caps]
        self.bank = CaptionBank(self.text_encoder, flat, progress=progress)
        self.caption_ids = [self.bank.ids(caps) for caps in data.captions]
        self.trainable = TokenTransformer(self.config)

    @property
    def num_items(self) -> int:
        return len(self.caption_ids)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        ids = [self.caption_ids[int(i)] for i in index]
        captions = draw_captions(ids, generator, self.cfg.data.caption_dropout)
        codes = self.codes[index]
        return {"codes": codes, "caption": captions, **self.corrupt(codes, generator)}

    def corrupt(self, codes: torch.Tensor, generator: torch.Generator) -> Batch:
        """The task's own random part of a batch of codes [n, N] (drawn from ``generator``)."""
        return {}

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes the model reads [b, N] and each position's loss weight [b, N]."""
        codes = batch["codes"]
        return codes, torch.full(codes.shape, 1 / codes.shape[1])

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        inputs, weights = self.inputs(batch)
        context = self.bank.tokens[batch["caption"]].to(device)
        logits = model(inputs.to(device), context).float()  # [b, N, V]
        targets = batch["codes"].to(device)
        ce = F.cross_entropy(
            logits.transpose(1, 2),
            targets,
            reduction="none",
            label_smoothing=self.cfg.tokens.label_smoothing,
        )  # [b, N]
        return (ce * weights.to(device)).sum(dim=1)

    def defaults(self) -> dict[str, Any]:
        """The exported model's sampling defaults."""
        t = self.cfg.tokens
        return {
            "sampler": self.sampler,
            "guidance": self.cfg.sample.guidance,
            "temperature": t.temperature,
            "top_k": t.top_k,
            "top_p": t.top_p,
        }

    def pipeline(self, trainable: nn.Module) -> TokenPipeline:
        return TokenPipeline.from_parts(
            self.tokenizer, trainable, self.text_encoder, self.defaults()
        )

    def export(self, trainable: nn.Module, folder: Path) -> None:
        save(self.pipeline(trainable), folder)

    def sample_grid(self, trainable: nn.Module, cfg: Config) -> tuple[torch.Tensor, list[str]]:
        """The exported pipeline's images of ``sample.prompts`` (its own decoder and defaults;
        ``sample.sampler`` and ``grid`` name diffusion samplers and do not apply)."""
        with evaluating(trainable):
            request = cfg.sample.request(sampler=None, grid=None, steps=None)
            images = self.pipeline(trainable).run(request)
        return images, list(cfg.sample.prompts)


@register
class AutoregressiveTask(TokenTask):
    """Next-token prediction over the codes in raster order (LlamaGen)."""

    name = "autoregressive"
    causal = True
    sampler = "autoregressive"


@register
class MaskGITTask(TokenTask):
    """Masked-token prediction with the cosine mask schedule (MaskGIT)."""

    name = "maskgit"
    causal = False
    sampler = "maskgit"

    def corrupt(self, codes: torch.Tensor, generator: torch.Generator) -> Batch:
        u = torch.rand(len(codes), generator=generator)
        scores = torch.rand(codes.shape, generator=generator)
        return {"mask": mask_positions(u, scores)}

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["mask"]
        inputs = batch["codes"].masked_fill(mask, self.config.num_codes)  # mask_id
        weights = mask.float() / mask.sum(dim=1, keepdim=True)
        return inputs, weights

    def defaults(self) -> dict[str, Any]:
        return {**super().defaults(), "steps": self.cfg.sample.steps}


def mask_positions(u: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """MaskGIT's training mask [n, N] (True = masked): per row, the ``⌈cos(π/2 · u)·N⌉``
    positions (at least one) with the smallest ``scores`` [n, N]."""
    n_pos = scores.shape[1]
    count = torch.ceil(torch.cos(math.pi / 2 * u) * n_pos).long().clamp(1, n_pos)
    rank = scores.argsort(dim=1).argsort(dim=1)  # each position's place in its row's order
    return rank < count[:, None]


@torch.no_grad()
def tokenize(
    tokenizer: VQModel, images: torch.Tensor, *, batch_size: int = 256, progress: bool = True
) -> torch.Tensor:
    """The codes [items, N] (raster order) of uint8 NHWC ``images`` under ``tokenizer`` in eval
    mode."""
    from tqdm.auto import tqdm

    device = next(tokenizer.parameters()).device
    codes = []
    starts = range(0, len(images), batch_size)
    with evaluating(tokenizer):
        for start in tqdm(starts, desc="tokenising images", disable=not progress):
            x = pixels(images[start : start + batch_size]).to(device)
            codes.append(tokenizer.codes_from_images(x).flatten(1).cpu())
    return torch.cat(codes).long()


def _tokenizer(folder: str) -> VQModel:
    """The VQModel in ``folder``; a missing or other folder is a one-line ConfigError."""
    if not folder:
        raise ConfigError(
            "tokens.tokenizer is not set: name the folder of a trained VQModel (the model/ of "
            'a [train] task = "tokenizer" run)'
        )
    try:
        model = load_component(folder)
    except (CheckpointError, OSError, ValueError) as e:
        raise ConfigError(f"tokens.tokenizer = {folder!r}: {e}") from e
    if not isinstance(model, VQModel):
        raise ConfigError(
            f"tokens.tokenizer = {folder!r} holds a {type(model).__name__}, not a VQModel"
        )
    return model


def _grid_size(size: int, factor: int) -> int:
    require(
        size % factor == 0,
        f"data.size = {size} is not a multiple of the tokenizer's downsample factor {factor}",
    )
    return size // factor


def _filled(fields: dict[str, Any], filled: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with ``filled`` added; a field given there with another value is a
    ConfigError."""
    for key, value in filled.items():
        if key in fields and fields[key] != value:
            raise ConfigError(
                f"tokens.config.{key} = {fields[key]!r} conflicts with {value!r} (set from the "
                "tokenizer, data.size, the text encoder, model.text_max_length and the task); "
                "leave it out"
            )
    return {**fields, **filled}
