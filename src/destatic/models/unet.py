"""The Stable Diffusion 1.x / 2.x U-Net (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"): an ε- or v-predicting U-Net on VAE latents, conditioned on the timestep
(sinusoidal embedding → MLP, added inside every residual block) and on text tokens (cross-attention
in ``SpatialTransformer``s).

SDXL's U-Net (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution
Image Synthesis", §2.2) is the same network with deeper transformers
(``transformer_layers_per_block`` 1/2/10), 2048-wide text tokens, and *micro-conditioning*
(``addition_embed_type="text_time"``): the image's size and crop ``time_ids`` (six numbers, or
five with the refiner's aesthetic score) each get the sinusoidal embedding of width
``addition_time_embed_dim``; concatenated with the pooled text vector ``text_embeds`` they pass an
MLP (``add_embedding``) whose output is added to the timestep embedding,

    temb = MLP_t(sin(t)) + MLP_add([text_embeds, sin(time_ids_1), …, sin(time_ids_k)]).

AudioLDM's U-Net (Liu et al. 2023, "AudioLDM: Text-to-Audio Generation with Latent Diffusion
Models", §3.2) runs on mel-spectrogram latents and is conditioned on one CLAP text vector c
through the timestep embedding instead of cross-attention (``class_embed_type=
"simple_projection"``, ``class_embeddings_concat``): the resnets receive

    temb = [MLP_t(sin(t)), W_c·c + b_c]        (concatenated: width 2·4·C0),

and its transformers get no context, so their second attention attends to the feature map
itself, with one key/value width per block (``cross_attention_dim`` as a tuple, the blocks'
channels).

Config field names and ``state_dict`` keys are those of diffusers' ``UNet2DConditionModel``, so a
diffusers checkpoint loads with ``UNet2DCondition(UNetConfig.from_diffusers(cfg))`` and
``load_state_dict(weights, strict=True)``, with no key mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from destatic.models.attention import SpatialTransformer
from destatic.models.config import (
    JsonConfig,
    check_divides,
    check_positive,
    check_positive_float,
    check_sample_size,
)
from destatic.models.layers import (
    Downsample,
    GroupNorm,
    ResnetBlock,
    TimestepEmbedding,
    Upsample,
    timestep_embedding,
)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class UNetConfig(JsonConfig):
    """U-Net hyper-parameters, named as in diffusers' ``UNet2DConditionModel`` config.json.

    Defaults are SD 1.x (v1-5). Note the historical diffusers quirk kept for checkpoint
    compatibility: ``attention_head_dim`` is the number of attention *heads* per block (SD 1.x: 8
    heads everywhere; SD 2.x: [5, 10, 20, 20] heads, i.e. 64 channels per head).
    """

    sample_size: int | None = 64  # latent side the model was trained at (informational)
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False  # map input x to 2x - 1 first
    flip_sin_to_cos: bool = True  # cosines first in the timestep embedding
    freq_shift: float = 0  # frequency denominator is dim/2 - freq_shift
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2  # resnets per down block (up blocks: one more)
    downsample_padding: int = 1
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    # text-token width (CLIP ViT-L: 768; OpenCLIP ViT-H: 1024); a tuple: one per down block (the
    # key/value width of each block's second attention; AudioLDM: the blocks' channels)
    cross_attention_dim: int | tuple[int, ...] = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8  # number of heads per block (see above)
    use_linear_projection: bool = False  # SD 2.x: Linear proj_in/out; SD 1.x: 1×1 conv
    upcast_attention: bool = False  # attention in float32 (SD 2.1 768-v)
    # width of the guidance-scale embedding added to the timestep embedding (LCM's
    # w-conditioning; None = the network takes no guidance input)
    time_cond_proj_dim: int | None = None
    # SDXL micro-conditioning: "text_time" adds MLP([text_embeds, sin(time_ids)]) to the time
    # embedding; its sinusoid width per time id and the MLP's input width
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    # AudioLDM's class conditioning (module docstring): "simple_projection" embeds a vector
    # ``class_labels`` (B, projection_class_embeddings_input_dim) with one Linear layer, added to
    # the time embedding, or concatenated to it with ``class_embeddings_concat``
    class_embed_type: str | None = None
    class_embeddings_concat: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # not used by the model

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in _PER_BLOCK:
            value = getattr(self, name)
            if isinstance(value, list | tuple):
                setattr(self, name, tuple(value))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels differ in length"
            )
        for name in _PER_BLOCK:
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"{name} must be an int or have one entry per block ({n})")
        for b in self.down_block_types:
            if b not in DOWN_BLOCKS:
                raise ValueError(
                    f"unsupported down_block_types entry {b!r}; supported: {DOWN_BLOCKS}"
                )
        for b in self.up_block_types:
            if b not in UP_BLOCKS:
                raise ValueError(f"unsupported up_block_types entry {b!r}; supported: {UP_BLOCKS}")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"unsupported addition_embed_type {self.addition_embed_type!r}; "
                "supported: None, 'text_time'"
            )
        if self.addition_embed_type == "text_time" and None in (
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ):
            raise ValueError(
                "addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        if self.class_embed_type not in (None, "simple_projection"):
            raise ValueError(
                f"unsupported class_embed_type {self.class_embed_type!r}; "
                "supported: None, 'simple_projection'"
            )
        if self.class_embed_type and self.projection_class_embeddings_input_dim is None:
            raise ValueError(
                "class_embed_type='simple_projection' needs projection_class_embeddings_input_dim"
            )
        if self.class_embeddings_concat and self.class_embed_type is None:
            raise ValueError("class_embeddings_concat needs a class_embed_type")

    def validate(self) -> None:
        """Raise a ValueError naming the first field that cannot build a working U-Net: sizes
        and counts must be positive integers, ``norm_num_groups`` must divide every block's
        channels, an attention block has no more heads than channels, and ``sample_size`` stays
        within :data:`~destatic.models.config.MAX_SAMPLE_SIZE`."""
        check_positive(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            transformer_layers_per_block=self.transformer_layers_per_block,
            attention_head_dim=self.attention_head_dim,
            norm_num_groups=self.norm_num_groups,
            cross_attention_dim=self.cross_attention_dim,
            time_cond_proj_dim=self.time_cond_proj_dim,
            addition_time_embed_dim=self.addition_time_embed_dim,
            projection_class_embeddings_input_dim=self.projection_class_embeddings_input_dim,
        )
        check_positive_float(norm_eps=self.norm_eps)
        check_sample_size(self.sample_size)
        channels = self.block_out_channels
        check_divides("norm_num_groups", self.norm_num_groups, "block_out_channels", channels)
        heads = self.per_block("attention_head_dim")
        attention = [
            i
            for i, kind in enumerate(self.down_block_types)
            if kind.startswith("CrossAttn") or i == len(channels) - 1  # the mid block attends
        ]
        for i in attention:
            if heads[i] > channels[i]:
                raise ValueError(
                    f"attention_head_dim (heads) {heads[i]} exceeds the {channels[i]} channels "
                    f"of block {i}: a head needs at least one channel"
                )

    def per_block(self, name: str) -> tuple[int, ...]:
        """``layers_per_block``, ``transformer_layers_per_block``, ``attention_head_dim`` or
        ``cross_attention_dim`` as a tuple with one entry per down block."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    # -- serialisation ---------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> UNetConfig:
        """Read a diffusers ``UNet2DConditionModel`` config.json dict.

        Options SD 1.x/2.x/XL and AudioLDM do not use (other class embeddings, other addition
        embeddings, other block types, ...) must be absent or at their diffusers default,
        otherwise a ValueError names the option.
        """
        unsupported = {k: v for k, v in _UNSUPPORTED_DEFAULTS.items() if k not in _CLASS_OPTIONS}
        cfg, private = cls._read_diffusers(cfg, unsupported, "UNet")
        config = cls(**cfg, extra=private)
        config.validate()
        return config


