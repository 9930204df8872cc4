"""Flux LoRAs on destatic's Flux: diffusers' peft layout (``FluxPipeline.save_lora_weights``,
``transformer.`` prefix, alpha in the header) and Black Forest Labs' layout as kohya writes it
(``lora_unet_double_blocks_0_img_attn_qkv``: fused q/k/v, a single block's fused
q/k/v/MLP), each giving diffusers' FluxPipeline image after ``load_lora_weights``."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import destatic
from destatic.models.lora import LoraError, match_lora
from tests.test_pipeline_flux import PROMPT, SIZE, _noise, _packed, flux_pipeline

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

RANK, ALPHA = 4, 2.0
RUN = {"steps": 4, "guidance": 3.5}


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """(folder of a tiny random Flux dev, a function giving a fresh diffusers FluxPipeline)."""
    tmp = tmp_path_factory.mktemp("flux_lora")
    flux_pipeline(tmp, True).save_pretrained(tmp / "pipeline", safe_serialization=True)

    def reference():
        pipe = diffusers.FluxPipeline.from_pretrained(tmp / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return tmp / "pipeline", reference


def _linears(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {k: m for k, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def _theirs(pipe, z: torch.Tensor, scale: float | None = None) -> np.ndarray:
    kwargs = {} if scale is None else {"joint_attention_kwargs": {"scale": scale}}
    out = pipe(
        PROMPT,
        num_inference_steps=4,
        guidance_scale=3.5,
        latents=_packed(z),
        max_sequence_length=512,
        output_type="np",
        **SIZE,
        **kwargs,
    )
    return out.images


def _ours(pipe, z: torch.Tensor, loras: list) -> np.ndarray:
    image = pipe.generate(PROMPT, noise=z, loras=loras, **RUN, **SIZE)
    return image.permute(0, 2, 3, 1).numpy()


def test_diffusers_format_flux_lora_same_image_as_flux_pipeline(dev, tmp_path):
    folder, reference = dev
    theirs = reference()
    g = torch.Generator().manual_seed(11)
    targets = _linears(theirs.transformer)  # every linear layer, blocks and outside
    state = {}
    for path, layer in targets.items():
        state[f"{path}.lora_A.weight"] = torch.randn(RANK, layer.in_features, generator=g) * 0.3
        state[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=g) * 0.3
    meta = {"r": RANK, "lora_alpha": ALPHA, "target_modules": sorted(targets)}
    diffusers.FluxPipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=state, transformer_lora_adapter_metadata=meta
    )
    z = _noise(3)
    plain = _theirs(theirs, z)
    theirs.load_lora_weights(tmp_path / "lora")
    expected = _theirs(theirs, z)
    ours = destatic.load(folder)
    got = _ours(ours, z, [[str(tmp_path / "lora"), 1.0]])
    assert got.shape == expected.shape and np.abs(expected - plain).max() > 0.02
    diff = np.abs(got - expected).max()
    print(f"flux diffusers-format lora: max abs diff {diff:.2e}")
    assert diff <= 1e-5, diff
    # the alpha in the header counts (α/r = 0.5) and the scale is diffusers' scale
    half = _ours(ours, z, [[str(tmp_path / "lora"), 0.5]])
    assert np.abs(half - _theirs(theirs, z, scale=0.5)).max() <= 1e-5
    assert np.abs(_ours(ours, z, [[str(tmp_path / "lora"), 0.0]]) - plain).max() <= 1e-5


def _kohya_names(flux) -> dict[str, tuple[int, int]]:
    """BFL layer name → (in, out) of the tiny Flux (its fused layers' summed outputs)."""
    d = flux.config.hidden_size
    names = {"img_in": (16, d), "txt_in": (32, d), "final_layer_linear": (d, 16)}
    names["final_layer_adaLN_modulation_1"] = (d, 2 * d)
    for io in ("time_in", "guidance_in"):
        names[f"{io}_in_layer"], names[f"{io}_out_layer"] = (256, d), (d, d)
    names["vector_in_in_layer"], names["vector_in_out_layer"] = (32, d), (d, d)
    for i in range(len(flux.transformer_blocks)):
        for side in ("img", "txt"):
            at = f"double_blocks_{i}_{side}"
            names[f"{at}_attn_qkv"], names[f"{at}_attn_proj"] = (d, 3 * d), (d, d)
            names[f"{at}_mlp_0"], names[f"{at}_mlp_2"] = (d, 4 * d), (4 * d, d)
            names[f"{at}_mod_lin"] = (d, 6 * d)
    for i in range(len(flux.single_transformer_blocks)):
        names[f"single_blocks_{i}_linear1"] = (d, 3 * d + 4 * d)
        names[f"single_blocks_{i}_linear2"] = (d + 4 * d, d)
        names[f"single_blocks_{i}_modulation_lin"] = (d, 3 * d)
    return names


def _kohya_file(flux) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    state = {}
    for name, (fan_in, fan_out) in _kohya_names(flux).items():
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(RANK, fan_in, generator=g) * 0.3
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(fan_out, RANK, generator=g) * 0.3
        if not name.startswith("final_layer"):  # diffusers' converter ignores these alphas
            state[f"lora_unet_{name}.alpha"] = torch.tensor(ALPHA)
    return state


def _as_diffusers(kohya: dict[str, torch.Tensor], flux) -> dict[str, torch.Tensor]:
    """diffusers' own converter for all but the single blocks' ``linear1`` (it assumes
    FLUX.1's widths there); that one split here: the same A, B by rows q, k, v, MLP."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    d, out = flux.config.hidden_size, {}
    rest = {k: v for k, v in kohya.items() if "_linear1." not in k}
    for i in range(len(flux.single_transformer_blocks)):
        at = f"lora_unet_single_blocks_{i}_linear1"
        down = kohya[f"{at}.lora_down.weight"] * ALPHA / RANK
        ups = kohya[f"{at}.lora_up.weight"].split([d, d, d, 4 * d])
        block = f"transformer.single_transformer_blocks.{i}"
        for name, up in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ups, strict=True):
            out[f"{block}.{name}.lora_A.weight"] = down
            out[f"{block}.{name}.lora_B.weight"] = up.contiguous()
    for k, v in _convert_kohya_flux_lora_to_diffusers(rest).items():
        out[k if k.startswith("transformer.") else "transformer." + k] = v
    return out


def test_kohya_bfl_flux_lora_same_image_as_flux_pipeline(dev, tmp_path):
    folder, reference = dev
    ours = destatic.load(folder)
    kohya = _kohya_file(ours.network)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    theirs = reference()
    z = _noise(4)
    plain = _theirs(theirs, z)
    theirs.load_lora_weights(_as_diffusers(kohya, ours.network))
    expected = _theirs(theirs, z)
    got = _ours(ours, z, [[str(tmp_path / "kohya.safetensors"), 1.0]])
    assert np.abs(expected - plain).max() > 0.02
    diff = np.abs(got - expected).max()
    print(f"flux kohya/BFL lora: max abs diff {diff:.2e}")
    assert diff <= 1e-5, diff


def test_bfl_dotted_names_and_wrong_widths(dev):
    """ComfyUI's dotted BFL names read as kohya's; a LoRA of another width is one line."""
    ours = destatic.load(dev[0])
    kohya = _kohya_file(ours.network)
    flat = match_lora(ours.network, kohya)
    dotted = {}
    for k, v in kohya.items():
        stem, _, suffix = k.removeprefix("lora_unet_").partition(".")
        for bfl in ("double_blocks_", "single_blocks_"):
            if stem.startswith(bfl):  # double_blocks.0.img_attn.qkv
                i, _, rest = stem.removeprefix(bfl).partition("_")
                stem = f"{bfl[:-1]}.{i}.{rest.replace('_', '.', 1)}"
        dotted[f"diffusion_model.{stem}.{suffix}"] = v
    assert set(match_lora(ours.network, dotted)) == set(flat)
    assert len(flat) == len(_linears(ours.network))  # every linear layer of the tiny Flux
    qkv = flat["transformer_blocks.1.attn.to_k"]
    d = ours.network.config.hidden_size
    up = kohya["lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight"]
    torch.testing.assert_close(qkv.up, up[d : 2 * d])
    assert qkv.alpha == ALPHA
    bad = dict(kohya)
    bad["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.zeros(3 * d + 3, RANK)
    with pytest.raises(LoraError, match="another Flux model") as e:
        match_lora(ours.network, bad)
    assert "\n" not in str(e.value)


def test_a_top_level_layer_does_not_take_the_nested_ones(dev):
    """``proj_out`` (the final layer) and ``single_transformer_blocks.0.proj_out`` with their own
    rank and alpha: each gets its own, and the other single block's ``proj_out`` none (peft
    would match a bare ``proj_out`` pattern after any dot)."""
    from destatic.models.lora import load_lora
    from destatic.models.lora.adapter import tuner_layers

    ours = destatic.load(dev[0])
    d = ours.network.config.hidden_size
    g = torch.Generator().manual_seed(5)
    state = {
        "transformer.proj_out.lora_A.weight": torch.randn(2, d, generator=g),
        "transformer.proj_out.lora_B.weight": torch.randn(16, 2, generator=g),
        "transformer.proj_out.alpha": torch.tensor(1.0),
        "transformer.single_transformer_blocks.0.proj_out.lora_A.weight": torch.randn(4, 5 * d),
        "transformer.single_transformer_blocks.0.proj_out.lora_B.weight": torch.randn(d, 4),
        "transformer.single_transformer_blocks.0.proj_out.alpha": torch.tensor(8.0),
        "transformer.single_transformer_blocks.1.proj_out.lora_A.weight": torch.randn(4, 5 * d),
        "transformer.single_transformer_blocks.1.proj_out.lora_B.weight": torch.randn(d, 4),
        "transformer.single_transformer_blocks.1.proj_out.alpha": torch.tensor(8.0),
    }
    name = load_lora(ours.network, state)
    scaling = {p: (layer.r[name], layer.scaling[name]) for p, layer in tuner_layers(ours.network)}
    assert scaling["proj_out"] == (2, 0.5)
    assert scaling["single_transformer_blocks.0.proj_out"] == (4, 2.0)
    del state["transformer.single_transformer_blocks.1.proj_out.lora_A.weight"]
    del state["transformer.single_transformer_blocks.1.proj_out.lora_B.weight"]
    del state["transformer.single_transformer_blocks.1.proj_out.alpha"]
    # a second adapter on two of the three layers
    other = load_lora(ours.network, state)
    adapted = {p for p, layer in tuner_layers(ours.network) if other in layer.lora_A}
    assert adapted == {"proj_out", "single_transformer_blocks.0.proj_out"}
