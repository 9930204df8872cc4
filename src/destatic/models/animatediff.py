"""AnimateDiff (Guo et al. 2024, "AnimateDiff: Animate Your Personalized Text-to-Image Diffusion
Models without Specific Tuning"): an image U-Net made a video denoiser by *motion modules* —
temporal transformers inserted after every resnet (and its spatial transformer) of every block.

A clip ``(B, C, F, H, W)`` runs through the 2-D U-Net as ``B·F`` images (each frame gets the
clip's timestep and text), and each motion module mixes information along frames only: at every
pixel position the ``F`` feature vectors form one sequence,

    h = GroupNorm(x)  over (C/G, F, H, W) of each clip,     tokens (B·H·W, F, C)
    h = proj_in(h);   for each block:  h += SelfAttn(LN(h) + PE);  h += SelfAttn(LN(h) + PE);
                                       h += FF_GEGLU(LN(h))
    x ← x + proj_out(h)

with ``PE`` the fixed sinusoidal frame positions (Vaswani et al. 2017) added to the normalised
tokens before each attention. ``proj_out`` starts at zero, so a fresh motion module is the
identity and the inflated U-Net draws the image model's frames: training the modules alone (the
image weights frozen) teaches motion without forgetting appearance.

Names follow diffusers: :class:`MotionAdapter` holds the modules of an adapter file
(``MotionAdapter``: ``down_blocks.i.motion_modules.j``, ``mid_block.motion_modules.0``,
``up_blocks.i.motion_modules.j``), and :class:`UNetMotion` is ``UNetMotionModel`` — the U-Net with
those modules in place, the same keys, so either loads without a mapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from destatic.models.attention import Attention, FeedForward
from destatic.models.config import JsonConfig, check_positive
from destatic.models.layers import LayerNorm
from destatic.models.unet import UNet2DCondition, UNetConfig

__all__ = [
    "MotionAdapter",
    "MotionAdapterConfig",
    "TemporalTransformer",
    "UNetMotion",
    "UNetMotionConfig",
]


def _per_block(value: int | tuple[int, ...], n: int, name: str) -> tuple[int, ...]:
    """``value`` as one entry per block: an int repeats; a tuple must have ``n`` entries."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} must be an int or have one entry per block ({n}), got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# The motion module
# ----------------------------------------------------------------------------------------------


class FramePositions(nn.Module):
    """Fixed sinusoidal positions added to a sequence of frames:
    ``pe[f, 2i] = sin(f/10000^(2i/d))``, ``pe[f, 2i+1] = cos(…)``; kept as the buffer ``pe``
    (1, max_frames, dim), saved with the weights as in diffusers."""

    def __init__(self, dim: int, max_frames: int) -> None:
        super().__init__()
        position = torch.arange(max_frames).unsqueeze(1)  # (F, 1)
        freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))  # (dim/2,)
        pe = torch.zeros(1, max_frames, dim)
        pe[0, :, 0::2] = torch.sin(position * freq)
        pe[0, :, 1::2] = torch.cos(position * freq)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[1]
        if frames > self.pe.shape[1]:
            raise ValueError(
                f"{frames} frames is more than the {self.pe.shape[1]} this motion module has "
                "positions for (motion_max_seq_length); ask for fewer frames"
            )
        return x + self.pe[:, :frames]


class TemporalBlock(nn.Module):
    """Two frame self-attentions (positions added to the normalised tokens before each) and a
    GEGLU feed-forward, pre-LayerNorm residuals: diffusers' ``BasicTransformerBlock`` with
    ``double_self_attention`` and sinusoidal positional embeddings."""

    def __init__(self, dim: int, heads: int, max_frames: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.pos_embed = FramePositions(dim, max_frames)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.pos_embed(self.norm1(x)))  # (N, F, dim)
        x = x + self.attn2(self.pos_embed(self.norm2(x)))  # (N, F, dim)
        return x + self.ff(self.norm3(x))