_PER_BLOCK = (
    "layers_per_block",
    "transformer_layers_per_block",
    "attention_head_dim",
    "cross_attention_dim",
)
# AudioLDM's class conditioning: fields of UNetConfig, still unsupported by the ControlNet
_CLASS_OPTIONS = ("class_embed_type", "class_embeddings_concat")

# diffusers options outside SD 1.x/2.x: accepted only at these (default) values.
_UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu",),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "addition_embed_type_num_heads": (64,),  # only read with addition_embed_type="text"
}


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """``layers`` resnets, each optionally followed by a SpatialTransformer, then a stride-2 conv.

    Returns the output and every intermediate (the skip connections for the up path).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_ch: int,
        layers: int,
        cross_attn: bool,
        add_downsample: bool,
        cfg: UNetConfig,
        heads: int,
        depth: int,
        context_dim: int | None = None,  # None: cfg.cross_attention_dim (an int)
    ) -> None:
        super().__init__()
        groups, eps, p = cfg.norm_num_groups, cfg.norm_eps, cfg.dropout
        if cross_attn:  # registered first, as in diffusers, so state_dict key order matches
            self.attentions = nn.ModuleList(
                _transformer(out_ch, heads, depth, cfg, context_dim) for _ in range(layers)
            )
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps, p)
            for i in range(layers)
        )
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=cfg.downsample_padding)])

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, frames: int = 1
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)  # (B, C_out, H, W)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context)  # (B, C_out, H, W)
            if hasattr(self, "motion_modules"):  # AnimateDiff (models.animatediff)
                x = self.motion_modules[i](x, frames)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)  # (B, C_out, H/2, W/2)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet → SpatialTransformer → resnet at the lowest resolution."""

    def __init__(
        self,
        ch: int,
        temb_ch: int,
        cfg: UNetConfig,
        heads: int,
        depth: int,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        groups, eps, p = cfg.norm_num_groups, cfg.norm_eps, cfg.dropout
        self.attentions = nn.ModuleList([_transformer(ch, heads, depth, cfg, context_dim)])
        self.resnets = nn.ModuleList(ResnetBlock(ch, ch, temb_ch, groups, eps, p) for _ in range(2))

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, frames: int = 1
    ) -> torch.Tensor:
        x = self.resnets[0](x, temb)  # (B, C, H, W)
        x = self.attentions[0](x, context)  # (B, C, H, W)
        if hasattr(self, "motion_modules"):
            x = self.motion_modules[0](x, frames)
        return self.resnets[1](x, temb)  # (B, C, H, W)


