"""LoRA adapters (destatic.models.lora) and LoRA / DreamBooth training (train.task = "lora").

Exactness (scale 0, unload, save → load), the file layouts against diffusers itself (kohya,
diffusers' old processor layout, our peft layout read by diffusers), clear errors, the pipeline
and command-line API, and training: only the adapter is checkpointed, resume is exact, DreamBooth
caches its class images, and a short run moves generations toward the training images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from destatic.models import lora
from destatic.models.unet import UNet2DCondition, UNetConfig
from tests import tiny_sd
from tests.training_fixtures import PIXEL_UNET

diffusers = pytest.importorskip("diffusers")

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
PATHS = (
    TO_Q,
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.proj_in",  # a 1×1 convolution in SD 1.x
)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def reference():
    """A tiny diffusers U-Net, perturbed so no branch is an identity."""
    torch.manual_seed(0)
    return tiny_sd.perturb(diffusers.UNet2DConditionModel(**dict(tiny_sd.UNET, sample_size=8)))


def ours(reference) -> UNet2DCondition:
    net = UNet2DCondition(UNetConfig.from_diffusers(dict(reference.config)))
    net.load_state_dict(reference.state_dict(), strict=True)
    return net.eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10.0, 500.0]),
        torch.randn(2, 5, 32, generator=g),
    )


@torch.no_grad()
def run(net: nn.Module) -> torch.Tensor:
    x, t, ctx = inputs()
    return net(x, t, ctx)


def randomise(net: nn.Module, name: str, std: float = 0.2, seed: int = 0) -> None:
    """Give an adapter non-zero B (a fresh one is exactly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora._tuner_layers(net):
            if name in layer.lora_B:
                w = layer.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g) * std)


def kohya_file(reference, path: Path, *, names=None, rank: int = 4, alpha: float = 2.0) -> dict:
    """A kohya-format LoRA for PATHS (module path → (down, up) returned)."""
    g = torch.Generator().manual_seed(3)
    modules = dict(ours(reference).named_modules())
    tensors, parts = {}, {}
    for p in PATHS:
        m = modules[p]
        if isinstance(m, nn.Conv2d):
            down = torch.randn(rank, m.in_channels, 1, 1, generator=g) * 0.3
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * 0.3
        else:
            down = torch.randn(rank, m.in_features, generator=g) * 0.3
            up = torch.randn(m.out_features, rank, generator=g) * 0.3
        key = "lora_unet_" + (names or {}).get(p, p).replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
        parts[p] = (down, up)
    save_file(tensors, str(path))
    return parts


def linear_delta(layer: nn.Module) -> torch.Tensor:
    """The effective weight change W' − W of an adapted Linear layer, probed with the identity."""
    base = layer.get_base_layer()
    eye = torch.eye(base.in_features)
    with torch.no_grad():
        return (layer(eye) - base(eye)).T


# ----------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------


def test_scale_zero_and_unload_restore_the_base_exactly(reference):
    net = ours(reference)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    base_out = run(net)
    paths = lora.add_lora(net, lora.LoraSpec(rank=4, alpha=8), name="a")
    assert TO_Q in paths and any(p.endswith("ff.net.2") for p in paths)
    assert torch.equal(run(net), base_out)  # B = 0: a fresh adapter changes nothing
    randomise(net, "a")
    assert not torch.allclose(run(net), base_out, atol=1e-3)
    lora.set_lora_scale(net, "a", 0.0)
    assert torch.equal(run(net), base_out)  # scale 0 is bit-identical
    lora.set_lora_scale(net, "a", 1.0)
    lora.unload_lora(net)
    assert type(net.get_submodule(TO_Q)) is nn.Linear
    after = net.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(run(net), base_out)
    assert lora.lora_scales(net) == {}


