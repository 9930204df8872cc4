"""A ControlNet for Flux (diffusers' ``FluxControlNetModel``: InstantX, Shakker-Labs Union).

The ControlNet is a shallower copy of the Flux transformer (Zhang et al. 2023, ControlNet, on a
DiT): the same embedders and ``num_layers`` double-stream then ``num_single_layers``
single-stream blocks, whose input image tokens are the packed noisy latents plus the packed
latents of the control image through a zero-initialised linear layer,

    x₀ = W_x·pack(x) + W_c·pack(VAE(control)),

and whose outputs are, after each block, its image tokens through a zero-initialised linear
layer, times ``scale``. The Flux transformer adds them to its own image tokens after its
blocks (:func:`destatic.models.flux.run_blocks`): residual ``i`` serves ⌈blocks / residuals⌉
consecutive blocks. A union ControlNet (``num_mode``) prepends a learned embedding of the
control's mode (canny, depth, …) to the text tokens.

The attribute names are diffusers', so its checkpoints load with ``load_state_dict(strict=True)``;
``forward`` takes the timestep as t·1000, as :class:`~destatic.models.flux.Flux` does.
:class:`ControlledFlux` is a Flux steered by ControlNets, the same call as the Flux, as
diffusers' ``FluxControlNetPipeline`` runs them at each step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from destatic.models.flux import (
    PACK,
    FluxConfig,
    build_trunk,
    check_latent_size,
    embed_conditioning,
    pack_latents,
    run_blocks,
)

__all__ = ["ControlledFlux", "FluxControlNet", "FluxControlNetConfig"]


@dataclass
class FluxControlNetConfig(FluxConfig):
    """diffusers' ``FluxControlNetModel`` config: a Flux config (its depths are the
    ControlNet's own) and ``num_mode``, the control modes of a union ControlNet (None: one)."""

    num_mode: int | None = None
    conditioning_embedding_channels: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.conditioning_embedding_channels is not None:
            raise ValueError(
                "conditioning_embedding_channels (a ControlNet on pixels through "
                "input_hint_block) is not supported; use one on VAE latents"
            )
        if self.num_mode is not None and (type(self.num_mode) is not int or self.num_mode < 1):
            raise ValueError(f"num_mode must be a positive integer or null, got {self.num_mode!r}")