class UpBlock(nn.Module):
    """``layers`` resnets on [x, skip] concatenations (each optionally followed by a
    SpatialTransformer), then nearest ×2 upsampling and a conv."""

    def __init__(
        self,
        in_ch: int,  # channels of the matching down block's input (last skip)
        out_ch: int,
        prev_ch: int,  # channels coming up from the previous (deeper) block
        temb_ch: int,
        layers: int,
        cross_attn: bool,
        add_upsample: bool,
        cfg: UNetConfig,
        heads: int,
        depth: int,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        groups, eps, p = cfg.norm_num_groups, cfg.norm_eps, cfg.dropout
        if cross_attn:
            self.attentions = nn.ModuleList(
                _transformer(out_ch, heads, depth, cfg, context_dim) for _ in range(layers)
            )
        self.resnets = nn.ModuleList()
        for i in range(layers):
            skip_ch = in_ch if i == layers - 1 else out_ch  # the last resnet meets the block input
            res_in = prev_ch if i == 0 else out_ch
            self.resnets.append(ResnetBlock(res_in + skip_ch, out_ch, temb_ch, groups, eps, p))
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        size: tuple[int, int] | None,
        frames: int = 1,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, temb)  # (B, C_out, H, W)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context)  # (B, C_out, H, W)
            if hasattr(self, "motion_modules"):
                x = self.motion_modules[i](x, frames)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, size)  # (B, C_out, 2H, 2W)
        return x


def _transformer(
    ch: int, heads: int, depth: int, cfg: UNetConfig, context_dim: int | None
) -> SpatialTransformer:
    return SpatialTransformer(
        ch,
        heads,
        ch // heads,
        cfg.cross_attention_dim if context_dim is None else context_dim,
        depth,
        cfg.norm_num_groups,
        cfg.use_linear_projection,
        cfg.dropout,
        cfg.upcast_attention,
    )