class TemporalTransformer(nn.Module):
    """One motion module (diffusers' ``AnimateDiffTransformer3D``): mixes features across frames
    at each pixel; the input comes back added (module doc)."""

    def __init__(self, channels: int, heads: int, depth: int, groups: int, max_frames: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TemporalBlock(channels, heads, max_frames) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x: (B·F, C, H, W), the frames of each clip consecutive. Returns the same shape."""
        bf, c, h, w = x.shape
        b = bf // frames
        t = x.reshape(b, frames, c, h, w).transpose(1, 2)  # (B, C, F, H, W)
        t = self.norm(t)  # statistics over each clip's frames and pixels
        t = t.permute(0, 3, 4, 2, 1).reshape(b * h * w, frames, c)  # (B·H·W, F, C)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t)
        t = self.proj_out(t).reshape(b, h, w, frames, c).permute(0, 3, 4, 1, 2)  # (B, F, C, H, W)
        return x + t.reshape(bf, c, h, w)


class MotionModules(nn.Module):
    """The motion modules of one U-Net block (``motion_modules.j``)."""

    def __init__(
        self, channels: int, count: int, heads: int, depth: int, groups: int, max_frames: int
    ) -> None:
        super().__init__()
        self.motion_modules = nn.ModuleList(
            TemporalTransformer(channels, heads, depth, groups, max_frames) for _ in range(count)
        )


def _zero_outputs(module: nn.Module) -> None:
    """Every motion module's ``proj_out`` to zero: the module starts as the identity."""
    for m in module.modules():
        if isinstance(m, TemporalTransformer):
            nn.init.zeros_(m.proj_out.weight)
            nn.init.zeros_(m.proj_out.bias)


# ----------------------------------------------------------------------------------------------
# The adapter file
# ----------------------------------------------------------------------------------------------


@dataclass
class MotionAdapterConfig(JsonConfig):
    """diffusers' ``MotionAdapter`` config.json (the fields a motion adapter file carries)."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    motion_layers_per_block: int | tuple[int, ...] = 2
    motion_transformer_layers_per_block: int | tuple[int, ...] = 1
    motion_mid_block_layers_per_block: int = 1
    motion_transformer_layers_per_mid_block: int = 1
    motion_num_attention_heads: int | tuple[int, ...] = 8
    motion_norm_num_groups: int = 32
    motion_max_seq_length: int = 32
    use_motion_mid_block: bool = True
    conv_in_channels: int | None = None

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        n = len(self.block_out_channels)
        for name in (
            "motion_layers_per_block",
            "motion_transformer_layers_per_block",
            "motion_num_attention_heads",
        ):
            setattr(self, name, _per_block(getattr(self, name), n, name))
        if self.conv_in_channels:
            raise ValueError(
                "motion adapters with their own conv_in (PIA, SparseCtrl) are not supported"
            )

    def validate(self) -> None:
        check_positive(
            block_out_channels=self.block_out_channels,
            motion_layers_per_block=self.motion_layers_per_block,
            motion_num_attention_heads=self.motion_num_attention_heads,
            motion_max_seq_length=self.motion_max_seq_length,
        )

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> MotionAdapterConfig:
        cfg, _ = cls._read_diffusers(cfg, {}, "MotionAdapter")
        config = cls(**cfg)
        config.validate()
        return config


class MotionAdapter(nn.Module):
    """The motion modules of an AnimateDiff adapter, apart from any U-Net (diffusers'
    ``MotionAdapter``); :meth:`UNetMotion.from_unet` puts them into one."""

    def __init__(self, config: MotionAdapterConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        groups, frames = cfg.motion_norm_num_groups, cfg.motion_max_seq_length
        heads, depth = cfg.motion_num_attention_heads, cfg.motion_transformer_layers_per_block
        layers = cfg.motion_layers_per_block
        self.down_blocks = nn.ModuleList(
            MotionModules(ch[i], layers[i], heads[i], depth[i], groups, frames)
            for i in range(len(ch))
        )
        self.mid_block = None
        if cfg.use_motion_mid_block:
            self.mid_block = MotionModules(
                ch[-1],
                cfg.motion_mid_block_layers_per_block,
                heads[-1],
                cfg.motion_transformer_layers_per_mid_block,
                groups,
                frames,
            )
        self.up_blocks = nn.ModuleList(
            MotionModules(ch[i], layers[i] + 1, heads[i], depth[i], groups, frames)
            for i in reversed(range(len(ch)))
        )
        _zero_outputs(self)


# ----------------------------------------------------------------------------------------------
# The inflated U-Net
# ----------------------------------------------------------------------------------------------

#: diffusers' motion block names ↔ the 2-D ones of :class:`~destatic.models.unet.UNetConfig`.
_BLOCK_NAMES = {
    "CrossAttnDownBlockMotion": "CrossAttnDownBlock2D",
    "DownBlockMotion": "DownBlock2D",
    "CrossAttnUpBlockMotion": "CrossAttnUpBlock2D",
    "UpBlockMotion": "UpBlock2D",
}
_MOTION_NAMES = {v: k for k, v in _BLOCK_NAMES.items()}

# diffusers' UNetMotionModel options outside what is built here: accepted at these values.
_UNSUPPORTED_MOTION: dict[str, tuple[Any, ...]] = {
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu",),
    "reverse_transformer_layers_per_block": (None,),
    "reverse_temporal_transformer_layers_per_block": (None,),
    "reverse_motion_num_attention_heads": (None,),
    "transformer_layers_per_mid_block": (None, 1),
    "mid_block_layers": (1,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
}


@dataclass
class UNetMotionConfig(UNetConfig):
    """A U-Net's config (:class:`~destatic.models.unet.UNetConfig`) and its motion modules'.
    ``config.json`` is diffusers' ``UNetMotionModel`` (``…Motion`` block names,
    ``num_attention_heads``) plus ``num_frames``, the clip length a model was trained on (16,
    AnimateDiff's, when a folder does not say and the positions reach that far)."""

    temporal_transformer_layers_per_block: int | tuple[int, ...] = 1
    temporal_transformer_layers_per_mid_block: int = 1
    motion_num_attention_heads: int | tuple[int, ...] = 8
    motion_max_seq_length: int = 32
    use_motion_mid_block: bool = True
    num_frames: int | None = None  # None: 16, or motion_max_seq_length if that is less

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_frames is None:
            self.num_frames = min(16, self.motion_max_seq_length)
        n = len(self.block_out_channels)
        for name in ("temporal_transformer_layers_per_block", "motion_num_attention_heads"):
            setattr(self, name, _per_block(getattr(self, name), n, name))

    def validate(self) -> None:
        super().validate()
        check_positive(
            motion_num_attention_heads=self.motion_num_attention_heads,
            motion_max_seq_length=self.motion_max_seq_length,
            num_frames=self.num_frames,
        )
        if self.num_frames > self.motion_max_seq_length:
            raise ValueError(
                f"num_frames={self.num_frames} exceeds motion_max_seq_length="
                f"{self.motion_max_seq_length}"
            )

    @classmethod
    def from_unet(
        cls, unet: UNetConfig, adapter: MotionAdapterConfig, **extra: Any
    ) -> UNetMotionConfig:
        """An image U-Net's config with an adapter's motion modules (``from_unet2d``)."""
        if adapter.block_out_channels != unet.block_out_channels:
            raise ValueError(
                f"the motion adapter is for blocks {list(adapter.block_out_channels)}, the U-Net "
                f"has {list(unet.block_out_channels)}: use an adapter made for this U-Net"
            )
        base = {f.name: getattr(unet, f.name) for f in fields(UNetConfig) if f.name != "extra"}
        base["layers_per_block"] = adapter.motion_layers_per_block
        if base["layers_per_block"] != unet.per_block("layers_per_block"):
            raise ValueError(
                f"the motion adapter has {list(adapter.motion_layers_per_block)} motion layers "
                f"per block, the U-Net {list(unet.per_block('layers_per_block'))} resnets"
            )
        config = cls(
            **base,
            temporal_transformer_layers_per_block=adapter.motion_transformer_layers_per_block,
            temporal_transformer_layers_per_mid_block=adapter.motion_transformer_layers_per_mid_block,
            motion_num_attention_heads=adapter.motion_num_attention_heads,
            motion_max_seq_length=adapter.motion_max_seq_length,
            use_motion_mid_block=adapter.use_motion_mid_block,
            **extra,
        )
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["down_block_types"] = [_MOTION_NAMES[b] for b in d["down_block_types"]]
        d["up_block_types"] = [_MOTION_NAMES[b] for b in d["up_block_types"]]
        d["num_attention_heads"] = d.pop("attention_head_dim")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetMotionConfig:
        return cls.from_diffusers(d)

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> UNetMotionConfig:
        """Read a diffusers ``UNetMotionModel`` config.json (or one this class wrote)."""
        cfg, private = cls._read_diffusers(_from_motion_names(cfg), _UNSUPPORTED_MOTION, "UNet")
        config = cls(**cfg, extra=private)
        config.validate()
        return config


def _from_motion_names(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(cfg)
    for key in ("down_block_types", "up_block_types"):
        if key in cfg:
            unknown = [b for b in cfg[key] if b not in _BLOCK_NAMES]
            if unknown:
                raise ValueError(
                    f"unsupported {key} entries {unknown}; supported: {list(_BLOCK_NAMES)}"
                )
            cfg[key] = [_BLOCK_NAMES[b] for b in cfg[key]]
    if "num_attention_heads" in cfg:
        cfg["attention_head_dim"] = cfg.pop("num_attention_heads")
    return cfg


class UNetMotion(UNet2DCondition):
    """An image U-Net with AnimateDiff motion modules (diffusers' ``UNetMotionModel``):
    ``forward(x (B, C, F, H, W), timestep (B,), context (B, L, D)) -> (B, C_out, F, H, W)``."""

    def __init__(self, config: UNetMotionConfig) -> None:
        super().__init__(config)
        cfg, n = config, len(config.block_out_channels)
        ch, heads = cfg.block_out_channels, cfg.motion_num_attention_heads
        depth, groups = cfg.temporal_transformer_layers_per_block, cfg.norm_num_groups
        frames = cfg.motion_max_seq_length
        for i, block in enumerate(self.down_blocks):
            block.motion_modules = MotionModules(
                ch[i], len(block.resnets), heads[i], depth[i], groups, frames
            ).motion_modules
        for i, block in enumerate(self.up_blocks):
            j = n - 1 - i
            block.motion_modules = MotionModules(
                ch[j], len(block.resnets), heads[j], depth[j], groups, frames
            ).motion_modules
        if cfg.use_motion_mid_block:
            self.mid_block.motion_modules = MotionModules(
                ch[-1], 1, heads[-1], cfg.temporal_transformer_layers_per_mid_block, groups, frames
            ).motion_modules
        _zero_outputs(self)

    @classmethod
    def from_unet(
        cls, unet: UNet2DCondition, adapter: MotionAdapter | None = None, **extra: Any
    ) -> UNetMotion:
        """``unet``'s weights with ``adapter``'s motion modules (fresh, zero-output ones when
        there is no adapter: then the clip is the image model's, frame by frame)."""
        unknown = set(extra) - _ADAPTER_FIELDS - {"num_frames"}
        if unknown:
            raise ValueError(f"unknown motion module option(s) {sorted(unknown)}")
        adapter = adapter or MotionAdapter(_adapter_config(unet.config, **extra))
        frames = {k: v for k, v in extra.items() if k == "num_frames"}
        config = UNetMotionConfig.from_unet(unet.config, adapter.config, **frames)
        with torch.device("meta"):
            model = cls(config)
        state = {**unet.state_dict(), **adapter.state_dict()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(next(unet.parameters()).dtype)

    def motion_parameters(self) -> list[nn.Parameter]:
        """The parameters of the motion modules (what AnimateDiff trains)."""
        return [p for name, p in self.named_parameters() if ".motion_modules." in name]

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        b, c, f, h, w = x.shape
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)  # (B,)
        # (B·F, C, H, W) in the standard layout: a channels-last input (a permuted uint8 clip)
        # made torch 2.13's CPU backward crash with a segfault
        frames = x.transpose(1, 2).contiguous().reshape(b * f, c, h, w)
        kwargs = {k: _per_frame(v, f) for k, v in kwargs.items()}
        out = super().forward(
            frames, t.repeat_interleave(f), context.repeat_interleave(f, 0), frames=f, **kwargs
        )
        return out.reshape(b, f, -1, h, w).transpose(1, 2)  # (B, C_out, F, H, W)


def _per_frame(value: Any, frames: int) -> Any:
    """A per-clip input repeated for each frame (tensors with a batch axis; dicts of them)."""
    if isinstance(value, dict):
        return {k: _per_frame(v, frames) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value.repeat_interleave(frames, 0)
    return value


_ADAPTER_FIELDS = {f.name for f in fields(MotionAdapterConfig)}


def _adapter_config(unet: UNetConfig, **extra: Any) -> MotionAdapterConfig:
    """A new adapter's config for ``unet``: its blocks and layers; ``extra`` may set the
    adapter's other fields (heads, depth, ``motion_max_seq_length``…)."""
    chosen = {k: v for k, v in extra.items() if k in _ADAPTER_FIELDS}
    chosen.setdefault("motion_norm_num_groups", unet.norm_num_groups)
    return MotionAdapterConfig(
        block_out_channels=unet.block_out_channels,
        motion_layers_per_block=unet.per_block("layers_per_block"),
        **chosen,
    )
