"""FLUX.1 single files: the transformer in Black Forest Labs' layout (``double_blocks.N.img_attn
.qkv``, ``single_blocks.N.linear1``, ``img_in``, ``time_in``, ``vector_in``, ``txt_in``,
``guidance_in`` for dev only, ``final_layer``), bare as BFL ships it or under
``model.diffusion_model.`` as ComfyUI saves it — or in diffusers' own names (a
``FluxTransformer2DModel`` saved as one file).

Those files usually hold the transformer alone: the autoencoder, CLIP-L, T5, their tokenizers
and the scheduler then come from ``config=`` (a diffusers FLUX.1 folder) or a cached
``black-forest-labs/FLUX.1-dev`` / ``-schnell`` snapshot. A whole checkpoint (ComfyUI's: also
``first_stage_model.``, ``text_encoders.clip_l.transformer.`` and ``text_encoders.t5xxl.
transformer.``) loads those from the file, with the shipped configs and the tokenizers found
as for the other formats. The transformer's sizes are read from
the header (width, heads, depth, guidance input), so a pruned or distilled variant loads without
a config; only the rotary axes come from the shipped config (or ``config=``'s transformer).

BFL fuses what diffusers keeps apart (the names and the fused layers:
:mod:`destatic.models.flux_keys`): a double block's q, k, v are thirds of ``…_attn.qkv``; a
single block's ``linear1`` stacks q, k, v (width d each) and the MLP input (4d); the final adaLN
gives (shift, scale) where diffusers' gives (scale, shift)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from destatic.io import CheckpointError
from destatic.io.hub_cache import cached_snapshot
from destatic.models.autoencoder import AutoencoderKL
from destatic.models.flux import Flux, FluxConfig
from destatic.models.flux_keys import (
    DOUBLE,
    DOUBLE_FUSED,
    DOUBLE_NORMS,
    FINAL_MODULATION,
    SINGLE,
    SINGLE_FUSED,
    SINGLE_NORMS,
    TOP,
    fused_rows,
)
from destatic.models.registry import load_component
from destatic.models.text import CLIPTextEncoder, FluxTextEncoder
from destatic.pipelines.families import Components, Family
from destatic.pipelines.families.flux import FLUX, SCHNELL_DEFAULTS
from destatic.pipelines.single_file.common import (
    Header,
    Piece,
    SingleFileFormat,
    Source,
    configs,
    fill,
    find_tokenizer,
    prefixed,
    register_single_file,
)
from destatic.pipelines.single_file.sd import (
    clip_from_file,
    clip_names,
    clip_tokenizer,
    t5_from_file,
    vae_from_file,
)
from destatic.process.schedulers import (
    process_from_scheduler_config,
    scheduler_sampling_defaults,
)

_COMFY = "model.diffusion_model."


def _prefixes(table: dict[str, str]) -> dict[str, str]:
    """A diffusers → BFL module table as parameter-name prefixes."""
    return {f"{ours}.": f"{bfl}." for ours, bfl in table.items()}


_TOP = _prefixes(TOP)
_DOUBLE = {**_prefixes(DOUBLE), **DOUBLE_NORMS}
_SINGLE = {**_prefixes(SINGLE), **SINGLE_NORMS}
# diffusers layer in a block → (the BFL layer it is fused into, its place there)
_IN_DOUBLE = {ours: (bfl, i) for bfl, ls in DOUBLE_FUSED.items() for i, ours in enumerate(ls)}
_IN_SINGLE = {ours: (bfl, i) for bfl, ls in SINGLE_FUSED.items() for i, ours in enumerate(ls)}


def _renamed(rest: str, table: dict[str, str]) -> str | None:
    for ours, theirs in table.items():
        if rest.startswith(ours):
            return theirs + rest[len(ours) :]
    return None


def bfl_name(key: str, hidden: int) -> Source:
    """The BFL name (no prefix) of our / diffusers' Flux parameter ``key``; ``hidden``: the
    transformer's width d (heads · head_dim), which places a single block's slices."""
    final, final_bfl = FINAL_MODULATION
    if key.startswith(f"{final}."):
        return Piece(f"{final_bfl}.{key.rsplit('.', 1)[1]}", swap=True)
    if m := re.fullmatch(r"(single_)?transformer_blocks\.(\d+)\.(.*)", key):
        single, i, rest = m.groups()
        block = f"{'single' if single else 'double'}_blocks.{i}."
        layer, _, kind = rest.rpartition(".")
        if fused := (_IN_SINGLE if single else _IN_DOUBLE).get(layer):
            bfl, index = fused
            if single:  # q, k, v of width d, then the MLP input (4d)
                rows = fused_rows([hidden, hidden, hidden, 4 * hidden])[index]
                return Piece(f"{block}{bfl}.{kind}", rows=(rows.start, rows.stop))
            return Piece(f"{block}{bfl}.{kind}", part=(index, len(DOUBLE_FUSED[bfl])))
        found = _renamed(rest, _SINGLE if single else _DOUBLE)
        return key if found is None else block + found
    return _renamed(key, _TOP) or key


def _layers(header: Header, pattern: str) -> int:
    found = {int(m.group(1)) for k in header if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


#: Header keys that tell the transformer's sizes: (BFL name, diffusers name).
_SIZES = {
    "embed": ("img_in.weight", "x_embedder.weight"),
    "q_norm": (
        "double_blocks.0.img_attn.norm.query_norm.scale",
        "transformer_blocks.0.attn.norm_q.weight",
    ),
    "out": ("final_layer.linear.weight", "proj_out.weight"),
    "context": ("txt_in.weight", "context_embedder.weight"),
    "pooled": ("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight"),
    "guidance": (
        "guidance_in.in_layer.weight",
        "time_text_embed.guidance_embedder.linear_1.weight",
    ),
    "double": ("double_blocks", "transformer_blocks"),
    "single": ("single_blocks", "single_transformer_blocks"),
}


def _inferred(header: Header, prefix: str, bfl: bool, shipped: dict) -> dict:
    """The transformer config the header implies: width and channels from the embeddings, head
    width from a q-norm scale, depths, and whether guidance is an input."""
    key = {what: prefix + names[0 if bfl else 1] for what, names in _SIZES.items()}
    hidden, channels = header[key["embed"]][1]
    head = header[key["q_norm"]][1][0]
    return {
        **shipped,
        "in_channels": channels,
        "out_channels": header[key["out"]][1][0],
        "num_attention_heads": hidden // head,
        "attention_head_dim": head,
        "num_layers": _layers(header, rf"{re.escape(key['double'])}\.(\d+)\."),
        "num_single_layers": _layers(header, rf"{re.escape(key['single'])}\.(\d+)\."),
        "guidance_embeds": key["guidance"] in header,
        "joint_attention_dim": header[key["context"]][1][1],
        "pooled_projection_dim": header[key["pooled"]][1][1],
    }


def _folder(path: Path, config: Path | None, dev: bool) -> Path:
    """The diffusers FLUX.1 folder the file's other parts come from, or a one-line error."""
    repo = f"black-forest-labs/FLUX.1-{'dev' if dev else 'schnell'}"
    folder = config if config is not None else cached_snapshot(repo)
    needed = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    if folder is None or not all((folder / p).is_dir() for p in needed):
        where = f"config folder {config}" if config is not None else f"no cached {repo}"
        raise CheckpointError(
            f"{path.name} holds a Flux transformer alone ({where} gives the rest): give "
            f"config=DIR (--config), a diffusers FLUX.1 folder with {', '.join(needed)}/ "
            "(and scheduler/) — destatic never downloads"
        )
    return folder


