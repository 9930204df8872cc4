"""Single files beyond SD 1.x/2.x: SDXL (original SGM names), FLUX.1 transformers (BFL names,
bare or under ComfyUI's ``model.diffusion_model.``, or diffusers' names) and SD 1.x inpainting.
Each is written from a tiny diffusers folder with our name mapping, read back by diffusers' own
converter (the mapping checked independently of destatic's loader), and draws the same image as
the folder it came from."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import destatic
from destatic.io import CheckpointError
from destatic.models.autoencoder import AutoencoderConfig
from destatic.models.ldm_keys import vae_attention_is_conv
from destatic.models.unet import UNetConfig
from destatic.pipelines.single_file import CONFIGS, single_file_state
from destatic.pipelines.single_file.common import prefixed
from destatic.pipelines.single_file.flux import bfl_name
from destatic.pipelines.single_file.sd import open_clip_names, unet_names, vae_names
from destatic.pipelines.single_file.sd3 import sd3_name
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

GEN = {"steps": 3, "sampler": "euler", "guidance": 3.0, "seed": 5, "width": 16, "height": 16}


def _config(module) -> dict:
    return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}


def unet_and_vae_state(unet, vae) -> dict[str, torch.Tensor]:
    """A diffusers U-Net (if any) and autoencoder under their LDM/SGM single-file names (the
    VAE's mid-block attention as 1×1 convolutions, as in real files)."""
    state = {}
    if unet is not None:
        names = unet_names(UNetConfig.from_diffusers(_config(unet)))
        state = single_file_state(unet.state_dict(), names)
    names = vae_names(AutoencoderConfig.from_diffusers(_config(vae)), "first_stage_model.")
    for k, v in vae.state_dict().items():
        state[names(k)] = (v[..., None, None] if vae_attention_is_conv(k) else v).contiguous()
    return state


def clip_state(text, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel under ``prefix`` + ``text_model.`` (as real files)."""
    return {
        prefix + "text_model." + k.removeprefix("text_model."): v
        for k, v in text.state_dict().items()
    }


def assert_same_weights(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    ref, got = reference.state_dict(), ours.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


# --- SDXL ------------------------------------------------------------------------------------


def sdxl_state(pipe, refiner: bool = False) -> dict[str, torch.Tensor]:
    """A diffusers SDXL pipeline's weights in the original SGM layout."""
    state = unet_and_vae_state(pipe.unet, pipe.vae)
    g = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    state.update(single_file_state(pipe.text_encoder_2.state_dict(), open_clip_names(g)))
    if not refiner:
        state.update(clip_state(pipe.text_encoder, "conditioner.embedders.0.transformer."))
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


@pytest.fixture(scope="module", params=["base", "refiner"])
def sdxl_file(request, tmp_path_factory):
    from tests.test_pipeline_sdxl import _build

    refiner = request.param == "refiner"
    tmp = tmp_path_factory.mktemp(f"sdxl_{request.param}")
    folder, pipe = _build(tmp, refiner=refiner)
    save_file(sdxl_state(pipe, refiner), str(tmp / "sdxl.safetensors"))
    return folder, tmp / "sdxl.safetensors", pipe, refiner


def test_diffusers_reads_our_sdxl_file_back(sdxl_file):
    """diffusers' from_single_file reads the U-Net, VAE and CLIP-L back; CLIP-G goes through
    its OpenCLIP converter directly (its pipeline loader tells the two CLIPs apart by width,
    and the tiny ones share one)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file

    folder, file, pipe, refiner = sdxl_file
    cls = (
        diffusers.StableDiffusionXLImg2ImgPipeline
        if refiner
        else diffusers.StableDiffusionXLPipeline
    )
    theirs = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
    for name in ("unet", "vae") + (() if refiner else ("text_encoder",)):
        assert_same_weights(getattr(theirs, name), getattr(pipe, name))
    prefix = f"conditioner.embedders.{0 if refiner else 1}.model."
    clip_g = convert_open_clip_checkpoint(pipe.text_encoder_2, load_file(str(file)), prefix)
    ref = pipe.text_encoder_2.state_dict()
    assert set(clip_g) == set(ref)
    for k in ref:
        torch.testing.assert_close(clip_g[k], ref[k], rtol=0, atol=0, msg=k)


def test_sdxl_single_file_draws_the_same_image_as_its_folder(sdxl_file):
    folder, file, _, refiner = sdxl_file
    single = destatic.load(file, config=folder)
    assert single.family.name == "sdxl"
    assert single.text_encoder.requires_aesthetics_score == refiner
    kwargs = dict(GEN, negative_prompt="")
    if refiner:
        kwargs.update(image=torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
        kwargs.update(strength=0.7)
    a = destatic.load(folder).generate("a red cat", **kwargs)
    b = single.generate("a red cat", **kwargs)
    assert (a - b).abs().max().item() <= 1e-5


def test_sdxl_tokenizers_from_tokenizer_folder(sdxl_file, tmp_path, monkeypatch):
    """Configs from config=, both tokenizers from tokenizer= (tokenizer/ and tokenizer_2/);
    without tokenizer_2 anywhere offline, one line names it."""
    folder, file, _, _ = sdxl_file
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = tmp_path / "config"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if (folder / part).is_dir():
            (config / part).mkdir(parents=True)
            (config / part / "config.json").write_bytes(
                (folder / part / "config.json").read_bytes()
            )
    with pytest.raises(CheckpointError, match=r"tokenizer \(tokenizer_2/\)") as e:
        destatic.load(file, config=config)
    assert "\n" not in str(e.value)
    pipe = destatic.load(file, config=config, tokenizer=folder)
    assert pipe.text_encoder.clip_g.tokenizer.pad_token == "!"


# --- FLUX.1 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux_folder(request, tmp_path_factory):
    from tests.test_pipeline_flux import flux_pipeline

    tmp = tmp_path_factory.mktemp(f"flux_{request.param}")
    pipe = flux_pipeline(tmp, guidance_embeds=request.param == "dev")
    pipe.save_pretrained(tmp / "folder", safe_serialization=True)
    return tmp / "folder", pipe.transformer, pipe


def bfl_state(transformer, prefix: str = "") -> dict[str, torch.Tensor]:
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return single_file_state(
        transformer.state_dict(), lambda k: prefixed(prefix, bfl_name(k, hidden))
    )


FLUX_GEN = {"steps": 2, "seed": 3, "width": 32, "height": 16}


@pytest.mark.parametrize("layout", ["bfl", "comfyui", "diffusers"])
def test_flux_transformer_file_draws_the_same_image_as_its_folder(flux_folder, layout, tmp_path):
    folder, transformer, _ = flux_folder
    if layout == "diffusers":
        state = {k: v.contiguous() for k, v in transformer.state_dict().items()}
    else:
        state = bfl_state(transformer, "model.diffusion_model." if layout == "comfyui" else "")
    save_file(state, str(tmp_path / "flux1.safetensors"))
    single = destatic.load(tmp_path / "flux1.safetensors", config=folder)
    whole = destatic.load(folder)
    assert single.family.name == "flux" and single.defaults == whole.defaults
    assert_same_weights(single.network, whole.network)
    a = whole.generate("a red apple", **FLUX_GEN)
    b = single.generate("a red apple", **FLUX_GEN)
    assert (a - b).abs().max().item() <= 1e-5


def test_flux_sizes_come_from_the_header(flux_folder, tmp_path):
    """With no transformer/config.json beside the other parts, the header gives the sizes
    (depths, width, heads, guidance input); the rotary axes are FLUX.1's, so a head width
    other than FLUX.1's 128 is one line asking for the config."""
    import shutil

    folder, transformer, _ = flux_folder
    rest = tmp_path / "rest"
    shutil.copytree(folder, rest, ignore=shutil.ignore_patterns("transformer"))
    save_file(bfl_state(transformer), str(tmp_path / "tiny.safetensors"))
    with pytest.raises(CheckpointError, match=r"axes_dims_rope.*transformer/config\.json") as e:
        destatic.load(tmp_path / "tiny.safetensors", config=rest)
    assert "\n" not in str(e.value)
    torch.manual_seed(0)
    config = dict(transformer.config, num_attention_heads=1, attention_head_dim=128)
    config = {k: v for k, v in config.items() if k[0] != "_"}
    wide = diffusers.FluxTransformer2DModel(**dict(config, axes_dims_rope=(16, 56, 56)))
    save_file(bfl_state(wide, "model.diffusion_model."), str(tmp_path / "wide.safetensors"))
    single = destatic.load(tmp_path / "wide.safetensors", config=rest)
    assert_same_weights(single.network, wide)
    assert single.network.config.guidance_embeds == wide.config.guidance_embeds


def test_flux_transformer_alone_names_what_it_needs(flux_folder, tmp_path, monkeypatch):
    _, transformer, _ = flux_folder
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    save_file(bfl_state(transformer), str(tmp_path / "flux1.safetensors"))
    with pytest.raises(CheckpointError, match=r"Flux transformer alone.*config=DIR") as e:
        destatic.load(tmp_path / "flux1.safetensors")
    assert "\n" not in str(e.value)


def test_whole_flux_checkpoint_loads_every_part(flux_folder, tmp_path):
    """A ComfyUI-style whole checkpoint (transformer, VAE, CLIP-L, T5 in one file): the parts
    come from the file; the config folder lends configs and tokenizers only (no weights)."""
    import shutil

    folder, transformer, pipe = flux_folder
    state = bfl_state(transformer, "model.diffusion_model.")
    state.update(unet_and_vae_state(None, pipe.vae))
    state.update(clip_state(pipe.text_encoder, "text_encoders.clip_l.transformer."))
    t5 = "text_encoders.t5xxl.transformer."
    state.update(single_file_state(pipe.text_encoder_2.state_dict(), lambda k: t5 + k))
    save_file(state, str(tmp_path / "whole.safetensors"))
    shutil.copytree(folder, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    single = destatic.load(tmp_path / "whole.safetensors", config=tmp_path / "configs")
    assert_same_weights(single.autoencoder, destatic.load(folder).autoencoder)
    a = destatic.load(folder).generate("a red apple", **FLUX_GEN)
    b = single.generate("a red apple", **FLUX_GEN)
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["flux_dev", "flux_schnell"])
def test_full_size_flux_names_agree_with_diffusers_converter(variant):
    """At FLUX.1's full size, diffusers' BFL → diffusers converter takes the file we write from
    a state (each row numbered) back to exactly that state: our mapping is diffusers' inverse."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    cfg = json.loads((CONFIGS / f"{variant}.json").read_text())["transformer"]
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(**{k: v for k, v in cfg.items() if k[0] != "_"})
    state = numbered(model)
    file = bfl_state_from(state, cfg)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(file))
    assert set(back) == set(state)
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=0, atol=0, msg=k)


def bfl_state_from(state: dict, cfg: dict) -> dict:
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return single_file_state(
        state, lambda k: prefixed("model.diffusion_model.", bfl_name(k, hidden))
    )


# --- SD3 / SD3.5 ------------------------------------------------------------------------------


def sd3_state(pipe) -> dict[str, torch.Tensor]:
    """A diffusers SD3 pipeline's weights in Stability AI's single-file layout."""
    layers = pipe.transformer.config.num_layers
    state = single_file_state(
        pipe.transformer.state_dict(),
        lambda k: prefixed("model.diffusion_model.", sd3_name(k, layers)),
    )
    state.update(unet_and_vae_state(None, pipe.vae))
    towers = {"clip_l": pipe.text_encoder, "clip_g": pipe.text_encoder_2}
    if pipe.text_encoder_3 is not None:
        towers["t5xxl"] = pipe.text_encoder_3
    for tower, module in towers.items():
        prefix = f"text_encoders.{tower}.transformer."
        state.update(single_file_state(module.state_dict(), lambda k, p=prefix: p + k))
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def sd3_file(request, tmp_path_factory):
    """SD3 (CLIPs only) and an SD3.5-Medium-like tiny (q/k RMS norm, a second image attention
    in block 0, T5) as diffusers folders and single files."""
    tmp = tmp_path_factory.mktemp(request.param)
    pipe = tiny_sd.sd3_pipeline(tmp, seed=2)
    if request.param == "sd35":
        torch.manual_seed(3)
        mmdit = dict(tiny_sd.SD3_MMDIT, qk_norm="rms_norm", dual_attention_layers=(0,))
        transformer = tiny_sd.perturb(diffusers.SD3Transformer2DModel(**mmdit)).eval()
        t5, t5_tokenizer = tiny_sd.t5_encoder_and_tokenizer(d_model=64)
        pipe.register_modules(transformer=transformer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(tmp / "folder", safe_serialization=True)
    save_file(sd3_state(pipe), str(tmp / "sd3.safetensors"))
    return tmp / "folder", tmp / "sd3.safetensors", pipe


def test_diffusers_reads_our_sd3_file_back(sd3_file):
    folder, file, pipe = sd3_file
    for cls, sub in (
        (diffusers.SD3Transformer2DModel, "transformer"),
        (diffusers.AutoencoderKL, "vae"),
    ):
        theirs = cls.from_single_file(
            str(file), config=str(folder), subfolder=sub, local_files_only=True
        )
        assert_same_weights(theirs, getattr(pipe, sub))


def test_sd3_single_file_draws_the_same_image_as_its_folder(sd3_file, tmp_path):
    """With config=, and with configs for the text towers and VAE only (the MMDiT's sizes read
    from the header: SD3.5's head width from its q-norm)."""
    folder, file, pipe = sd3_file
    a = destatic.load(folder).generate("a red cat", **GEN)
    single = destatic.load(file, config=folder)
    assert single.family.name == "sd3"
    assert (single.text_encoder.t5 is None) == (pipe.text_encoder_3 is None)
    assert (a - single.generate("a red cat", **GEN)).abs().max().item() <= 1e-5
    if pipe.transformer.config.qk_norm:
        import shutil

        shutil.copytree(folder, tmp_path / "config", ignore=shutil.ignore_patterns("transformer"))
        inferred = destatic.load(file, config=tmp_path / "config")
        assert_same_weights(inferred.network, single.network)


@pytest.mark.parametrize(
    "mmdit",
    [{}, {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1, 2), "pos_embed_max_size": 384}],
    ids=["sd3-medium", "sd35-medium"],
)
def test_full_size_sd3_names_agree_with_diffusers_converter(mmdit):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    cfg = json.loads((CONFIGS / "sd3.json").read_text())["transformer"]
    cfg = {k: v for k, v in {**cfg, **mmdit}.items() if k[0] != "_"}
    with torch.device("meta"):
        model = diffusers.SD3Transformer2DModel(**cfg)
    state = numbered(model)
    layers = cfg["num_layers"]
    name = lambda k: prefixed("model.diffusion_model.", sd3_name(k, layers))  # noqa: E731
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(single_file_state(state, name)))
    assert set(back) == set(state)
    for k in state:
        torch.testing.assert_close(back[k].flatten(), state[k].flatten(), rtol=0, atol=0, msg=k)


def numbered(model) -> dict[str, torch.Tensor]:
    """One number per row of each of ``model``'s (meta) parameters: slices and swaps show."""
    start, state = 0, {}
    for k, v in model.state_dict().items():
        rows = v.shape[0] if v.dim() != 3 else v.shape[1]  # pos_embed: [1, N, C]
        state[k] = torch.arange(start, start + rows, dtype=torch.float64)
        start += rows
    return state


# --- SD 1.x inpainting -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def inpaint_file(request, tmp_path_factory):
    """A tiny 9-channel inpainting pipeline: SD 1.x (CLIP) or 2.x (OpenCLIP names, GELU)."""
    from tests.test_single_file import ldm_state

    tmp = tmp_path_factory.mktemp(f"inpaint_{request.param}")
    _, vae, text, tokenizer = tiny_sd.components(tmp)
    if request.param == "sd2":
        from transformers import CLIPTextModel

        text = CLIPTextModel(type(text.config)(**dict(text.config.to_dict(), hidden_act="gelu")))
        text = tiny_sd.perturb(text).eval()
    torch.manual_seed(4)
    unet = diffusers.UNet2DConditionModel(**dict(tiny_sd.UNET, sample_size=8, in_channels=9))
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=tiny_sd.perturb(unet).eval(),
        scheduler=diffusers.DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp / "folder", safe_serialization=True)
    save_file(
        ldm_state(pipe, open_clip=request.param == "sd2"), str(tmp / "inpainting.safetensors")
    )
    return tmp / "folder", tmp / "inpainting.safetensors", pipe


