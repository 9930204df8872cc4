"""Opt-in inference speed-ups for the denoisers, each exact up to float rounding.

Nothing here runs unless asked: a model as built or loaded computes exactly what diffusers'
does (bit-identical in eager fp32). The levers, measured in ``benchmarks/models.py``:

- :func:`fuse_projections` — one ``Linear`` for the queries, keys and values of each attention
  (keys and values only for cross-attention). Reversible with :func:`unfuse_projections`, which
  restores diffusers' state-dict keys for saving.
- ``torch.compile`` with inductor, optionally with ``freezing`` (weights become constants:
  folded, and pre-packed for oneDNN on CPU). A frozen model must not be trained or have its
  weights changed afterwards: the compiled graph keeps the weights it saw.
- ``channels_last`` memory format for the convolutions of the U-Net / autoencoder.

:func:`optimize` bundles the first three. For training, :func:`compile_blocks` compiles a network
block by block (``[train] compile = true``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "blocks",
    "compile_blocks",
    "compiled_gradient_errors",
    "fuse_projections",
    "layers",
    "optimize",
    "preferred_layout",
    "set_layout",
    "uncompile_blocks",
    "unfuse_projections",
]


def preferred_layout(device: torch.device, dtype: torch.dtype) -> torch.memory_format:
    """The convolution weight layout that is fastest for ``dtype`` on ``device``: channels_last
    for bf16 on the CPU (oneDNN's native bf16 layout: the bundled U-Net's convolutions take 45 ms
    instead of 74 at batch 16, ``benchmarks/cpu_precision.py``), the usual contiguous layout
    elsewhere, so fp32 stays bit-exact."""
    cpu_bf16 = device.type == "cpu" and dtype == torch.bfloat16
    return torch.channels_last if cpu_bf16 else torch.contiguous_format


def set_layout(model: nn.Module, layout: torch.memory_format) -> nn.Module:
    """Put ``model``'s 4-D weights in ``layout`` (in place). Models with 5-D weights (video
    convolutions) are left as they are: channels_last is a 4-D layout."""
    if any(p.dim() > 4 for p in model.parameters()):
        return model
    return model.to(memory_format=layout)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The items of the outermost module lists named ``*blocks`` and the outermost modules named
    ``*_block`` (a U-Net's down, mid and up blocks, a transformer's blocks, wherever a wrapper
    such as peft puts them): the units that FSDP gathers one at a time and that
    :func:`compile_blocks` compiles."""
    found: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if isinstance(module, nn.ModuleList) and name.endswith("blocks"):
            found.extend(module)
            taken.append(name)
        elif name.endswith("_block"):
            found.append(module)
            taken.append(name)
    return found


def layers(model: nn.Module) -> list[nn.Module]:
    """One level finer than :func:`blocks`: the items of each block's own module lists (a U-Net
    block's resnets, attentions, down- and upsamplers); a block without module lists is itself
    one."""
    found: list[nn.Module] = []
    for block in blocks(model):
        lists = [m for m in block.children() if isinstance(m, nn.ModuleList)]
        found.extend([item for items in lists for item in items] if lists else [block])
    return found


def compile_blocks(model: nn.Module, *, finer: bool = False) -> nn.Module:
    """``torch.compile`` each of :func:`blocks` (``finer``: each of :func:`layers`) in place
    (regional compilation; weights and state-dict keys unchanged), with static shapes.

    Why not the whole network as one graph: under bf16 autocast on the CPU (torch 2.13,
    inductor), the bundled U-Net compiled whole gets zero gradients for 280 of its 326
    parameters — everything behind its first cross-attention block — while the ``aot_eager``
    backend and the same blocks compiled one by one match eager's gradients. Block by block also
    compiles in half the time (52 s against 110 for the bundled U-Net on 2 CPU threads), and the
    identical layers of a deep transformer share one compiled graph."""
    units = (layers if finer else blocks)(model) or [model]  # no blocks: compiled whole
    # units of one class share their forward's code, compiled once per input shape: dynamo's
    # default limit of 8 graphs a code object left 6 of the 64² U-Net's 14 resnets eager
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 2 * len(units))
    for unit in units:
        unit.compile(dynamic=False)
    return model


