"""Where a pipeline runs and in what precision: ``--device`` and ``--dtype`` in words.

``pick_device("auto", "auto")`` is CUDA in half precision (bf16 where the GPU supports it, else
fp16) when CUDA is present, else the CPU in fp32. Explicit names are checked here, so a typo or
a missing GPU is a one-line error before any model is loaded.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "pick_device", "pick_dtype", "upcast_dtype"]

#: The precisions by name (``--dtype``).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine; use cpu")
    return device


def pick_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype ``name`` means on ``device`` (``auto``: half precision on CUDA, bf16 where
    supported; fp32 elsewhere)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name.lower() not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name.lower()]


def pick_device(
    device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for the names of ``--device`` and ``--dtype`` (see the module doc)."""
    where = device if isinstance(device, torch.device) else _device(str(device))
    return where, pick_dtype(dtype, where)


def upcast_dtype(config, dtype: torch.dtype | None) -> torch.dtype | None:
    """The autoencoder's dtype for a pipeline in ``dtype``: fp32 for fp16 when its config
    says ``force_upcast`` (SD's and SDXL's VAEs overflow fp16, as diffusers also upcasts),
    else ``dtype``."""
    if dtype == torch.float16 and getattr(config, "force_upcast", False):
        return torch.float32
    return dtype