class FluxControlNet(nn.Module):
    """Flux's ControlNet: (noisy latents, control latents, …) → the residuals of the
    transformer's double and single blocks."""

    def __init__(self, config: FluxControlNetConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = cfg = config if config is not None else FluxControlNetConfig(**kwargs)
        cfg.validate()
        d = cfg.hidden_size
        build_trunk(self, cfg)
        self.controlnet_blocks = nn.ModuleList([nn.Linear(d, d) for _ in range(cfg.num_layers)])
        self.controlnet_single_blocks = nn.ModuleList(
            [nn.Linear(d, d) for _ in range(cfg.num_single_layers)]
        )
        if cfg.num_mode is not None:
            self.controlnet_mode_embedder = nn.Embedding(cfg.num_mode, d)
        self.controlnet_x_embedder = nn.Linear(cfg.in_channels, d)
        for layer in (*self.controlnet_blocks, *self.controlnet_single_blocks):
            nn.init.zeros_(layer.weight)  # a fresh ControlNet changes nothing
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.controlnet_x_embedder.weight)
        nn.init.zeros_(self.controlnet_x_embedder.bias)

    def forward(
        self,
        x: torch.Tensor,
        control: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
        mode: torch.Tensor | int | None = None,
        scale: float = 1.0,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """x and control (B, C, H, W): the noisy latents and the control image's latents (VAE
        scaling and shift applied); timestep (B,) = t·1000; context, pooled, guidance as for
        :class:`~destatic.models.flux.Flux`; mode (B,) or an int: a union ControlNet's control
        mode. Returns the residuals of the double and of the single blocks, each (B, N, D),
        times ``scale``."""
        height, width = check_latent_size(x)
        if tuple(control.shape) != tuple(x.shape):
            raise ValueError(
                f"control latents {tuple(control.shape)} must match the latents {tuple(x.shape)}"
            )
        tokens = self.x_embedder(pack_latents(x)) + self.controlnet_x_embedder(
            pack_latents(control.to(x.dtype))
        )
        prefix = self._mode_embedding(mode, x.shape[0], x.device)
        grid = (height // PACK, width // PACK)
        ctx, c, rotary = embed_conditioning(
            self, tokens, grid, timestep, context, pooled, guidance, prefix
        )
        _, double, single = run_blocks(self, tokens, ctx, c, rotary)
        double = [layer(h) * scale for layer, h in zip(self.controlnet_blocks, double, strict=True)]
        single = [
            layer(h) * scale for layer, h in zip(self.controlnet_single_blocks, single, strict=True)
        ]
        return double, single

    def _mode_embedding(
        self, mode: torch.Tensor | int | None, batch: int, device: torch.device
    ) -> torch.Tensor | None:
        """A union ControlNet's mode as one more text token (B, 1, D); None for the others."""
        if self.config.num_mode is None:
            if mode is not None:
                raise ValueError("this Flux ControlNet has no control modes (num_mode is null)")
            return None
        if mode is None:
            raise ValueError(
                f"this union Flux ControlNet needs a control mode (0 … {self.config.num_mode - 1})"
            )
        mode = torch.as_tensor(mode, device=device, dtype=torch.long).reshape(-1).expand(batch)
        if not ((0 <= mode) & (mode < self.config.num_mode)).all():
            raise ValueError(f"control mode must be in 0 … {self.config.num_mode - 1}")
        return self.controlnet_mode_embedder(mode)[:, None]  # (B, 1, D)


#: One ControlNet's part in :class:`ControlledFlux`: the network, the control image's latents
#: (1 or B, C, H, W), its scale and its window (``active(timestep) -> bool``; None: always).
FluxControl = tuple[FluxControlNet, torch.Tensor, float, Callable[[Any], bool] | None]


class ControlledFlux(nn.Module):
    """A Flux steered by ControlNets: the same call as the Flux, ``(x, timestep, context,
    pooled, guidance)``.

    Each ControlNet sees the noisy latents, its control latents (repeated over the batch, e.g.
    both halves of a classifier-free-guidance batch), the same text and timestep, and a
    guidance scale if it embeds one (``guidance_embeds``): the Flux's own ``guidance`` input,
    else ``control_guidance`` (diffusers' ``guidance_scale``, which a guidance-embedding
    ControlNet takes even beside schnell). Outside its window a ControlNet is skipped (diffusers
    runs it at scale 0: the same zero residual). The residuals of several add up, as in
    diffusers' ``FluxMultiControlNetModel``."""

    takes_pooled = True
    latent_patch = PACK

    def __init__(self, flux: nn.Module, controls: list[FluxControl], control_guidance: float):
        super().__init__()
        self.flux = flux
        self.config = flux.config
        self.controlnets = nn.ModuleList(c[0] for c in controls)
        self.controls = [(latents, scale, active) for _, latents, scale, active in controls]
        self.control_guidance = control_guidance

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        total: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        for net, (latents, scale, active) in zip(self.controlnets, self.controls, strict=True):
            if active is not None and not active(timestep):
                continue
            reps = x.shape[0] // latents.shape[0]
            if reps * latents.shape[0] != x.shape[0]:
                raise ValueError(
                    f"control image batch {latents.shape[0]} does not divide the batch {x.shape[0]}"
                )
            control = latents.to(x.device, x.dtype).repeat(reps, 1, 1, 1)
            w = None
            if net.config.guidance_embeds:
                w = self.control_guidance if guidance is None else guidance
            double, single = net(x, control, timestep, context, pooled, w, scale=scale)
            if total is not None:
                double = [a + b for a, b in zip(total[0], double, strict=True)]
                single = [a + b for a, b in zip(total[1], single, strict=True)]
            total = (double, single)
        return self.flux(x, timestep, context, pooled, guidance, controls=total)
