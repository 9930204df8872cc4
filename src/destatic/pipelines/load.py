"""Pipelines from and to folders in the diffusers layout (``model_index.json`` and one
sub-folder per component, safetensors weights; nothing is downloaded).

``load(path)`` asks the family registry (:mod:`destatic.pipelines.families`) which family the
folder is — destatic's own models or one saved by diffusers (SD 1.x/2.x, SDXL, SD3, Flux, DiT,
PixArt-α/Σ) — and lets it load the components. ``save(pipeline, path)`` writes any of them back
in that layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from destatic.bundled import resolve
from destatic.io import read_model_index
from destatic.io.hub_cache import is_repo_id, resolve_repo_id
from destatic.models.registry import save_component, saved_as
from destatic.pipelines.families import TOKENS, family_of
from destatic.pipelines.families.animatediff import animate
from destatic.pipelines.pipeline import Pipeline
from destatic.pipelines.single_file import load_single_file, load_vae
from destatic.pipelines.tokens import TokenPipeline, load_tokens, save_tokens
from destatic.process.schedulers import scheduler_config_from_process

__all__ = ["load", "save"]


def load(
    path: str | os.PathLike | None = None,
    *,
    vae: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    motion_adapter: str | os.PathLike | None = None,
) -> Pipeline | TokenPipeline:
    """A :class:`Pipeline` from a destatic or diffusers-layout folder on disk, a bundled model
    by name (:mod:`destatic.bundled`), a repo id in the local Hugging Face cache
    (:mod:`destatic.io.hub_cache`; never downloaded) or a single ``.safetensors`` checkpoint
    (:mod:`destatic.pipelines.single_file`; ``config``: a diffusers folder with its configs,
    ``tokenizer``: a tokenizer folder); ``None``: the bundled default model. The folder's
    family (:mod:`destatic.pipelines.families`) loads its components. ``vae``: another
    autoencoder (a ``vae/`` folder or a ``.safetensors`` file) in place of the model's.
    ``motion_adapter``: a diffusers ``MotionAdapter`` folder whose motion modules animate an SD
    1.x U-Net (:func:`~destatic.pipelines.families.animatediff.animate`): the pipeline then
    draws clips as diffusers' ``AnimateDiffPipeline``. A token model's folder
    (``DestaticTokenPipeline``) loads as a :class:`~destatic.pipelines.tokens.TokenPipeline`."""
    folder = _locate(path)
    if folder.is_file():
        c, family = load_single_file(
            folder, config=None if config is None else _locate(config), tokenizer=tokenizer
        )
    else:
        index = read_model_index(folder)
        family = family_of(folder, index)
        if family is TOKENS:
            return _load_tokens(folder, index, vae=vae, motion_adapter=motion_adapter)
        c = family.load(folder, index)
    if vae is not None:
        c.autoencoder = load_vae(_locate(vae), c.autoencoder)
    if motion_adapter is not None:
        c.network, family = animate(c.network, family, _locate(motion_adapter))
    return Pipeline(
        c.network, c.autoencoder, c.text_encoder, c.process, c.target, c.defaults, family, c.extras
    )


def _load_tokens(folder: Path, index: dict, **sources) -> TokenPipeline:
    """A token model's folder; ``vae`` and ``motion_adapter`` are one line (they swap parts of
    a diffusion model)."""
    given = [name for name, value in sources.items() if value is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ValueError(
            f"{flag} swaps a part of a diffusion model; {folder} is a token model (a VQ "
            "tokenizer and a token transformer): drop it"
        )
    return load_tokens(folder, index, lambda name: load(name))


def _locate(path: str | os.PathLike | None) -> Path:
    """A bundled name, an existing path, or a repo id found in the local Hugging Face cache."""
    found = resolve(path)
    if not found.exists() and is_repo_id(found):
        return resolve_repo_id(str(found))
    return found


def save(
    pipeline: Pipeline | TokenPipeline, path: str | os.PathLike, *, half: bool = False
) -> None:
    """Write ``pipeline`` in the diffusers layout (``half``: fp16 weights of the network and
    autoencoder). Each network saves under its folder and class name
    (:data:`~destatic.models.registry.SAVED_AS`), the text encoder as its family writes it
    (:attr:`Family.save_text_encoder <destatic.pipelines.families.Family>`). A family that is a
    diffusers pipeline (:attr:`Family.diffusers_pipeline`: DiT, PixArt) saves a folder that
    diffusers' ``from_pretrained`` loads too; the others save a ``DestaticPipeline``, and a
    token model a ``DestaticTokenPipeline`` (:func:`~destatic.pipelines.tokens.save_tokens`)."""
    import torch

    if isinstance(pipeline, TokenPipeline):
        save_tokens(pipeline, path, half=half)
        return

    network_key = saved_as(pipeline.network)[0]  # an unsavable network fails before writing
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    entries = pipeline.family.save_text_encoder(pipeline.text_encoder, folder)
    dtype = torch.float16 if half else None
    diffusers_class = pipeline.family.diffusers_pipeline
    library = "destatic" if diffusers_class is None else "diffusers"
    index = {"_class_name": diffusers_class or "DestaticPipeline", "vae": [None, None]}
    parts = [(network_key, pipeline.network), ("vae", pipeline.autoencoder)]
    for key, module in [*parts, *pipeline.extras.items()]:
        if module is None:
            continue
        if hasattr(module, "save_pretrained"):  # a transformers model (AudioLDM's vocoder)
            module.save_pretrained(folder / key, safe_serialization=True)
            index[key] = ["transformers", type(module).__name__]
            continue
        name = saved_as(module)[1]
        config = module.config.to_dict()
        save_component(module, folder / key, class_name=name, config=config, dtype=dtype)
        index[key] = [library, name]
    scheduler = _save_scheduler(pipeline, folder, entries, diffusers_class is not None)
    index["scheduler"] = ["diffusers", scheduler]
    index.update(entries)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _save_scheduler(pipeline: Pipeline, folder: Path, entries: dict, vp_state: bool) -> str:
    """Write ``scheduler/scheduler_config.json`` from the pipeline's process and target (a
    consistency model's settings and stored defaults go into ``entries``); its class name.

    ``vp_state`` (a folder for a diffusers pipeline): a VP schedule saves as
    ``DPMSolverMultistepScheduler``, not Euler — a scheduler on the VP state, which
    ``DiTPipeline`` needs (it steps from the input it scaled for the network, right only where
    that scaling is the identity), and the family's default sampler (``dpmpp_2m``)."""
    from destatic.process import ConsistencyTarget

    target = pipeline.target
    if isinstance(target, ConsistencyTarget):
        entries["destatic_consistency"] = {"sigma_data": target.sigma_data, "scale": target.scale}
        target = target.base
    if pipeline.defaults:
        entries["destatic_defaults"] = dict(pipeline.defaults)
    scheduler = scheduler_config_from_process(pipeline.process, target)
    if vp_state and scheduler["_class_name"] == "EulerDiscreteScheduler":
        del scheduler["interpolation_type"]  # Euler's alone
        scheduler["_class_name"] = "DPMSolverMultistepScheduler"
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    return scheduler["_class_name"]