def test_inpainting_single_file(inpaint_file, tmp_path):
    folder, file, pipe = inpaint_file
    theirs = diffusers.StableDiffusionInpaintPipeline.from_single_file(
        str(file), config=str(folder), local_files_only=True, safety_checker=None
    )
    assert_same_weights(theirs.unet, pipe.unet)
    # configs without the scheduler's: the shipped one, ε for 2.x inpainting (not 2.x's v)
    config = tmp_path / "config"
    for part in ("unet", "vae", "text_encoder"):
        (config / part).mkdir(parents=True)
        (config / part / "config.json").write_bytes((folder / part / "config.json").read_bytes())
    assert destatic.load(file, config=config, tokenizer=folder / "tokenizer").target == "epsilon"
    # the U-Net config from the shipped set, its 9 input channels from the header
    (config / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"U-Net does not fit.*expected \(320, 9, 3, 3\)"):
        destatic.load(file, config=config, tokenizer=folder / "tokenizer")
    single = destatic.load(file, config=folder)
    assert single.inpainting_model
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1
    kwargs = dict(GEN, image=image, mask=mask)
    a = destatic.load(folder).generate("a cat", **kwargs)
    assert (a - single.generate("a cat", **kwargs)).abs().max().item() <= 1e-5


# --- detection -------------------------------------------------------------------------------


def test_unknown_file_lists_every_format(tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError) as e:
        destatic.load(tmp_path / "x.safetensors")
    message = str(e.value)
    assert "\n" not in message
    formats = ("SD 1.x inpainting", "SD 1.x", "SD 2.x inpainting", "SD 2.x", "SDXL")
    for name in (*formats, "SDXL refiner", "SD3", "Flux", "Flux (diffusers names)"):
        assert re.search(rf"(looked for |; ){re.escape(name)}:", message), name


@pytest.mark.parametrize("name", ["sdxl", "sdxl_refiner"])
def test_full_size_sdxl_unet_names_agree_with_diffusers_converter(name):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = json.loads((CONFIGS / f"{name}.json").read_text())["unet"]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.items() if k[0] != "_"})
    names = unet_names(UNetConfig.from_diffusers(cfg))
    keys = list(unet.state_dict())
    ldm = {names(k): torch.tensor([float(i)]) for i, k in enumerate(keys)}
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert {k: v.item() for k, v in back.items()} == {k: i for i, k in enumerate(keys)}
