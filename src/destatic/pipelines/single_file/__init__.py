"""Single-file checkpoints as AUTOMATIC1111 and ComfyUI users download them (one
``model.safetensors``): each format is one :class:`SingleFileFormat` in
:data:`SINGLE_FILE_FORMATS`, told from the file's header alone (tensor names and shapes; no
tensor is read before it is recognised), one module each:

* :mod:`.sd` — Stable Diffusion 1.x (CLIP ViT-L) and 2.x (OpenCLIP ViT-H, fused q/k/v split)
  in the original LDM names, and their inpainting U-Nets (9 input channels); a standalone VAE;
* :mod:`.sdxl` — SDXL base and refiner in the original SGM names (``conditioner.embedders.…``);
* :mod:`.sd3` — SD3 / SD3.5 in Stability AI's names (MMDiT, CLIP-L, CLIP-G, optional T5);
* :mod:`.flux` — a FLUX.1 transformer in BFL's names (bare or ComfyUI's
  ``model.diffusion_model.``) or diffusers' names, the rest from ``config=``; or a whole
  ComfyUI checkpoint with its VAE, CLIP-L and T5.

Networks are built weightless (meta device) and take the file's tensors as their own: nothing
is randomly initialised first.

Architectures come from small JSON configs shipped in ``destatic/pipelines/families/configs/``
(no weights), or from a diffusers-layout ``config=`` folder (``unet/config.json``,
``transformer/config.json``, ``vae/config.json``, ``text_encoder*/config.json``, tokenizers,
``scheduler/scheduler_config.json``; each part it has overrides the shipped one), as diffusers'
``from_single_file(config=...)``. Parameter names are mapped by functions from *our* key to the
file's (:mod:`destatic.models.ldm_keys`, diffusers' converters read backwards), so every
parameter the network needs is found or named as missing.

Tokenizers are never downloaded: ``tokenizer=`` (a folder; for SDXL, SD3 and Flux with
``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``), the ``config=`` folder's, or a copy in the
local Hugging Face cache; otherwise one line says what is missing and how to provide it. A
2.x file does not say whether it predicts ε or v: as diffusers' single-file rule, it is v (the
768-px models); a 512-px ε model (2-1-base) needs ``config=`` with its scheduler config.
"""

# the formats register in this order (the first that matches a header wins; errors list them so)
from destatic.pipelines.single_file import sd  # noqa: F401

# isort: split
from destatic.pipelines.single_file import sdxl  # noqa: F401

# isort: split
from destatic.pipelines.single_file import sd3  # noqa: F401

# isort: split
from destatic.pipelines.single_file import flux  # noqa: F401

# isort: split
from destatic.pipelines.single_file.common import (
    CONFIGS,
    SINGLE_FILE_FORMATS,
    Piece,
    SingleFileFormat,
    load_single_file,
    register_single_file,
    single_file_state,
)
from destatic.pipelines.single_file.sd import load_vae

__all__ = [
    "CONFIGS",
    "SINGLE_FILE_FORMATS",
    "Piece",
    "SingleFileFormat",
    "load_single_file",
    "load_vae",
    "register_single_file",
    "single_file_state",
]
