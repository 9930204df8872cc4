"""How closely generated images follow a structural control: the F1 score of their Canny edges
against the control's edge maps, with a tolerance of one pixel (as edge benchmarks such as BSDS
match boundaries within a small distance).

An edge pixel of one map counts as matched when the other map has an edge within its 3×3
neighbourhood; precision is the matched share of the generated edges, recall that of the control
edges, F1 = 2PR/(P+R), averaged over images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from destatic.data.edges import canny_edges

__all__ = ["edge_f1"]


def edge_f1(images: torch.Tensor, edges: np.ndarray, sigma: float = 1.0) -> float:
    """Mean edge F1 of ``images`` (float [N, 3, H, W] in [0, 1]) against ``edges`` (uint8 maps
    [N, H, W, 3], white edges on black, as :func:`~destatic.data.edges.canny_edges` makes)."""
    if images.ndim != 4 or edges.ndim != 4 or images.shape[0] != edges.shape[0]:
        raise ValueError(
            f"need [N, 3, H, W] images and [N, H, W, 3] edge maps, got {tuple(images.shape)} "
            f"and {tuple(edges.shape)}"
        )
    pixels = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1) * 255).round()
    ours = canny_edges(pixels.byte().cpu().numpy(), sigma=sigma)
    a = torch.from_numpy(ours[..., 0] > 0).float()[:, None]
    b = torch.from_numpy(edges[..., 0] > 0).float()[:, None]
    near_a, near_b = F.max_pool2d(a, 3, 1, 1), F.max_pool2d(b, 3, 1, 1)
    precision = (a * near_b).sum((1, 2, 3)) / a.sum((1, 2, 3)).clamp(min=1)
    recall = (b * near_a).sum((1, 2, 3)) / b.sum((1, 2, 3)).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-9)
    return float(f1.mean())
