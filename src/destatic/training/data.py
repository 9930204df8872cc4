"""What the training loop reads: the configured dataset's images (or cached latents) and cached
caption embeddings.

The text encoder is frozen, so every distinct caption is encoded once before training
(:class:`CaptionBank`), and the empty prompt's embedding serves as the unconditional one for
condition dropout. With an autoencoder, the images are encoded once too (:class:`LatentCache`):
the posterior mean and standard deviation of every image are kept, on disk under
``$DESTATIC_CACHE/latents`` and in memory, and each step draws ``z = μ + s·ε`` from them.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from destatic.data.base import cache_root
from destatic.data.select import CaptionedSplit, load_split
from destatic.models.autoencoder import AutoencoderKL
from destatic.models.text import TextEncoder
from destatic.training.config import ConfigError, DataConfig

__all__ = [
    "CaptionBank",
    "LatentCache",
    "draw_captions",
    "hash_module",
    "load_training_images",
    "pixels",
]


def load_training_images(
    cfg: DataConfig, progress: bool = True, split: str = "train"
) -> CaptionedSplit:
    """The ``split`` ("train" or "heldout") of the configured dataset at ``cfg.size``."""
    images = load_split(
        cfg.dataset,
        cfg.size,
        split,
        path=cfg.path,
        alt_captions=cfg.alt_captions,
        progress=progress,
    )
    if len(images) == 0 and split == "train" and cfg.dataset == "folder":
        raise ConfigError(f"data.path = {cfg.path!r} holds no captioned training images")
    return images


def pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def draw_captions(
    ids: list[torch.Tensor], generator: torch.Generator, dropout: float
) -> torch.Tensor:
    """One caption per sample, drawn uniformly from its ``ids`` (a row's :class:`CaptionBank`
    indices: its main and alternative captions), then replaced by ``""`` (index 0) with
    probability ``dropout`` — the unconditional branch classifier-free guidance needs."""
    n = len(ids)
    choice = torch.rand(n, generator=generator)
    captions = torch.stack([i[int(c * len(i))] for i, c in zip(ids, choice, strict=True)])
    drop = torch.rand(n, generator=generator) < dropout
    return torch.where(drop, torch.zeros_like(captions), captions)


class CaptionBank:
    """Every distinct caption encoded once: ``tokens[i]``, ``pooled[i]`` and the tokens'
    padding ``mask[i]`` (True for real tokens); index 0 is ``""``.

    The embeddings are cached under ``$DESTATIC_CACHE/text`` keyed by the encoder's weights,
    its ``max_length`` and the captions, so a resumed or repeated run skips the encoding.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        captions: list[str],
        *,
        batch_size: int = 128,
        cache_dir: Path | None = None,
        progress: bool = True,
    ):
        names = ["", *dict.fromkeys(c for c in captions if c != "")]
        self.index = {c: i for i, c in enumerate(names)}
        h = hashlib.sha1(f"{type(encoder).__name__}:{encoder.max_length}".encode())
        hash_module(h, encoder)
        h.update("\n".join(names).encode())
        path = (cache_dir or cache_root() / "text") / f"{h.hexdigest()[:20]}.safetensors"
        stored = _read_cache(path)
        if stored is not None and "mask" in stored:  # caches of earlier versions lack the mask
            self.tokens, self.pooled = stored["tokens"], stored["pooled"]
            self.mask = stored["mask"].bool()
            return
        from tqdm.auto import tqdm

        tokens, pooled, mask = [], [], []
        starts = range(0, len(names), batch_size)
        for start in tqdm(starts, desc="encoding captions", disable=not progress):
            emb = encoder.encode(names[start : start + batch_size])
            tokens.append(emb.tokens.float().cpu())
            pooled.append(emb.pooled.float().cpu())
            mask.append(emb.mask.cpu())
        self.tokens = torch.cat(tokens)  # [K, T, D]
        self.pooled = torch.cat(pooled)  # [K, P]
        self.mask = torch.cat(mask).bool()  # [K, T]
        cached = {"tokens": self.tokens, "pooled": self.pooled, "mask": self.mask.to(torch.uint8)}
        _write_cache(path, cached)

    def __len__(self) -> int:
        return len(self.index)

    def ids(self, captions: list[str]) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in captions])


def hash_module(h: Any, module: torch.nn.Module) -> None:
    """Feed every tensor of ``module``'s state (names and values) into the hash ``h``."""
    for name, v in module.state_dict().items():
        h.update(name.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())


def _read_cache(path: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception:  # a damaged cache is rebuilt, never trusted
        path.unlink(missing_ok=True)
        return None


def _write_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.stem}-{os.getpid()}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError as e:  # a cache that cannot be written only costs time
        warnings.warn(f"could not cache {path.name} ({e.strerror or e})", stacklevel=2)


class LatentCache:
    """Posterior mean and std of every training image under ``autoencoder`` (scaled latents)."""

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        images: np.ndarray,
        *,
        batch_size: int = 64,
        cache_dir: Path | None = None,
        progress: bool = True,
    ):
        h = hashlib.sha1(autoencoder.config.to_json().encode())
        hash_module(h, autoencoder)
        h.update(np.ascontiguousarray(images).tobytes())
        path = (cache_dir or cache_root() / "latents") / f"{h.hexdigest()[:20]}.safetensors"
        stored = _read_cache(path)
        if stored is not None:
            self.mean, self.std = stored["mean"], stored["std"]
            return
        means, stds = [], []
        device = next(autoencoder.parameters()).device
        from tqdm.auto import tqdm

        starts = range(0, len(images), batch_size)
        with torch.no_grad():
            for start in tqdm(starts, desc="encoding latents", disable=not progress):
                x = pixels(images[start : start + batch_size]).to(device)
                post = autoencoder.encode(x)
                cfg = autoencoder.config
                shift = cfg.shift_factor or 0.0
                means.append(((post.mean - shift) * cfg.scaling_factor).float().cpu())
                stds.append((post.std * cfg.scaling_factor).float().cpu())
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        _write_cache(path, {"mean": self.mean, "std": self.std})

    def draw(self, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``μ + s·ε`` for the images at ``index`` with standard normal ``noise``."""
        return self.mean[index] + self.std[index] * noise
