"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models"): structural conditioning (edges, depth, pose, …) for a frozen U-Net.

A trainable copy of the U-Net's encoder — ``conv_in``, the time embedding, the down blocks and
the mid block — reads the noisy input plus an embedding of the control image, and hands one
residual per skip connection (and one for the mid block) to the frozen U-Net through zero-
initialised 1×1 convolutions:

    skip_i ← skip_i + s·Z_i(c_i),   mid ← mid + s·Z_mid(c_mid),

so a fresh ControlNet changes nothing and training starts from the U-Net's own behaviour. The
control image enters through a small conv net (``controlnet_cond_embedding``) whose stride-2
convolutions bring it to the latent resolution: one fewer than the number of
``conditioning_embedding_out_channels`` entries (SD: four entries, 512 px → 64 latents; a
pixel-space model: one entry, no downsampling).

SDXL's ControlNets (``addition_embed_type="text_time"``) copy the U-Net's micro-conditioning
too: the same ``add_embedding`` MLP of the pooled text vector and the size/crop ``time_ids`` is
added to the time embedding (:meth:`UNet2DCondition.micro_embedding`), so they take the
U-Net's ``added_cond`` (diffusers' ``added_cond_kwargs``) beside the text tokens.

Module and config names are diffusers' ``ControlNetModel``'s, so its checkpoints load with
``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.models.config import check_positive
from destatic.models.layers import TimestepEmbedding, timestep_embedding
from destatic.models.unet import (
    _UNSUPPORTED_DEFAULTS,
    DownBlock,
    MidBlock,
    UNet2DCondition,
    UNetConfig,
)

__all__ = ["ControlNet", "ControlNetConfig", "ControlResiduals", "ControlledUNet"]


@dataclass
class ControlNetConfig(UNetConfig):
    """The U-Net's encoder fields plus the control image's: its channels and the widths of its
    embedding net. ``up_block_types``/``out_channels`` are unused (mirrored for validation)."""

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self) -> None:
        self.conditioning_embedding_out_channels = tuple(self.conditioning_embedding_out_channels)
        mirrored = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
        if len(tuple(self.up_block_types)) != len(tuple(self.down_block_types)):
            self.up_block_types = tuple(mirrored.get(b, b) for b in self.down_block_types)[::-1]
        super().__post_init__()
        if self.class_embed_type is not None or isinstance(self.cross_attention_dim, tuple):
            raise ValueError(
                "a ControlNet takes no class embedding and one cross_attention_dim (not AudioLDM's)"
            )
        if not self.conditioning_embedding_out_channels:
            raise ValueError("conditioning_embedding_out_channels needs at least one entry")

    def validate(self) -> None:
        """The U-Net's checks and the control image's: positive channel counts."""
        super().validate()
        check_positive(
            conditioning_channels=self.conditioning_channels,
            conditioning_embedding_out_channels=self.conditioning_embedding_out_channels,
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **fields: Any) -> ControlNetConfig:
        """The config of a ControlNet for ``unet`` (its encoder fields), with ``fields``."""
        base = {k: v for k, v in unet.to_dict().items()}
        return cls(**{**base, **fields})

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> ControlNetConfig:
        """Read a diffusers ``ControlNetModel`` config.json dict."""
        cfg = dict(cfg)
        order = cfg.pop("controlnet_conditioning_channel_order", "rgb")
        if order != "rgb":
            raise ValueError(f"unsupported controlnet_conditioning_channel_order {order!r}")
        known, private = cls._read_diffusers(cfg, _CONTROLNET_DEFAULTS, "ControlNet")
        config = cls(**known, extra=private)
        config.validate()
        return config


# the U-Net's accepted diffusers options, and the ControlNet's own
_CONTROLNET_DEFAULTS: dict[str, tuple[Any, ...]] = {
    **_UNSUPPORTED_DEFAULTS,
    "global_pool_conditions": (False,),
}


class ConditioningEmbedding(nn.Module):
    """Control image → the width of ``conv_in``'s output at the latent resolution: conv + SiLU,
    then per level a 3×3 conv and a stride-2 3×3 conv (each + SiLU), then a zero-initialised
    3×3 conv."""

    def __init__(self, in_channels: int, widths: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in itertools.pairwise(widths):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(x))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


