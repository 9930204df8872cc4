"""Single-file checkpoints (A1111 / ComfyUI ``model.safetensors`` in the original LDM names):
detection from the header, the LDM → diffusers key mapping (checked independently by diffusers'
own ``from_single_file`` reading the same file), the same image as the folder it came from,
repo ids from the local Hugging Face cache, a swapped VAE, and one-line errors."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import destatic
from destatic.io import CheckpointError
from destatic.models.ldm_keys import (
    ldm_unet_name,
    ldm_vae_name,
    open_clip_name,
    vae_attention_is_conv,
)
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
GEN = {"steps": 3, "sampler": "euler", "guidance": 3.0, "seed": 5, "width": 16, "height": 16}


def ldm_state(pipe, open_clip: bool = False) -> dict[str, torch.Tensor]:
    """The diffusers pipeline's weights under the LDM names of an SD 1.x single file (2.x, with
    its OpenCLIP text tower: ``open_clip``)."""
    unet, vae = pipe.unet.config, pipe.vae.config
    up = {i for i, t in enumerate(unet.up_block_types) if t.startswith("CrossAttn")}
    state = {}
    for k, v in pipe.unet.state_dict().items():
        state["model.diffusion_model." + ldm_unet_name(k, unet.layers_per_block, up)] = v
    for k, v in pipe.vae.state_dict().items():
        v = v[..., None, None] if vae_attention_is_conv(k) else v
        state["first_stage_model." + ldm_vae_name(k, len(vae.block_out_channels))] = v
    text = pipe.text_encoder.state_dict()
    if not open_clip:
        for k, v in text.items():
            state["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = v
        assert len(state) == sum(
            len(m.state_dict()) for m in (pipe.unet, pipe.vae, pipe.text_encoder)
        ), "two parameters mapped onto one LDM name"
    fused: dict[str, list] = {}
    for k, v in text.items() if open_clip else ():
        found = open_clip_name(k)
        if isinstance(found, str):
            state["cond_stage_model.model." + found] = v
        else:
            fused.setdefault("cond_stage_model.model." + found[0], [None] * 3)[found[1]] = v
    state.update({k: torch.cat(parts) for k, parts in fused.items()})
    if open_clip:  # as in real 2.x files: the projection (unused by SD)
        width = pipe.text_encoder.config.hidden_size
        state["cond_stage_model.model.text_projection"] = torch.randn(width, width)
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    """(diffusers folder, the same pipeline as one LDM-layout .safetensors file, diffusers pipe)."""
    tmp = tmp_path_factory.mktemp("single")
    unet, vae, text, tokenizer = tiny_sd.components(tmp)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp / "folder", safe_serialization=True)
    save_file(ldm_state(pipe), str(tmp / "model.safetensors"))
    return tmp / "folder", tmp / "model.safetensors", pipe


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory):
    """A tiny SD 2.x: linear attention projections, a GELU text tower in OpenCLIP names,
    v-prediction; as a diffusers folder and as one LDM-layout file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tmp = tmp_path_factory.mktemp("single2")
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        **dict(tiny_sd.UNET, sample_size=8, use_linear_projection=True, attention_head_dim=(2, 4))
    )
    vae = AutoencoderKL(**dict(tiny_sd.VAE, sample_size=16))
    tokenizer = tiny_sd.clip_tokenizer(tmp / "tokenizer_src")
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    for module in (unet, vae, text):
        tiny_sd.perturb(module).eval()
    scheduler = diffusers.DDIMScheduler(
        **SD, prediction_type="v_prediction", clip_sample=False, steps_offset=1
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp / "folder", safe_serialization=True)
    save_file(ldm_state(pipe, open_clip=True), str(tmp / "v2.safetensors"))
    return tmp / "folder", tmp / "v2.safetensors", pipe