def test_save_load_round_trip_is_identical(reference, tmp_path):
    net = ours(reference)
    lora.add_lora(net, lora.LoraSpec(rank=3, alpha=5, targets=("to_k", "ff.net.2")), name="s")
    randomise(net, "s")
    lora.set_lora_scale(net, "s", 0.8)
    expected = run(net)
    file = lora.save_lora(net, tmp_path / "style.safetensors", "s", base="tiny")
    config = json.loads((tmp_path / "style.json").read_text())
    assert config["rank"] == 3 and config["alpha"] == 5.0 and config["base"] == "tiny"
    assert all(p.endswith(("to_k", "ff.net.2")) for p in config["targets"])
    tensors, _ = lora.read_lora_file(file)
    assert all(
        k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors
    )
    fresh = ours(reference)
    name = lora.load_lora(fresh, file, scale=0.8)
    assert name == "style" and lora.lora_scales(fresh) == {"style": 0.8}
    assert torch.equal(run(fresh), expected)
    folder = lora.save_lora(net, tmp_path / "adapter", "s")  # folder layout
    assert folder.name == lora.WEIGHTS_NAME and (tmp_path / "adapter" / lora.CONFIG_NAME).is_file()
    other = ours(reference)
    lora.load_lora(other, tmp_path / "adapter", scale=0.8)
    assert torch.equal(run(other), expected)


def test_several_adapters_add_up_with_their_own_scales(reference):
    net = ours(reference)
    lora.add_lora(net, lora.LoraSpec(rank=2), name="a", trainable=False)
    lora.add_lora(net, lora.LoraSpec(rank=4, alpha=2, targets=("to_q",)), name="b")
    randomise(net, "a", seed=1)
    randomise(net, "b", seed=2)
    layer = net.get_submodule(TO_Q)
    lora.set_lora_scale(net, "b", 0.0)
    only_a = linear_delta(layer)
    lora.set_lora_scale(net, "a", 0.0)
    lora.set_lora_scale(net, "b", 1.0)
    only_b = linear_delta(layer)
    lora.set_lora_scale(net, "a", 0.5)
    lora.set_lora_scale(net, "b", -0.7)
    torch.testing.assert_close(linear_delta(layer), 0.5 * only_a - 0.7 * only_b)
    # "b": W' = W + s·(α/r)·B·A
    a_w, b_w = layer.lora_A["b"].weight, layer.lora_B["b"].weight
    torch.testing.assert_close(only_b, (2 / 4) * b_w @ a_w)
    assert not any(p.requires_grad for n, p in net.named_parameters() if ".a." in n)
    lora.unload_lora(net, "a")
    assert list(lora.lora_scales(net)) == ["b"]
    torch.testing.assert_close(linear_delta(layer), -0.7 * only_b)
    with pytest.raises(lora.LoraError, match="no adapter named 'a'"):
        lora.set_lora_scale(net, "a", 1.0)