@dataclass
class ControlResiduals:
    down: list[torch.Tensor]  # one per U-Net skip connection, in order
    mid: torch.Tensor


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(nn.Module):
    """``forward(x, timestep, context, control, scale=1) -> ControlResiduals``."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        n = len(ch)
        layers = cfg.per_block("layers_per_block")
        heads = cfg.per_block("attention_head_dim")
        depth = cfg.per_block("transformer_layers_per_block")
        temb_ch = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)
        if cfg.addition_embed_type == "text_time":  # SDXL micro-conditioning, as the U-Net's
            self.add_embedding = TimestepEmbedding(
                cfg.projection_class_embeddings_input_dim, temb_ch
            )
        self.controlnet_cond_embedding = ConditioningEmbedding(
            cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, ch[0]
        )
        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([_zero_conv(ch[0])])
        for i, kind in enumerate(cfg.down_block_types):
            last = i == n - 1
            self.down_blocks.append(
                DownBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    temb_ch,
                    layers[i],
                    kind == "CrossAttnDownBlock2D",
                    add_downsample=not last,
                    cfg=cfg,
                    heads=heads[i],
                    depth=depth[i],
                )
            )
            skips = layers[i] + (0 if last else 1)
            self.controlnet_down_blocks.extend(_zero_conv(ch[i]) for _ in range(skips))
        self.controlnet_mid_block = _zero_conv(ch[-1])
        self.mid_block = MidBlock(ch[-1], temb_ch, cfg, heads[-1], depth[-1])

    @classmethod
    def from_unet(cls, unet: UNet2DCondition, **fields: Any) -> ControlNet:
        """A ControlNet whose encoder starts as a copy of ``unet``'s (the paper's init)."""
        net = cls(ControlNetConfig.from_unet(unet.config, **fields))
        names = ["conv_in", "time_embedding", "down_blocks", "mid_block"]
        names += ["add_embedding"] if hasattr(net, "add_embedding") else []
        for name in names:
            getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net.to(next(unet.parameters()).dtype)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        control: torch.Tensor,
        scale: float | torch.Tensor = 1.0,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> ControlResiduals:
        """x: (B, C, H, W) model input; control: (B, conditioning_channels, H·f, W·f) in [0, 1]
        with f the embedding's downsampling factor; ``scale`` may be per sample, shape (B,).
        ``added_cond`` (SDXL ControlNets only): the U-Net's ``{"text_embeds", "time_ids"}``."""
        cfg = self.config
        t = torch.as_tensor(timestep, device=x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.to(x.dtype))
        if (added_cond is None) != (cfg.addition_embed_type is None):
            raise ValueError(
                "this ControlNet is micro-conditioned (SDXL): pass added_cond={'text_embeds', "
                "'time_ids'}"
                if added_cond is None
                else "this ControlNet takes no added_cond: it was made for an SD 1.x/2.x U-Net"
            )
        if added_cond is not None:
            temb = temb + self.micro_embedding(added_cond, temb.dtype)
        h = self.conv_in(x) + self.controlnet_cond_embedding(control.to(x.dtype))
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, temb, context)
            skips.extend(s)
        h = self.mid_block(h, temb, context)
        s = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
        s = s.view(-1, 1, 1, 1) if s.ndim == 1 else s
        down = [s * z(r) for z, r in zip(self.controlnet_down_blocks, skips, strict=True)]
        return ControlResiduals(down, s * self.controlnet_mid_block(h))

    # the U-Net's function itself (it reads only ``config`` and ``add_embedding``)
    micro_embedding = UNet2DCondition.micro_embedding


class ControlledUNet(nn.Module):
    """A U-Net steered by ControlNets: the same call as the U-Net, ``(x, timestep, context)``.

    ``controls`` pairs each ControlNet with its control image ([1 or B, C, H, W], repeated over
    the batch — e.g. both halves of a classifier-free-guidance batch), its scale and the window
    of model time in which it acts (``active(timestep) -> bool``; None: always). The residuals of
    several ControlNets add up, as in diffusers' MultiControlNet. An SDXL U-Net's ``added_cond``
    (pooled text and time ids) goes to its ControlNets too, as diffusers'
    ``StableDiffusionXLControlNetPipeline`` passes them.
    """

    def __init__(
        self, unet: UNet2DCondition, controls: list[tuple[ControlNet, torch.Tensor, float, Any]]
    ):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.controlnets = nn.ModuleList(c[0] for c in controls)
        self.controls = [(image, scale, active) for _, image, scale, active in controls]

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``guidance`` goes to a guidance-distilled U-Net (an LCM student) only: the
        ControlNets keep the time embedding they were trained with. ``added_cond`` (SDXL) goes
        to the U-Net and to every ControlNet."""
        total: ControlResiduals | None = None
        for net, (image, scale, active) in zip(self.controlnets, self.controls, strict=True):
            if active is not None and not active(timestep):
                continue
            reps = x.shape[0] // image.shape[0]
            if reps * image.shape[0] != x.shape[0]:
                raise ValueError(
                    f"control image batch {image.shape[0]} does not divide the batch {x.shape[0]}"
                )
            control = image.to(x.device, x.dtype).repeat(reps, 1, 1, 1)
            r = net(x, timestep, context, control, scale, added_cond=added_cond)
            if total is None:
                total = r
            else:
                total = ControlResiduals(
                    [a + b for a, b in zip(total.down, r.down, strict=True)], total.mid + r.mid
                )
        return self.unet(
            x, timestep, context, control=total, guidance=guidance, added_cond=added_cond
        )