def uncompile_blocks(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_blocks` (in place): every module runs eagerly again."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None  # what nn.Module.compile set
    return model


def compiled_gradient_errors(
    model: nn.Module, loss: Callable[[], torch.Tensor], tolerance: float = 0.5
) -> list[str]:
    """The parameters of ``model`` whose gradient of ``loss()`` through its compiled modules is
    off the eager gradient by more than ``tolerance`` (relative; a missing or zero gradient is
    off by 1), eager meaning ``torch.compiler.set_stance("force_eager")``. The gradients are
    left cleared and torch's random state as it was.

    Why: inductor on the CPU (torch 2.13) has given whole parts of a U-Net zero gradients under
    bf16 autocast — compiled as one graph, and for the 64² candidate (configs/emoji64.toml) even
    block by block: 320 of its 366 parameters, every block below the first down block's
    resnets, never moved in 1,400 steps. Compiled a level finer (:func:`layers`) its gradients
    are right. The trainer checks a step with this and falls back: blocks, then layers, then
    eager."""

    def gradients() -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        loss().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    rng = torch.get_rng_state()
    with torch.compiler.set_stance("force_eager"):
        eager = {n: g if g is None else g.detach().float().clone() for n, g in gradients().items()}
    compiled = gradients()
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    wrong = []
    for name, reference in eager.items():
        scale = 0.0 if reference is None else float(reference.norm())
        if scale == 0.0:
            continue
        got = compiled[name]
        off = 1.0 if got is None else float((got.float() - reference).norm()) / scale
        if off > tolerance:
            wrong.append(name)
    return wrong


def _fusable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if callable(getattr(m, "fuse_projections", None))]


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse the q/k/v projections of every attention module in ``model`` (in place).

    The state dict then holds ``to_qkv`` / ``to_kv`` / ``to_added_qkv`` weights instead of
    diffusers' ``to_q``, ``to_k``, ``to_v`` (and ``add_*_proj``); :func:`unfuse_projections`
    restores the original keys, in their original order. Returns ``model``.
    """
    for m in _fusable(model):
        if m is not model:
            m.fuse_projections()
    return model


def unfuse_projections(model: nn.Module) -> nn.Module:
    """Split fused projections back into diffusers' layers (in place); returns ``model``."""
    for m in _fusable(model):
        if m is not model:
            m.unfuse_projections()
    return model


def optimize(
    model: nn.Module,
    *,
    fuse: bool = True,
    channels_last: bool = False,
    compile: bool = False,
    freeze: bool = False,
    mode: str | None = None,
    dynamic: bool | None = False,
) -> nn.Module:
    """Return ``model`` set up for fast inference; the result computes the same function.

    fuse: fuse attention projections (:func:`fuse_projections`; in place, reversible).
    channels_last: move 4-D weights to ``torch.channels_last`` (in place). Inputs may stay
        contiguous; the convolutions convert them.
    compile: wrap the model in ``torch.compile`` (inductor). The returned module is the
        compiled wrapper; ``model`` itself is left uncompiled and still usable.
    freeze: with ``compile``, let inductor treat the weights as constants (constant folding,
        oneDNN weight pre-packing on CPU). Inference only: call the result under
        ``torch.no_grad()`` (freezing does nothing with autograd on), and do not change the
        weights afterwards — the compiled graph would keep the old ones.
    mode: ``torch.compile`` mode, e.g. ``"max-autotune-no-cudagraphs"``.
    dynamic: passed to ``torch.compile`` (False: specialise on input shapes; a new batch size
        recompiles once).

    Outputs differ from the plain model only by float rounding (about 1e-6 relative in fp32;
    ``tests/test_model_speedups.py``). Measured effect on CPU: BENCHMARKS.md, "Models against
    diffusers".
    """
    if freeze and not compile:
        raise ValueError("freeze=True needs compile=True (freezing is an inductor pass)")
    if fuse:
        fuse_projections(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if not compile:
        return model
    options: dict[str, Any] = {"freezing": True} if freeze else {}
    return torch.compile(model, mode=mode, dynamic=dynamic, options=options or None)
