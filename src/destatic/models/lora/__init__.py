"""LoRA adapters on destatic models (U-Net, MMDiT, ControlNet), through peft.

LoRA (Hu et al. 2021) keeps a pretrained weight ``W`` frozen and learns a low-rank change:

    W' = W + s·(α/r)·B·A,      A: [r, in] (``lora_A``, kohya's ``lora_down``),
                               B: [out, r] (``lora_B``, kohya's ``lora_up``),

with rank ``r``, ``alpha`` α (α/r keeps the learning rate meaningful across ranks) and a
generation-time scale ``s``.

Adapters are never merged into the weights: a layer computes ``W·x + Σ s_k·(α_k/r_k)·B_k·A_k·x``
over the adapters with a non-zero scale, and with none it calls the original layer alone. So
scale 0 reproduces the base model bit for bit, and :func:`unload_lora` gives back the original
modules with their untouched weights.

* :mod:`~destatic.models.lora.adapter`: the adapter at run time (add, scale, unload);
* :mod:`~destatic.models.lora.files`: adapter files, saved and loaded;
* :mod:`~destatic.models.lora.translate`: other tools' key layouts, matched to the model;
* :mod:`~destatic.models.lora.weights`: an adapter's weights as a module, for training.
"""

from destatic.models.lora.adapter import (
    DEFAULT_TARGETS,
    LoraError,
    LoraSpec,
    LoraWeights,
    add_lora,
    lora_scales,
    model_prefix,
    set_lora_scale,
    unload_lora,
)
from destatic.models.lora.adapter import tuner_layers as _tuner_layers  # noqa: F401
from destatic.models.lora.files import (
    CONFIG_NAME,  # noqa: F401
    WEIGHTS_NAME,  # noqa: F401
    adapter_state_dict,
    load_lora,
    read_lora_file,
    save_lora,
)
from destatic.models.lora.translate import (
    LoraKeyError,
    _ldm_names,  # noqa: F401
    match_lora,
)
from destatic.models.lora.weights import AdapterWeights, applied

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterWeights",
    "LoraError",
    "LoraKeyError",
    "LoraSpec",
    "LoraWeights",
    "adapter_state_dict",
    "add_lora",
    "applied",
    "load_lora",
    "lora_scales",
    "match_lora",
    "model_prefix",
    "read_lora_file",
    "save_lora",
    "set_lora_scale",
    "unload_lora",
]

# Also here, outside __all__ as in the single module before the split: the file names
# WEIGHTS_NAME and CONFIG_NAME, and _tuner_layers and _ldm_names, which the tests call.