def test_fused_projections_are_split_before_adapting(reference):
    from destatic.models.speedups import fuse_projections

    net = ours(reference)
    expected = run(net)
    fuse_projections(net)
    lora.add_lora(net)
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert isinstance(net.get_submodule(TO_Q), BaseTunerLayer)
    torch.testing.assert_close(run(net), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Files: kohya, diffusers' layouts, diffusers itself as the reference
# ----------------------------------------------------------------------------------------------


def test_kohya_file_loads_onto_the_right_layers_like_diffusers(reference, tmp_path):
    file = tmp_path / "kohya.safetensors"
    parts = kohya_file(reference, file, rank=4, alpha=2.0)
    net = ours(reference)
    lora.load_lora(net, file, scale=0.7, name="k")
    down, up = parts[TO_Q]
    torch.testing.assert_close(linear_delta(net.get_submodule(TO_Q)), 0.7 * (2.0 / 4) * up @ down)
    conv = net.get_submodule(PATHS[-1])  # 1×1 convolution: the same rule on its channels
    x = torch.randn(1, conv.get_base_layer().in_channels, 1, 1)
    with torch.no_grad():
        got = (conv(x) - conv.get_base_layer()(x))[0, :, 0, 0]
    down, up = parts[PATHS[-1]]
    torch.testing.assert_close(got, 0.7 * 0.5 * (up[..., 0, 0] @ down[..., 0, 0]) @ x[0, :, 0, 0])

    ref = ours(reference)  # diffusers' loader on the same file and weights
    unet = diffusers.UNet2DConditionModel(**dict(tiny_sd.UNET, sample_size=8)).eval()
    unet.load_state_dict(reference.state_dict())
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(file))[:2]
    unet.load_lora_adapter(state, network_alphas=alphas, prefix="unet", adapter_name="k")
    unet.set_adapters(["k"], weights=[0.7])
    x, t, ctx = inputs()
    with torch.no_grad():
        expected = unet(x, t, ctx).sample
    torch.testing.assert_close(run(net), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(run(ref), expected, atol=1e-3)


def test_kohya_keys_in_ldm_naming_resolve_to_the_same_layers(reference, tmp_path):
    """input_blocks / middle_block / output_blocks names (SGM, A1111) map to the same modules."""
    ldm = {
        TO_Q: "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        PATHS[1]: "middle_block.1.transformer_blocks.0.attn2.to_k",
        PATHS[2]: "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj",
        PATHS[3]: "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0",
        PATHS[4]: "input_blocks.1.1.proj_in",
    }
    kohya_file(reference, tmp_path / "diffusers_names.safetensors")
    kohya_file(reference, tmp_path / "ldm_names.safetensors", names=ldm)
    a, b = ours(reference), ours(reference)
    lora.load_lora(a, tmp_path / "diffusers_names.safetensors")
    lora.load_lora(b, tmp_path / "ldm_names.safetensors")
    assert torch.equal(run(a), run(b))
    names = lora._ldm_names(a)
    assert names["down_blocks.0.resnets.0.conv1"] == "input_blocks.1.0.in_layers.2"
    assert names["down_blocks.0.downsamplers.0.conv"] == "input_blocks.2.0.op"
    assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.1.1.conv"
    assert names["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"


def test_diffusers_processor_layout_loads_like_diffusers(reference, tmp_path):
    """diffusers' older layout (…attn1.processor.to_q_lora.down.weight, …proj_in.lora.down…;
    alpha = rank), as diffusers' own converter writes it."""
    kohya_file(reference, tmp_path / "k.safetensors")
    state = diffusers.StableDiffusionPipeline.lora_state_dict(str(tmp_path / "k.safetensors"))[0]
    assert any(".processor.to_q_lora.down.weight" in k for k in state)
    save_file(state, str(tmp_path / "old.safetensors"))
    net = ours(reference)
    lora.load_lora(net, tmp_path / "old.safetensors", scale=0.6)
    unet = diffusers.UNet2DConditionModel(**dict(tiny_sd.UNET, sample_size=8)).eval()
    unet.load_state_dict(reference.state_dict())
    unet.load_lora_adapter(dict(state), prefix="unet", adapter_name="o")
    unet.set_adapters(["o"], weights=[0.6])
    x, t, ctx = inputs()
    with torch.no_grad():
        torch.testing.assert_close(run(net), unet(x, t, ctx).sample, atol=1e-5, rtol=0)


def test_our_files_load_in_diffusers(reference, tmp_path):
    """Our layout (unet.<module>.lora_A/B + lora_adapter_metadata) is diffusers' peft layout."""
    net = ours(reference)
    lora.add_lora(net, lora.LoraSpec(rank=3, alpha=5, targets=("to_k", "ff.net.2", "proj_in")))
    randomise(net, "default")
    lora.set_lora_scale(net, "default", 0.6)
    lora.save_lora(net, tmp_path / "ours", "default")
    unet = diffusers.UNet2DConditionModel(**dict(tiny_sd.UNET, sample_size=8)).eval()
    unet.load_state_dict(reference.state_dict())
    unet.load_lora_adapter(
        str(tmp_path / "ours"), weight_name=lora.WEIGHTS_NAME, prefix="unet", adapter_name="d"
    )
    unet.set_adapters(["d"], weights=[0.6])
    x, t, ctx = inputs()
    with torch.no_grad():
        torch.testing.assert_close(run(net), unet(x, t, ctx).sample, atol=1e-5, rtol=0)


def test_keys_that_fit_no_layer_are_one_clear_error(reference, tmp_path):
    bad = {
        f"lora_unet_input_blocks_9_{i}_attn_to_q.lora_down.weight": torch.zeros(2, 8)
        for i in range(5)
    }
    bad |= {k.replace("down", "up"): torch.zeros(8, 2) for k in list(bad)}
    save_file(bad, str(tmp_path / "sdxl.safetensors"))
    net = ours(reference)
    with pytest.raises(lora.LoraKeyError) as err:
        lora.load_lora(net, tmp_path / "sdxl.safetensors")
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert message.startswith("10 of 10 LoRA keys fit no layer of this UNet2DCondition")
    assert "lora_unet_input_blocks_9_0_attn_to_q" in message and "(+7 more)" in message
    assert lora.lora_scales(net) == {} and type(net.get_submodule(TO_Q)) is nn.Linear

    wide = {  # the right name, the wrong width (another model's LoRA)
        f"unet.{TO_Q}.lora_A.weight": torch.zeros(4, 77),
        f"unet.{TO_Q}.lora_B.weight": torch.zeros(32, 4),
    }
    with pytest.raises(lora.LoraError, match="input width is 77 but the layer's is 32"):
        lora.load_lora(net, wide)
    with pytest.raises(lora.LoraError, match="does not exist"):
        lora.load_lora(net, tmp_path / "missing.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x02")
    with pytest.raises(lora.LoraError, match="safetensors only"):
        lora.load_lora(net, tmp_path / "x.ckpt")
    text = {  # text-encoder parts are skipped with a warning, the U-Net part loads
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8),
        f"lora_unet_{TO_Q.replace('.', '_')}.lora_down.weight": torch.zeros(2, 32),
        f"lora_unet_{TO_Q.replace('.', '_')}.lora_up.weight": torch.zeros(32, 2),
    }
    with pytest.warns(UserWarning, match="skipped 1 text-encoder LoRA keys"):
        lora.load_lora(net, text, name="t")


def test_mmdit_and_controlnet_take_adapters(tmp_path):
    from destatic.models.controlnet import ControlNet
    from destatic.models.mmdit import MMDiT, MMDiTConfig

    torch.manual_seed(0)
    dit = MMDiT(MMDiTConfig.from_diffusers(dict(tiny_sd.MMDIT))).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = (
        torch.randn(1, 4, 16, 16, generator=g),
        torch.randn(1, 5, 32, generator=g),
        torch.randn(1, 24, generator=g),
    )
    with torch.no_grad():
        base = dit(x, torch.tensor([300.0]), ctx, pooled)
    paths = lora.add_lora(dit)
    assert any(p.endswith("add_q_proj") for p in paths) and any("ff_context" in p for p in paths)
    randomise(dit, "default")
    lora.set_lora_scale(dit, "default", 0.0)
    with torch.no_grad():
        assert torch.equal(dit(x, torch.tensor([300.0]), ctx, pooled), base)
    lora.save_lora(dit, tmp_path / "dit.safetensors")
    assert all(
        k.startswith("transformer.") for k in lora.read_lora_file(tmp_path / "dit.safetensors")[0]
    )

    unet = UNet2DCondition(UNetConfig.from_diffusers(dict(tiny_sd.UNET, sample_size=8)))
    control = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    lora.add_lora(control)
    assert next(iter(lora.adapter_state_dict(control))).startswith("controlnet.")


# ----------------------------------------------------------------------------------------------
# Pipeline, command line, training (a tiny pixel-space pipeline with the MiniLM text encoder)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A random 16² pixel-space pipeline folder (U-Net + MiniLM, rectified flow)."""
    from destatic.models.text import MiniLMTextEncoder
    from destatic.pipelines import Pipeline, save
    from destatic.process import RectifiedFlow

    torch.manual_seed(0)
    text = MiniLMTextEncoder.from_package(max_length=8)
    config = UNetConfig.from_diffusers(dict(PIXEL_UNET, cross_attention_dim=text.dim))
    net = tiny_sd.perturb(UNet2DCondition(config), 0.02)
    folder = tmp_path_factory.mktemp("tiny") / "pipe"
    save(Pipeline(net, None, text, RectifiedFlow(), "flow"), folder)
    return folder


def test_pipeline_api_scale_zero_unload_and_several_adapters(tiny_pipeline, tmp_path):
    import destatic

    pipe = destatic.load(tiny_pipeline)
    kwargs = dict(steps=3, guidance=2.0, seed=0)
    base = pipe.generate("a red square", **kwargs)
    lora.add_lora(pipe.network, name="x")
    randomise(pipe.network, "x", std=0.5)
    lora.save_lora(pipe.network, tmp_path / "x.safetensors", "x")
    pipe.unload_lora()
    assert torch.equal(pipe.generate("a red square", **kwargs), base)
    first = pipe.load_lora(tmp_path / "x.safetensors", scale=0.8)
    second = pipe.load_lora(tmp_path / "x.safetensors", scale=0.5)
    assert pipe.loras == {"x": 0.8, "x_2": 0.5} and (first, second) == ("x", "x_2")
    both = pipe.generate("a red square", **kwargs)
    assert not torch.equal(both, base)
    pipe.set_lora_scale(first, 0.0)
    pipe.set_lora_scale(second, 0.0)
    assert torch.equal(pipe.generate("a red square", **kwargs), base)  # bit-identical
    pipe.set_lora_scale(first, 1.3)  # two copies at 0.8 + 0.5 = one at 1.3
    torch.testing.assert_close(pipe.generate("a red square", **kwargs), both, atol=1e-5, rtol=0)
    pipe.unload_lora()
    assert torch.equal(pipe.generate("a red square", **kwargs), base)


def test_cli_generate_with_lora_records_it_for_from(tiny_pipeline, tmp_path):
    from typer.testing import CliRunner

    import destatic
    from destatic.cli import app
    from destatic.pipelines import GenerationRequest

    pipe = destatic.load(tiny_pipeline)
    lora.add_lora(pipe.network)
    randomise(pipe.network, "default", std=0.5)
    lora.save_lora(pipe.network, tmp_path / "style.safetensors")
    runner = CliRunner()
    common = ["--model", str(tiny_pipeline), "--steps", "2", "--no-progress"]
    plain = runner.invoke(app, ["generate", "a red square", *common, "-o", str(tmp_path / "a.png")])
    assert plain.exit_code == 0, plain.output
    args = ["generate", "a red square", *common, "--lora", f"{tmp_path / 'style.safetensors'}:0.8"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    params = GenerationRequest.from_png(tmp_path / "b.png")
    assert params.loras == [[str(tmp_path / "style.safetensors"), 0.8]]
    assert "LoRA: style:0.8" in Image.open(tmp_path / "b.png").info["parameters"]
    again = runner.invoke(
        app,
        [
            "generate",
            "--from",
            str(tmp_path / "b.png"),
            "--no-progress",
            "-o",
            str(tmp_path / "c.png"),
        ],
    )
    assert again.exit_code == 0, again.output
    b, c = (np.asarray(Image.open(tmp_path / f)) for f in ("b.png", "c.png"))
    assert np.array_equal(b, c) and not np.array_equal(
        b, np.asarray(Image.open(tmp_path / "a.png"))
    )
    bad = runner.invoke(app, [*args[:-1], "--lora", str(tmp_path / "nope.safetensors")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def shapes(folder: Path, n: int = 3) -> Path:
    """``n`` instance images: a yellow disc on blue (no captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.zeros((24, 24, 3), np.uint8)
        a[...] = (30, 60, 200)
        yy, xx = np.mgrid[:24, :24]
        a[(yy - 12) ** 2 + (xx - 12 + i) ** 2 < 49] = (250, 220, 0)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def lora_config(tmp_path: Path, base: Path, instances: Path, out: str, extra: str = "") -> Path:
    path = tmp_path / f"{out}.toml"
    path.write_text(
        f"""
[data]
dataset = "folder"
path = "{instances}"
size = 16
caption_dropout = 0.0

[lora]
base = "{base}"
rank = 4
instance_prompt = "a sks disc"
{extra}

[objective]
kind = "flow"

[optim]
lr = 1e-2
warmup_steps = 0
weight_decay = 0.0
ema_decay = 0.9

[train]
task = "lora"
steps = 4
batch_size = 2
checkpoint_every = 2
log_every = 1
sample_every = 0
threads = 1
progress = false
tensorboard = false

[sample]
steps = 2

[output]
dir = "{tmp_path / out}"
"""
    )
    return path


def test_lora_training_checkpoints_only_the_adapter_and_resumes_exactly(tiny_pipeline, tmp_path):
    import destatic
    from destatic.training import latest_checkpoint, load_config, train
    from destatic.training.state import load_checkpoint

    instances = shapes(tmp_path / "inst")
    straight = lora_config(tmp_path, tiny_pipeline, instances, "straight")
    out = train(load_config(straight))
    assert sorted(p.name for p in out.iterdir()) == [lora.CONFIG_NAME, lora.WEIGHTS_NAME]
    state = load_checkpoint(latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    assert state["model"] and all(".lora_" in k for k in state["model"])
    # stopped after step 2 (as a killed run leaves it), then the same command resumes
    halted = lora_config(tmp_path, tiny_pipeline, instances, "halted")
    train(load_config(halted, {"train.steps": 2}))
    train(load_config(halted))
    again = load_checkpoint(latest_checkpoint(tmp_path / "halted" / "checkpoints"))
    for part in ("model", "ema"):
        assert all(torch.equal(again[part][k], state[part][k]) for k in state[part])
    # the export is the EMA adapter, and it loads onto the base
    ema = {k[len("module.") :]: v for k, v in state["ema"].items() if k.startswith("module.")}
    pipe = destatic.load(tiny_pipeline)
    base = pipe.generate("a sks disc", steps=2, seed=0)
    name = pipe.load_lora(out)
    tensors, _ = lora.read_lora_file(out)
    some = next(k for k in ema if k.endswith("lora_B.weight"))
    path = some[len("layers.") : -len(".lora_B.weight")].replace("/", ".")
    assert torch.equal(tensors[f"unet.{path}.lora_B.weight"], ema[some])
    assert not torch.equal(pipe.generate("a sks disc", steps=2, seed=0), base)
    pipe.set_lora_scale(name, 0)
    assert torch.equal(pipe.generate("a sks disc", steps=2, seed=0), base)


def test_dreambooth_caches_class_images_and_adds_the_prior_loss(tiny_pipeline, tmp_path):
    from destatic.training import load_config, train
    from destatic.training.tasks import LoraTask

    instances = shapes(tmp_path / "inst")
    extra = 'class_prompt = "a disc"\nnum_class_images = 3\nclass_steps = 2\nprior_weight = 0.5'
    path = lora_config(tmp_path, tiny_pipeline, instances, "db", extra)
    train(load_config(path, {"train.steps": 2}))
    folder = tmp_path / "db" / "class_images"
    files = sorted(folder.glob("class-*.png"))
    assert len(files) == 3
    assert json.loads((folder / "class_images.json").read_text())["prompt"] == "a disc"
    stamps = [f.stat().st_mtime_ns for f in files]
    time.sleep(0.01)
    cfg = load_config(path)
    task = LoraTask(cfg, torch.device("cpu"), progress=False)  # a second run reuses them
    assert [f.stat().st_mtime_ns for f in files] == stamps
    batch = task.draw(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert batch["prior_x0"].shape == batch["x0"].shape == (2, 3, 16, 16)
    total = task.loss(task.trainable, batch, torch.device("cpu"))
    alone = task.objective.loss(
        task.trainable,
        batch["x0"],
        task.conditioning(batch["caption"], torch.device("cpu")),
        sigma=batch["sigma"],
        noise=batch["noise"],
    )
    prior = task.objective.loss(
        task.trainable,
        batch["prior_x0"],
        task.conditioning(torch.full((2,), task.class_id), torch.device("cpu")),
        sigma=batch["prior_sigma"],
        noise=batch["prior_noise"],
    )
    torch.testing.assert_close(total, alone + 0.5 * prior, atol=1e-5, rtol=1e-5)
    changed = load_config(path, {"lora.class_prompt": "a ring"})
    LoraTask(changed, torch.device("cpu"), progress=False)  # another prompt: redrawn
    assert json.loads((folder / "class_images.json").read_text())["prompt"] == "a ring"


def test_dreambooth_config_in_configs_is_valid():
    from destatic.training import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "emoji_dreambooth.toml")
    assert cfg.train.task == "lora" and cfg.lora.class_prompt and cfg.lora.instance_prompt


def distance(images: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over generated images of the RMS pixel distance to the nearest training image."""
    d = (images[:, None] - targets[None]).pow(2).flatten(2).mean(2).sqrt()
    return float(d.min(dim=1).values.mean())


def test_a_short_lora_run_moves_generations_toward_its_images(tiny_pipeline, tmp_path):
    """Fast variant on the tiny (random) pipeline: 60 steps on three images, the adapter also on
    the convolutions (a random network's attention alone barely steers it)."""
    import destatic
    from destatic.training import load_config, train

    instances = shapes(tmp_path / "inst")
    targets = (
        torch.from_numpy(
            np.stack(
                [np.asarray(Image.open(p).resize((16, 16))) for p in sorted(instances.iterdir())]
            )
        )
        .permute(0, 3, 1, 2)
        .float()
        / 255
    )
    path = lora_config(tmp_path, tiny_pipeline, instances, "move")
    convs = ["conv_in", "conv1", "conv2", "conv_out", "proj_in", "proj_out"]
    overrides = {
        "train.steps": 60,
        "train.checkpoint_every": 60,
        "optim.ema_decay": 0.0,
        "optim.lr": 2e-2,
        "lora.targets": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", *convs],
    }
    out = train(load_config(path, overrides))
    pipe = destatic.load(tiny_pipeline)
    kwargs = dict(steps=8, guidance=1.0, seed=list(range(4)))
    before = distance(pipe.generate(["a sks disc"] * 4, **kwargs), targets)
    pipe.load_lora(out)
    after = distance(pipe.generate(["a sks disc"] * 4, **kwargs), targets)
    print(f"pixel RMS to the nearest training image {before:.3f} → {after:.3f}")
    assert after < 0.6 * before, (before, after)


@pytest.mark.slow
def test_lora_on_the_bundled_model_moves_generations_toward_its_images(tmp_path):
    """100 steps of LoRA on four emoji-sized images with the bundled model: pixel distance and
    the bundled evaluator's image features both move toward the training images."""
    import destatic
    from destatic.metrics.evaluator import load_evaluator
    from destatic.training import load_config, train

    instances = shapes(tmp_path / "inst", 4)
    targets = (
        torch.from_numpy(
            np.stack(
                [np.asarray(Image.open(p).resize((32, 32))) for p in sorted(instances.iterdir())]
            )
        )
        .permute(0, 3, 1, 2)
        .float()
        / 255
    )
    path = lora_config(tmp_path, "", instances, "bundled")
    cfg = load_config(
        path,
        {
            "data.size": 32,
            "train.steps": 100,
            "train.batch_size": 4,
            "train.checkpoint_every": 100,
            "optim.lr": 3e-3,
            "optim.ema_decay": 0.0,
            "lora.base": "",
            "lora.rank": 8,
            "objective.shift": 1.0,
        },
    )
    out = train(cfg)
    pipe = destatic.load()
    kwargs = dict(steps=20, guidance=3.0, seed=list(range(8)))
    before = pipe.generate(["a sks disc"] * 8, **kwargs)
    pipe.load_lora(out)
    after = pipe.generate(["a sks disc"] * 8, **kwargs)
    evaluator = load_evaluator()
    feats = [evaluator.image_features(x) for x in (before, after, targets)]
    centre = torch.nn.functional.normalize(feats[2].mean(0), dim=0)
    sim_before, sim_after = (float((f @ centre).mean()) for f in feats[:2])
    d_before, d_after = distance(before, targets), distance(after, targets)
    print(f"pixel RMS {d_before:.3f} → {d_after:.3f}; cosine {sim_before:.3f} → {sim_after:.3f}")
    assert d_after < 0.5 * d_before and sim_after > sim_before
