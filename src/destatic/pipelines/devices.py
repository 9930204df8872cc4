"""Where a pipeline runs and in what precision: ``--device`` and ``--dtype`` in words.

``pick_device("auto", "auto")`` is CUDA in half precision (bf16 where the GPU supports it, else
fp16) when CUDA is present; else the CPU, in bf16 where it has bf16 matrix instructions (AMX or
AVX-512-BF16, :func:`cpu_has_bf16`) and in fp32 elsewhere. A pipeline in half precision runs only
its networks in it: the sampler's state and arithmetic stay in fp32
(:attr:`~destatic.pipelines.base.PipelineBase.state_dtype`). Explicit names are checked here, so a
typo or a missing GPU is a one-line error before any model is loaded.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path

import torch

__all__ = [
    "DTYPES",
    "cpu_description",
    "cpu_features",
    "cpu_has_bf16",
    "crowded_cpu_advice",
    "pick_device",
    "pick_dtype",
    "upcast_dtype",
]

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


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    info: dict[str, str] = {}
    path = Path("/proc/cpuinfo")
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (``avx2``, ``avx512_bf16``, ``amx_bf16``, …):
    the ``flags`` of ``/proc/cpuinfo``; elsewhere, the subset torch can detect."""
    if "flags" in _cpuinfo():
        return frozenset(_cpuinfo()["flags"].split())
    probes = {
        "avx2": "_is_avx2_supported",
        "avx512f": "_is_avx512_supported",
        "avx512_bf16": "_is_avx512_bf16_supported",
        "amx_bf16": "_is_amx_tile_supported",
    }
    return frozenset(k for k, f in probes.items() if getattr(torch.cpu, f, lambda: False)())


def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bf16 matrices natively (AMX tiles or AVX-512-BF16), so bf16
    networks run faster than fp32 ones; without them bf16 is emulated and slower."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_features())


def cpu_description() -> str:
    """The CPU model, its thread count and the matrix/vector features that decide speed, for
    benchmark tables, e.g. ``Intel(R) Xeon(R) Processor, 2 threads, amx_bf16 avx512_bf16 …``."""
    name = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    wanted = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")
    flags = " ".join(f for f in wanted if f in cpu_features()) or "no AVX2"
    return f"{name}, {torch.get_num_threads()} threads, {flags}"


def _running_elsewhere(samples: int = 3, interval: float = 0.05) -> int:
    """Threads running on the CPUs now besides the caller's: the fewest of ``samples`` reads of
    ``procs_running`` in ``/proc/stat`` (runnable threads, the caller's included), 0 where there
    is none."""
    path = Path("/proc/stat")
    if not path.exists():
        return 0
    counts = []
    for i in range(samples):
        for line in path.read_text().splitlines():
            if line.startswith("procs_running"):
                counts.append(int(line.split()[1]) - 1)
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, min(counts, default=0))


def crowded_cpu_advice(threads: int | None = None) -> str | None:
    """A one-line warning when ``threads`` torch threads (default: torch's count) and the threads
    of other programs running now need more CPUs than this process may use; None otherwise.

    torch's CPU kernels end each parallel region at a barrier, so one descheduled thread stalls
    all the others: beside a single busy process, a 2-thread training step on 2 vCPUs ran 5.2×
    slower (compiled bf16: 0.67 → 3.45 s) and 4.1× slower in eager fp32, where sharing fairly
    would cost 1.5× (BENCHMARKS.md, "Training beside other work")."""
    threads = threads or torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = _running_elsewhere()
    if not cpus or threads + busy <= cpus:
        return None
    fit = max(1, cpus - busy)
    return (
        f"other programs keep {busy} of this machine's {cpus} CPUs busy: {threads} torch threads "
        f"will stall each other (several times slower); stop them or set train.threads = {fit}"
    )


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
    supported; bf16 on a CPU with bf16 matrix units (:func:`cpu_has_bf16`); fp32 elsewhere)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32
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