def test_ldm_names_match_real_sd15_layout():
    """Spot checks against key names of v1-5-pruned-emaonly.safetensors."""
    up = {1, 2, 3}
    assert ldm_unet_name("down_blocks.0.resnets.1.conv1.weight", 2, up) == (
        "input_blocks.2.0.in_layers.2.weight"
    )
    assert ldm_unet_name("down_blocks.1.attentions.0.proj_in.weight", 2, up) == (
        "input_blocks.4.1.proj_in.weight"
    )
    assert ldm_unet_name("down_blocks.2.downsamplers.0.conv.bias", 2, up) == (
        "input_blocks.9.0.op.bias"
    )
    assert ldm_unet_name("up_blocks.0.upsamplers.0.conv.weight", 2, up) == (
        "output_blocks.2.1.conv.weight"
    )
    assert ldm_unet_name("up_blocks.1.upsamplers.0.conv.weight", 2, up) == (
        "output_blocks.5.2.conv.weight"
    )
    assert ldm_unet_name("up_blocks.3.resnets.2.conv_shortcut.weight", 2, up) == (
        "output_blocks.11.0.skip_connection.weight"
    )
    assert ldm_unet_name("mid_block.resnets.1.time_emb_proj.bias", 2, up) == (
        "middle_block.2.emb_layers.1.bias"
    )
    assert ldm_vae_name("decoder.up_blocks.0.upsamplers.0.conv.weight", 4) == (
        "decoder.up.3.upsample.conv.weight"
    )
    assert ldm_vae_name("encoder.mid_block.attentions.0.to_out.0.bias", 4) == (
        "encoder.mid.attn_1.proj_out.bias"
    )
    assert ldm_vae_name("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", 4) == (
        "encoder.down.1.block.0.nin_shortcut.weight"
    )
    assert ldm_vae_name("decoder.conv_norm_out.weight", 4) == "decoder.norm_out.weight"


def test_diffusers_reads_our_ldm_file_back(sd_file):
    """The LDM file written with our mapping, read by diffusers' own converter, holds exactly
    the original weights: the mapping is checked independently of destatic's loader."""
    folder, file, pipe = sd_file
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        str(file), config=str(folder), local_files_only=True, safety_checker=None
    )
    for name in ("unet", "vae", "text_encoder"):
        ref = getattr(pipe, name).state_dict()
        got = getattr(theirs, name).state_dict()
        assert set(got) == set(ref), name
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_diffusers_reads_our_sd2_file_back(sd2_file):
    folder, file, pipe = sd2_file
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        str(file), config=str(folder), local_files_only=True, safety_checker=None
    )
    ref, got = pipe.text_encoder.state_dict(), theirs.text_encoder.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_sd2_single_file_draws_the_same_image_as_its_folder(sd2_file):
    folder, file, _ = sd2_file
    a = destatic.load(folder).generate("a red cat", **GEN)
    single = destatic.load(file, config=folder)
    assert single.target == "v_prediction"
    assert (a - single.generate("a red cat", **GEN)).abs().max().item() <= 1e-5


def test_single_file_draws_the_same_image_as_its_folder(sd_file):
    folder, file, _ = sd_file
    a = destatic.load(folder).generate("a red cat", **GEN)
    single = destatic.load(file, config=folder)
    assert single.family.name == "stable-diffusion"
    b = single.generate("a red cat", **GEN)
    assert (a - b).abs().max().item() <= 1e-5


def test_single_file_without_a_config_names_the_mismatch(sd_file, tmp_path, monkeypatch):
    """The tiny file does not fit the shipped SD 1.x config: one line, pointing at config=.
    Without any tokenizer offline the tokenizer is what is reported first."""
    folder, file, _ = sd_file
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match="CLIP tokenizer") as e:
        destatic.load(file)
    assert "\n" not in str(e.value) and "huggingface-cli download" in str(e.value)
    with pytest.raises(CheckpointError, match=r"does not fit its config.*config=") as e:
        destatic.load(file, tokenizer=folder / "tokenizer")
    assert "\n" not in str(e.value)


def test_tokenizer_from_the_local_hf_cache(sd_file, tmp_path, monkeypatch):
    folder, file, _ = sd_file
    snapshot = tmp_path / "hub/models--openai--clip-vit-large-patch14/snapshots/abc"
    snapshot.mkdir(parents=True)
    for f in (folder / "tokenizer").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs/main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    config = tmp_path / "config"
    for part in ("unet", "vae", "text_encoder"):  # configs only: the tokenizer is the cache's
        (config / part).mkdir(parents=True)
        (config / part / "config.json").write_bytes((folder / part / "config.json").read_bytes())
    pipe = destatic.load(file, config=config)
    assert pipe.text_encoder.tokenizer.model_max_length == 77


