"""Training: an adapter's weights as a module of their own.

:class:`AdapterWeights` is what a training task optimises, averages (EMA) and checkpoints: the
LoRA parameters of one adapter on a network and nothing of the frozen base. :func:`applied`
lets the network compute with another set of them (an EMA copy) for a while. It stands above
both the runtime adapter and the file side, since an :class:`AdapterWeights` saves itself as an
adapter file.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.models.lora.adapter import LoraError, model_prefix, tuner_layers
from destatic.models.lora.files import save_lora


class AdapterWeights(nn.Module):
    """The trainable weights of adapter ``name`` on ``network``, as a module of their own.

    Its parameters *are* the network's LoRA parameters (shared, not copied) and its state dict
    holds only them (``layers.<module path with / for .>.lora_A.weight``), so an optimizer, an
    EMA copy and a checkpoint see the adapter and nothing of the frozen base.
    Calling it calls the network. A copy (``copy.deepcopy``, as an EMA makes) copies the adapter
    weights but shares the network; put a copy's weights into the network with :func:`applied`.
    """

    def __init__(self, network: nn.Module, name: str = "default") -> None:
        super().__init__()
        self.__dict__["network"] = network  # not a submodule: not saved, not copied
        self.name = name
        self.prefix = model_prefix(network)
        self.paths: list[str] = []
        layers = nn.ModuleDict()
        for path, layer in tuner_layers(network):
            if name in layer.lora_A:
                self.paths.append(path)
                pair = {"lora_A": layer.lora_A[name], "lora_B": layer.lora_B[name]}
                pair["dropout"] = layer.lora_dropout[name]  # so train()/eval() reach it
                layers[path.replace(".", "/")] = nn.ModuleDict(pair)
        if not self.paths:
            raise LoraError(f"{type(network).__name__} has no adapter named {name!r}")
        self.layers = layers
        self.config = network.config

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.network(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> AdapterWeights:
        network = self.__dict__["network"]
        memo[id(network)] = network
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights keyed as in a LoRA file (``<prefix>.<module>.lora_A.weight``)."""
        out = {}
        for path in self.paths:
            pair = self.layers[path.replace(".", "/")]
            out[f"{self.prefix}.{path}.lora_A.weight"] = pair["lora_A"].weight.detach()
            out[f"{self.prefix}.{path}.lora_B.weight"] = pair["lora_B"].weight.detach()
        return out

    def save(self, path: str | Path, **info: Any) -> Path:
        """Write these weights as an adapter file (see :func:`save_lora`)."""
        return save_lora(self.network, path, self.name, weights=self.diffusers_state_dict(), **info)


@contextlib.contextmanager
def applied(weights: AdapterWeights) -> Iterator[nn.Module]:
    """Within the block the network computes with ``weights`` (e.g. an EMA copy); the values it
    had are put back exactly afterwards. Yields the network."""
    network, name = weights.network, weights.name
    live = {}
    for path, layer in tuner_layers(network):
        if name in layer.lora_A:
            live[path] = (layer.lora_A[name].weight, layer.lora_B[name].weight)
    saved = {p: (a.detach().clone(), b.detach().clone()) for p, (a, b) in live.items()}
    try:
        with torch.no_grad():
            for path, (a, b) in live.items():
                pair = weights.layers[path.replace(".", "/")]
                a.copy_(pair["lora_A"].weight)
                b.copy_(pair["lora_B"].weight)
        yield network
    finally:
        with torch.no_grad():
            for path, (a, b) in live.items():
                a.copy_(saved[path][0])
                b.copy_(saved[path][1])
