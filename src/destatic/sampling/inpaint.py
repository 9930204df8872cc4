"""Inpainting with any model and any sampler: the known region as a denoiser wrapper.

Samplers only see a denoiser D(x, σ) → x̂0, so fixing part of the image is a change of
denoiser, not of sampler. Where the mask m is 0 (keep), the estimate is replaced by the known
clean latents x0:

    D'(x, σ) = m·D(x, σ) + (1 − m)·x0.

Started from x = x0 + σ₀·n, a deterministic solver then keeps the kept region on the path
x0 + σ·n exactly (every step moves it along (x − D')/σ = n) and ends it at x0, while the model
sees that region at the right noise level at every step — the blended-latents method of
Avrahami et al. 2022 ("Blended Latent Diffusion"), written in σ-space. It works for any
checkpoint; the boundary is only as coherent as the model makes it (a model trained for
inpainting, with the mask as input, does better).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["KnownRegion"]


class KnownRegion:
    """``KnownRegion(denoiser, known, mask)(x, σ) = mask·denoiser(x, σ) + (1 − mask)·known``.

    ``known`` is the clean state [B, C, H, W] (or broadcastable; a clip [B, C, F, H, W]);
    ``mask`` [B or 1, 1 or C, H, W] (any shape that broadcasts against ``known``: a clip's
    per-frame mask [1, 1, F, 1, 1]) in [0, 1] is 1 where the sampler draws anew and 0 where
    ``known`` is kept.
    """

    def __init__(
        self,
        denoiser: Callable[..., torch.Tensor],
        known: torch.Tensor,
        mask: torch.Tensor,
    ):
        try:
            fits = mask.ndim == known.ndim and bool(torch.broadcast_shapes(mask.shape, known.shape))
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"mask {tuple(mask.shape)} does not match the known state {tuple(known.shape)}"
            )
        if float(mask.min()) < 0 or float(mask.max()) > 1:
            raise ValueError("mask values must lie in [0, 1] (1 = repaint, 0 = keep)")
        self.denoiser = denoiser
        self.known = known
        self.mask = mask.to(known.dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        d = self.denoiser(x, sigma, **cond)
        return self.mask * d + (1 - self.mask) * self.known.to(d.dtype)