def test_repo_id_resolves_from_the_local_cache_only(sd_file, tmp_path, monkeypatch):
    folder, _, _ = sd_file
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache") as e:
        destatic.load("someone/tiny-sd")
    assert "\n" not in str(e.value)
    snapshot = tmp_path / "hub/models--someone--tiny-sd/snapshots/0123"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(folder, target_is_directory=True)
    a = destatic.load("someone/tiny-sd").generate("a cat", **GEN)
    b = destatic.load(folder).generate("a cat", **GEN)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_standalone_vae_file_swaps_the_autoencoder(sd_file, tmp_path):
    folder, file, _ = sd_file
    torch.manual_seed(1)
    other = tiny_sd.perturb(diffusers.AutoencoderKL(**tiny_sd.VAE)).eval()
    n = len(other.config.block_out_channels)
    ldm = {
        ldm_vae_name(k, n): (v[..., None, None] if vae_attention_is_conv(k) else v).contiguous()
        for k, v in other.state_dict().items()
    }
    save_file(ldm, str(tmp_path / "vae-ft-mse.safetensors"))
    other.save_pretrained(tmp_path / "vae", safe_serialization=True)
    from_file = destatic.load(folder, vae=tmp_path / "vae-ft-mse.safetensors")
    from_folder = destatic.load(folder, vae=tmp_path / "vae")
    for k, v in other.state_dict().items():
        torch.testing.assert_close(from_file.autoencoder.state_dict()[k], v, rtol=0, atol=0)
    a = from_file.generate("a cat", **GEN)
    b = from_folder.generate("a cat", **GEN)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = destatic.load(file, config=folder, vae=tmp_path / "vae-ft-mse.safetensors")
    assert (c.generate("a cat", **GEN) - a).abs().max().item() <= 1e-5


def test_unknown_file_and_pickle_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape("looked for SD 1.x")) as e:
        destatic.load(tmp_path / "x.safetensors")
    assert "\n" not in str(e.value)
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="never unpickled"):
        destatic.load(tmp_path / "m.ckpt")
    sd2 = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
        "cond_stage_model.model.token_embedding.weight": torch.zeros(1),
    }
    save_file(sd2, str(tmp_path / "v2.safetensors"))
    with pytest.raises(CheckpointError, match=r"\(SD 2\.x\) needs a CLIP tokenizer"):
        destatic.load(tmp_path / "v2.safetensors")


def test_shipped_configs_are_package_data():
    from destatic.pipelines.single_file import CONFIGS

    cfg = json.loads((CONFIGS / "sd1.json").read_text())
    assert cfg["unet"]["cross_attention_dim"] == 768 and cfg["text_encoder"]["hidden_size"] == 768


def test_generate_cli_takes_a_single_file_config_and_vae(sd_file, tmp_path):
    from typer.testing import CliRunner

    from destatic.cli import app

    folder, file, _ = sd_file
    base = ["generate", "a cat", "--steps", "2", "--size", "16", "--device", "cpu"]
    args = [*base, "--model", str(file), "--config", str(folder), "--vae", str(folder / "vae")]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.png").is_file()
    result = CliRunner().invoke(app, [*base, "--model", "nobody/absent", "-o", str(tmp_path)])
    assert result.exit_code != 0 and "not in the local Hugging Face cache" in result.output


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_full_size_names_agree_with_diffusers_converter(name):
    """At the shipped full-size configs (2 resnets a block, 4 levels), diffusers' own LDM →
    diffusers converter takes every LDM name we give back to the parameter it came from."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from destatic.pipelines.single_file import CONFIGS

    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in cfg["unet"].items() if k[0] != "_"})
        vae = AutoencoderKL(**{k: v for k, v in cfg["vae"].items() if k[0] != "_"})
    up = {i for i, t in enumerate(cfg["unet"]["up_block_types"]) if t.startswith("CrossAttn")}
    keys = list(unet.state_dict())
    ldm = {
        "model.diffusion_model." + ldm_unet_name(k, 2, up): torch.tensor([float(i)])
        for i, k in enumerate(keys)
    }
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert {k: v.item() for k, v in back.items()} == {k: i for i, k in enumerate(keys)}
    keys = list(vae.state_dict())
    ldm = {
        "first_stage_model." + ldm_vae_name(k, 4): torch.tensor([float(i)])
        for i, k in enumerate(keys)
    }
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert {k: v.flatten()[0].item() for k, v in back.items()} == {k: i for i, k in enumerate(keys)}