#: The prefixes of a whole checkpoint (ComfyUI's "checkpoint" saves): VAE, CLIP-L and T5 too.
_PARTS = ("first_stage_model.", "text_encoders.clip_l.", "text_encoders.t5xxl.")


def _parts_from_file(
    path: Path, header: Header, config: Path | None, tokenizer: Path | None, length: int
) -> tuple[AutoencoderKL, FluxTextEncoder]:
    """The autoencoder and text encoders a whole checkpoint holds beside the transformer."""
    cfg = configs("flux_parts", config)
    what = f"{path.name} (Flux)"
    clip_dir = find_tokenizer(what, tokenizer, config, cfg["tokenizer"])
    t5_dir = find_tokenizer(what, tokenizer, config, cfg["tokenizer_2"], "tokenizer_2", "T5")
    names = clip_names(header, "text_encoders.clip_l.transformer.")
    clip = clip_from_file(path, header, cfg["text_encoder"], names, "CLIP-L")
    t5, t5_tokenizer = t5_from_file(path, header, cfg["text_encoder_2"], t5_dir)
    encoder = FluxTextEncoder(
        CLIPTextEncoder(clip, clip_tokenizer(clip_dir)), t5, t5_tokenizer, length
    )
    return vae_from_file(path, header, cfg["vae"]), encoder


