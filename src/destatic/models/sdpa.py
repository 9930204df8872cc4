"""The attention kernel every destatic network calls: ``softmax(QKᵀ/√d + mask) V`` (Vaswani et
al. 2017, "Attention Is All You Need") by torch's fused ``scaled_dot_product_attention``.

One exception to plain dispatch: on the CPU, with gradients on and half-precision inputs (a
bf16-autocast training step), the kernel runs in fp32. ATen's bf16 flash-attention backward on
the CPU is about 5× slower than its fp32 one (the bundled U-Net at batch 64: 1.27 s against
0.25 s over three steps), while the two forwards cost the same; with it in fp32 the autocast
step trains at 84 samples/s instead of 59 (fp32 throughout: 47; ``benchmarks/cpu_precision.py``).
Inside ``torch.compile`` (``[train] compile = true``) the same step instead spells attention out
in bf16: ``QKᵀ`` and ``·V`` as AMX matmuls, the scaled softmax computed in fp32 registers by
inductor's fused kernel and stored in bf16. What it saves is memory traffic: the attention
matrices, the largest tensors of the step, are read and written in bf16. The compiled bf16 step
of the bundled U-Net trains at 107 samples/s instead of 100 (``benchmarks/training.py
--compile``, batch 64); with the logits kept in fp32 it was slower than either (an exploration
run, BENCHMARKS.md). The price: the 400-step loss curve sits 1% above fp32's from step 200
(BENCHMARKS.md, "Training: bf16 autocast, fp32 attention and layer norms, compiled block by
block"). Eager, the spelled-out form is slower (0.893 s against 0.825), so eager keeps the fp32
kernel. Inference (no gradients) and fp32 inputs take torch's kernel unchanged, so fp32 outputs
stay bit-exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["scaled_dot_product_attention"]


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kwargs)``, in fp32 for a half-precision
    training step on the CPU (see the module doc); the result has ``q``'s dtype."""
    half = q.dtype in (torch.bfloat16, torch.float16)
    if half and q.device.type == "cpu" and torch.is_grad_enabled():
        if not kwargs and torch.compiler.is_compiling():
            weights = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
            return weights.to(q.dtype) @ v
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
