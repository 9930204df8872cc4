"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), data-prediction form, B(h) variants bh1 and bh2.

Work in λ = -log σ with step ``h = λ_next - λ`` and ``r = σ_next/σ = e^{-h}``. The first-order
part is the DDIM step ``r·x + (1-r)·D``. UniP-p adds ``-B(h)·Σ_k a_k·D1_k`` with divided
differences ``D1_k = (D_{-k} - D)/r_k``, ``r_k = (λ_{-k} - λ)/h`` and weights a_k solving
``Σ_k a_k r_k^{m-1} = m!·φ_{m+1}(h)/B(h)`` for m = 1 … p-1 (eq. 9; φ are the exponential-integrator
functions, here with -h). UniC corrects the state just computed once the model has been called
there, with one more node (the new x̂0, r = 1), at no extra evaluation. ``B(h) = -h`` (bh1) or
``e^{-h} - 1`` (bh2). Order 2 uses the closed-form weight ½, as the reference code does.

The last ``order`` steps lower the order (``lower_order_final``), and the final state is not
corrected: the number of model calls equals the number of steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from destatic.sampling.base import register, report, sigma_batch
from destatic.sampling.noise import NoiseFn

__all__ = ["uni_pc"]


def _weights(
    h: float, rks: list[float], variant: str
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(e^{-h} - 1, B(h), R, b) for the nodes ``rks`` (the last node is 1)."""
    hh = -h
    h_phi_1 = math.expm1(hh)  # e^{-h} - 1 = r - 1
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k = h_phi_1 / hh - 1  # (at σ_next = 0, h = ∞ and these reach their limits)
    factorial = 1
    rows, b = [], []
    for k in range(1, len(rks) + 1):
        rows.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, np.array(rows), np.array(b)


def _update(x_base, d0, lambdas, history, h, variant, extra=None):
    """``r·x_base + (1-r)·D0 - B(h)·Σ a_k D1_k`` over the ``history`` nodes (+ ``extra``).

    ``lambdas``/``history`` list earlier λ and x̂0, newest first, excluding D0 at λ0 = lambdas[0].
    With ``extra`` (the corrector's new x̂0, at node r = 1) the weights solve the full system.
    """
    lam0 = lambdas[0]
    rks = [(lam - lam0) / h for lam in lambdas[1:]]
    d1s = [(d - d0) / rk for d, rk in zip(history, rks, strict=True)]
    h_phi_1, b_h, R, b = _weights(h, [*rks, 1.0], variant)
    x = math.exp(-h) * x_base - h_phi_1 * d0
    terms = []
    if extra is None:  # predictor: weights for the history nodes only
        if d1s:
            a = [0.5] if len(d1s) == 1 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            terms = list(zip(a, d1s, strict=True))
    else:  # corrector: the new x̂0 is one more node at r = 1
        a = [0.5] if not d1s else np.linalg.solve(R, b).tolist()
        terms = [*zip(a[:-1], d1s, strict=True), (a[-1], extra - d0)]
    for a_k, d1 in terms:
        x = x - (b_h * a_k) * d1
    return x


def uni_pc(
    denoiser,
    x,
    sigmas,
    *,
    noise: NoiseFn | None = None,
    callback=None,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """UniPC-p multistep with corrector (diffusers' ``UniPCMultistepScheduler`` defaults:
    order 2, bh2, data prediction)."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"uni_pc order must be 1, 2 or 3, got {order}")
    sig = sigmas.tolist()
    steps = len(sig) - 1
    lambdas: list[float] = []  # λ of earlier model calls, newest first
    outputs: list[torch.Tensor] = []  # their x̂0, newest first
    x_prev, used_order = None, 0
    for i in range(steps):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma_batch(x, sigma))
        report(callback, i, sigma, sigma_next, x, denoised)
        lam = -math.log(sigma)
        if x_prev is not None:  # UniC: correct the state at σ with the x̂0 just computed there
            h = lam - lambdas[0]
            x = _update(
                x_prev,
                outputs[0],
                lambdas[:used_order],
                outputs[1:used_order],
                h,
                variant,
                extra=denoised,
            )
        lambdas, outputs = [lam, *lambdas][:order], [denoised, *outputs][:order]
        used_order = min(order, steps - i) if lower_order_final else order
        used_order = min(used_order, len(outputs))
        x_prev = x
        h = (-math.log(sigma_next) if sigma_next > 0 else math.inf) - lam
        x = _update(x, outputs[0], lambdas[:used_order], outputs[1:used_order], h, variant)
    return x


register("uni_pc", uni_pc, order=2)
register("uni_pc_bh1", uni_pc, order=2, defaults={"variant": "bh1"})
register("uni_pc_3", uni_pc, order=3, defaults={"order": 3})