def _loader(bfl: bool) -> Callable[..., tuple[Components, Family]]:
    def load(
        path: Path, header: Header, config: Path | None, tokenizer: Path | None
    ) -> tuple[Components, Family]:
        prefix = _COMFY if bfl and any(k.startswith(_COMFY) for k in header) else ""
        dev = prefix + _SIZES["guidance"][0 if bfl else 1] in header
        whole = all(any(k.startswith(p) for k in header) for p in _PARTS)
        folder = config if whole else _folder(path, config, dev)
        cfg = configs("flux_dev" if dev else "flux_schnell", folder)
        if folder is None or not (folder / "transformer" / "config.json").is_file():
            cfg["transformer"] = _inferred(header, prefix, bfl, cfg["transformer"])
        try:
            flux_config = FluxConfig.from_diffusers(cfg["transformer"])
        except ValueError as e:
            raise CheckpointError(
                f"{path.name}: no Flux transformer config fits this file ({e}); give config=DIR "
                "with transformer/config.json"
            ) from e
        hidden = flux_config.hidden_size
        name = (lambda k: prefixed(prefix, bfl_name(k, hidden))) if bfl else (lambda k: k)
        network = fill(lambda: Flux(flux_config), path, header, name, "Flux transformer")
        length = 512 if dev else 256  # T5 tokens, as diffusers' FluxPipeline
        if whole:
            vae, encoder = _parts_from_file(path, header, config, tokenizer, length)
        else:
            encoder = FluxTextEncoder.from_folders(folder, max_sequence_length=length)
            vae = load_component(folder / "vae", "AutoencoderKL")
        process, target = process_from_scheduler_config(cfg["scheduler"])
        defaults = dict(scheduler_sampling_defaults(cfg["scheduler"], False))
        if not flux_config.guidance_embeds:
            defaults = {**SCHNELL_DEFAULTS, **defaults}
        return Components(network, vae, encoder, process, target, defaults), FLUX

    return load


register_single_file(
    SingleFileFormat(
        name="Flux",
        looks_for="double_blocks.0.img_attn.qkv… and single_blocks… (BFL layout, optionally "
        f"under {_COMFY})",
        matches=lambda h: any(f"{p}double_blocks.0.img_attn.qkv.weight" in h for p in ("", _COMFY)),
        load=_loader(bfl=True),
    )
)
register_single_file(
    SingleFileFormat(
        name="Flux (diffusers names)",
        looks_for="single_transformer_blocks.0.proj_mlp… (a diffusers FluxTransformer2DModel)",
        matches=lambda h: "single_transformer_blocks.0.proj_mlp.weight" in h,
        load=_loader(bfl=False),
    )
)
