"""Network FLOPs of drawing one image, counted by ``torch.utils.flop_counter`` (matrix
multiplies, convolutions and attention: the operations that cost; elementwise work is not
counted). The unit a diffusion model and a token model can be compared in: a diffusion run costs
steps × (1 or 2 guidance branches) × the denoiser, a token model one pass per code with a KV
cache (or MaskGIT's passes) × the branches; both add the text encoder and the decoder."""

from __future__ import annotations

from typing import Any

__all__ = ["flops_per_image"]


def _count_cpu_attention() -> None:
    """Give torch's CPU flash-attention ops (what SDPA runs on the CPU) the FLOP formulas of
    the GPU ones, which torch has: without them the counter skips attention on the CPU. Causal
    attention is counted at full cost, as torch counts it on the GPU."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    pairs = (
        (aten._scaled_dot_product_flash_attention_for_cpu, fc.sdpa_flop),
        (aten._scaled_dot_product_flash_attention_for_cpu_backward, fc.sdpa_backward_flop),
    )
    for op, formula in pairs:
        if op not in fc.flop_registry:
            fc.register_flop_formula(op, get_raw=True)(formula)


def flops_per_image(pipeline: Any, fields: dict[str, Any], prompt: str, seed: int = 0) -> float:
    """FLOPs of ``pipeline.generate(prompt, **fields)`` for one image (text encoding, every
    network pass and the decode included)."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_attention()
    counter = FlopCounterMode(display=False)
    with counter:
        pipeline.generate([prompt], **fields, seed=[seed])
    return float(counter.get_total_flops())