# ----------------------------------------------------------------------------------------------
# U-Net
# ----------------------------------------------------------------------------------------------


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance-scale embedding (Luo et al. 2023, §4.2): the sinusoidal embedding of
    ``1000·ω`` with ``ω = w - 1`` (LCM writes the guided model as ``(1+ω)·cond - ω·uncond``, so
    ω = 0 is no guidance), sines first, frequencies ``10000^(-i/(dim/2 - 1))``. This is the input
    of diffusers' ``time_cond_proj_dim`` U-Nets (LCM-distilled SD checkpoints) too."""
    return timestep_embedding(1000 * (w.float() - 1), dim, flip_sin_to_cos=False, freq_shift=1)


class UNet2DCondition(nn.Module):
    """Text-conditioned latent U-Net: ``forward(x, timestep, context) -> ε̂ (or v̂)``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        n = len(ch)
        layers = cfg.per_block("layers_per_block")
        heads = cfg.per_block("attention_head_dim")
        depth = cfg.per_block("transformer_layers_per_block")
        cross = cfg.per_block("cross_attention_dim")
        temb_ch = 4 * ch[0]

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch, cfg.time_cond_proj_dim)
        if cfg.class_embed_type == "simple_projection":  # AudioLDM (module docstring)
            self.class_embedding = nn.Linear(cfg.projection_class_embeddings_input_dim, temb_ch)
        block_temb = 2 * temb_ch if cfg.class_embeddings_concat else temb_ch
        if cfg.addition_embed_type == "text_time":  # SDXL micro-conditioning (module docstring)
            self.add_embedding = TimestepEmbedding(
                cfg.projection_class_embeddings_input_dim, temb_ch
            )

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            self.down_blocks.append(
                DownBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    block_temb,
                    layers[i],
                    kind == "CrossAttnDownBlock2D",
                    add_downsample=i < n - 1,
                    cfg=cfg,
                    heads=heads[i],
                    depth=depth[i],
                    context_dim=cross[i],
                )
            )

        rch, rlayers, rheads, rdepth, rcross = (v[::-1] for v in (ch, layers, heads, depth, cross))
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            self.up_blocks.append(
                UpBlock(
                    in_ch=rch[min(i + 1, n - 1)],
                    out_ch=rch[i],
                    prev_ch=rch[max(i - 1, 0)],
                    temb_ch=block_temb,
                    layers=rlayers[i] + 1,
                    cross_attn=kind == "CrossAttnUpBlock2D",
                    add_upsample=i < n - 1,
                    cfg=cfg,
                    heads=rheads[i],
                    depth=rdepth[i],
                    context_dim=rcross[i],
                )
            )

        # Registered after up_blocks, as in diffusers, so state_dict key order matches.
        self.mid_block = MidBlock(ch[-1], block_temb, cfg, heads[-1], depth[-1], cross[-1])

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PyTorch default init, with the last layer of every residual branch and the output conv
        zeroed (LDM's ``zero_module``), so a fresh U-Net starts as a sum of identity paths."""
        for m in self.modules():
            if isinstance(m, ResnetBlock):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            elif isinstance(m, SpatialTransformer):
                nn.init.zeros_(m.proj_out.weight)
                nn.init.zeros_(m.proj_out.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        if self.config.time_cond_proj_dim is not None:
            # a new guidance input starts silent: a student copied from its teacher is the teacher
            nn.init.zeros_(self.time_embedding.cond_proj.weight)

    def micro_embedding(
        self, added_cond: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        """SDXL's added embedding ``MLP_add([text_embeds, sin(time_ids)])`` (B, 4·C0): each of
        the k time ids (original size, crop corner, target size or aesthetic score) gets the
        sinusoidal embedding of width ``addition_time_embed_dim`` with the timestep's
        ``flip_sin_to_cos`` and ``freq_shift``."""
        cfg = self.config
        text, ids = added_cond["text_embeds"], added_cond["time_ids"]
        sin = timestep_embedding(
            ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
        )  # (B·k, addition_time_embed_dim)
        sin = sin.reshape(text.shape[0], -1)  # (B, k·addition_time_embed_dim)
        return self.add_embedding(torch.cat([text, sin], dim=-1).to(dtype))

    def embedding(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        guidance: torch.Tensor | float | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The embedding every resnet receives (B, 4·C0), or (B, 8·C0) with
        ``class_embeddings_concat``: the timestep's, with the guidance scale, SDXL's
        micro-conditioning and AudioLDM's class vector where the config has them (see
        :meth:`forward`)."""
        cfg = self.config
        t = torch.as_tensor(timestep, device=x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t  # (B,)
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        if (guidance is None) != (cfg.time_cond_proj_dim is None):
            raise ValueError(
                "this U-Net embeds the guidance scale: pass guidance="
                if guidance is None
                else "this U-Net takes no guidance input (time_cond_proj_dim is None)"
            )
        wemb = None
        if guidance is not None:
            w = torch.as_tensor(guidance, device=x.device, dtype=torch.float32).reshape(-1)
            w = w.expand(x.shape[0]) if w.numel() == 1 else w  # (B,)
            wemb = guidance_embedding(w, cfg.time_cond_proj_dim)  # (B, time_cond_proj_dim)
        temb = self.time_embedding(temb.to(x.dtype), wemb)  # (B, 4·C0)
        if (class_labels is None) != (cfg.class_embed_type is None):
            raise ValueError(
                "this U-Net is class-conditioned (AudioLDM): pass class_labels="
                if class_labels is None
                else "this U-Net takes no class_labels (class_embed_type is None)"
            )
        if class_labels is not None:
            cemb = self.class_embedding(class_labels.to(x.dtype))  # (B, 4·C0)
            temb = torch.cat([temb, cemb], -1) if cfg.class_embeddings_concat else temb + cemb
        if (added_cond is None) != (cfg.addition_embed_type is None):
            raise ValueError(
                "this U-Net is micro-conditioned (SDXL): pass added_cond={'text_embeds', "
                "'time_ids'}"
                if added_cond is None
                else "this U-Net takes no added_cond (addition_embed_type is None)"
            )
        if added_cond is not None:
            temb = temb + self.micro_embedding(added_cond, temb.dtype)  # (B, 4·C0)
        return temb

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor | None = None,
        control: Any = None,
        guidance: torch.Tensor | float | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
        frames: int = 1,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, H, W) latents; timestep: scalar or (B,), fractional allowed;
        context: (B, tokens, cross_attention_dim), or None (AudioLDM: the second attention of
        each transformer attends to the feature map). Returns (B, out_channels, H, W).
        ``control`` (a :class:`~destatic.models.controlnet.ControlResiduals`) adds a ControlNet's
        residuals to the skip connections and the mid block's output. ``guidance`` (scalar or
        (B,)): the classifier-free guidance scale w a guidance-distilled network
        (``time_cond_proj_dim``) was taught to reproduce, see :func:`guidance_embedding`.
        ``added_cond`` (SDXL, ``addition_embed_type="text_time"``; diffusers'
        ``added_cond_kwargs``): ``{"text_embeds": (B, P), "time_ids": (B, k)}``, see
        :meth:`micro_embedding`. ``frames``: how many consecutive images of the batch are one clip
        (the motion modules of :class:`~destatic.models.animatediff.UNetMotion`).
        ``class_labels`` (AudioLDM, ``class_embed_type``): the class vector
        (B, projection_class_embeddings_input_dim), see the module docstring."""
        cfg = self.config
        temb = self.embedding(x, timestep, guidance, added_cond, class_labels)
        if cfg.center_input_sample:
            x = 2 * x - 1
        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, temb, context, frames)  # (B, C_i, H/2^i, W/2^i)
            skips.extend(s)
        h = self.mid_block(h, temb, context, frames)  # (B, C_last, H/2^(n-1), W/2^(n-1))
        if control is not None:
            skips = [s + r for s, r in zip(skips, control.down, strict=True)]
            h = h + control.mid
        for block in self.up_blocks:
            k = len(block.resnets)
            s, skips = skips[-k:], skips[:-k]
            size = tuple(skips[-1].shape[2:]) if skips else None  # odd sizes round-trip exactly
            h = block(h, s, temb, context, size, frames)  # (B, C, 2H, 2W)
        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, out_channels, H, W)
        return h
