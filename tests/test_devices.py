"""Devices and precision: ``Pipeline.to`` moves every component, generation keeps every tensor
in the pipeline's dtype and on its device, and ``--device``/``--dtype`` names resolve as
documented (the CUDA branch with a patched ``torch.cuda``; there is no GPU here)."""

import pytest
import torch

import destatic
from destatic.pipelines.devices import pick_device, upcast_dtype
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")


def save_tiny_sd(tmp):
    """A tiny SD 1.x pipeline (CLIP text encoder, VAE, U-Net) saved by diffusers in ``tmp``."""
    unet, vae, text, tokenizer = tiny_sd.components(tmp)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
    return tmp / "pipeline"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd"))


def component_dtypes(pipe) -> dict[str, set[torch.dtype]]:
    parts = {"network": pipe.network, "vae": pipe.autoencoder, "text": pipe.text_encoder}
    return {name: {p.dtype for p in part.parameters()} for name, part in parts.items()}


def test_to_moves_every_component_and_returns_the_pipeline(sd_folder):
    pipe = destatic.load(sd_folder)
    assert pipe.to("cpu", torch.float64) is pipe
    assert component_dtypes(pipe) == {k: {torch.float64} for k in ("network", "vae", "text")}
    assert pipe.dtype == torch.float64 and pipe.device == torch.device("cpu")
    pipe.to(dtype="fp16")  # the tiny VAE's config says force_upcast, as SD's does
    assert pipe.autoencoder.config.force_upcast
    assert component_dtypes(pipe) == {
        "network": {torch.float16},
        "vae": {torch.float32},
        "text": {torch.float16},
    }
    pipe.autoencoder.config.force_upcast = False
    pipe.to(dtype=torch.float16)
    assert component_dtypes(pipe)["vae"] == {torch.float16}


@pytest.mark.parametrize("inputs", ["text", "inpaint"])
def test_generation_stays_in_the_pipeline_dtype_and_device(sd_folder, inputs):
    """In float64, every step's state and estimate is float64 on the pipeline's device (a
    float32 tensor made on the side would surface here or fail in a float64 convolution)."""
    pipe = destatic.load(sd_folder).to("cpu", "fp64")
    seen = []
    extra = {}
    if inputs == "inpaint":
        image = torch.rand(1, 3, 16, 16)
        mask = torch.zeros(1, 1, 16, 16)
        mask[..., 8:] = 1
        extra = {"image": image, "mask": mask, "strength": 0.75}
    images = pipe.generate(
        "a red cat",
        negative_prompt="blurry",
        steps=4,
        guidance=5.0,
        width=16,
        height=16,
        sampler="dpmpp_2m_sde",
        callback=seen.append,
        **extra,
    )
    assert seen
    for info in seen:
        for tensor in (info.x, info.denoised):
            assert tensor.dtype == pipe.dtype and tensor.device == pipe.device
    assert images.dtype == torch.float32 and images.device == pipe.device
    assert torch.isfinite(images).all()


def test_auto_is_cpu_fp32_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", "auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda", "auto")


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_is_cuda_half_with_cuda(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert pick_device("auto", "auto") == (torch.device("cuda"), expected)
    assert pick_device("cuda:1", "fp32") == (torch.device("cuda", 1), torch.float32)


@pytest.mark.parametrize(
    "device, dtype, message",
    [("tpu9", "auto", "unknown device 'tpu9'"), ("cpu", "fp8", "unknown dtype 'fp8'")],
)
def test_bad_names_are_one_line_errors(device, dtype, message):
    with pytest.raises(ValueError, match=message) as err:
        pick_device(device, dtype)
    assert "\n" not in str(err.value)


def test_upcast_only_for_fp16_with_force_upcast():
    class Config:
        force_upcast = True

    assert upcast_dtype(Config, torch.float16) == torch.float32
    assert upcast_dtype(Config, torch.bfloat16) == torch.bfloat16
    assert upcast_dtype(object(), torch.float16) == torch.float16
