"""How well a VQ tokenizer (:class:`~destatic.models.vq.VQModel`) codes a set of images.

* reconstruction RMSE and PSNR on the [0, 1] scale over all pixel values,
  ``PSNR = 10·log10(1 / MSE) = −20·log10(RMSE)`` dB;
* codebook usage: the fraction of the K codes that occur in the images' token grids;
* code perplexity ``exp(H(p)) = exp(−Σ_k p_k log p_k)`` of the codes' frequencies p: the number
  of equally used codes with the same entropy (K at best, 1 when one code does everything).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from destatic.models.vq import VQModel

__all__ = ["round_trip", "tokenizer_report"]


def _as_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] or float [N, C, H, W] in [0, 1] → float [N, C, H, W] in [0, 1]."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float() / 255.0
    if not x.is_floating_point() or x.ndim != 4:
        raise ValueError(
            f"images must be uint8 [N, H, W, C] or float [N, C, H, W] in [0, 1], got {x.dtype} "
            f"of shape {tuple(x.shape)}"
        )
    return x.float()


@torch.no_grad()
def round_trip(
    vq: VQModel, images: np.ndarray | torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reconstructions float [N, C, H, W] in [0, 1], the codes [N, h, w]) of ``images``
    (as :func:`tokenizer_report` takes them) encoded, quantised and decoded by ``vq``, on the
    CPU: the best any model drawing ``vq``'s codes can do."""
    x = _as_unit(images)
    device, dtype = next(vq.parameters()).device, next(vq.parameters()).dtype
    recons, codes = [], []
    for part in x.split(batch_size):
        z_q, c = vq.quantize_latents(vq.encode((part * 2 - 1).to(device, dtype)))
        recons.append((vq.decode_latents(z_q).float().cpu() / 2 + 0.5).clamp(0, 1))
        codes.append(c.cpu())
    return torch.cat(recons), torch.cat(codes)


def tokenizer_report(
    vq: VQModel, images: np.ndarray | torch.Tensor, batch_size: int = 64
) -> dict[str, float]:
    """``{"psnr", "rmse", "codebook_usage", "perplexity"}`` of ``vq`` on ``images`` (uint8 NHWC
    as datasets store them, or float NCHW in [0, 1] as pipelines return them)."""
    x = _as_unit(images)
    if len(x) == 0:
        raise ValueError("tokenizer_report needs at least one image")
    recon, codes = round_trip(vq, x, batch_size)
    squared = float((recon - x).double().pow(2).sum())
    counts = torch.bincount(codes.flatten(), minlength=vq.num_codes).double()
    rmse = math.sqrt(squared / x.numel())
    p = counts / counts.sum()
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    return {
        "psnr": -20.0 * math.log10(rmse) if rmse > 0 else math.inf,
        "rmse": rmse,
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": math.exp(entropy),
    }
