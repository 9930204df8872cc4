"""Devices and precision: ``Pipeline.to`` moves every component, generation keeps every tensor
in the pipeline's dtype and on its device, and ``--device``/``--dtype`` names resolve as
documented (the CUDA branch with a patched ``torch.cuda``; there is no GPU here)."""

import pytest
import torch

import destatic
from destatic.pipelines import devices
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


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "fma"}, torch.float32),  # an AVX2 EPYC: bf16 would be emulated
        ({"avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"avx512f", "amx_tile", "amx_bf16"}, torch.bfloat16),
    ],
)
def test_auto_on_the_cpu_is_bf16_only_with_bf16_matrix_units(monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "cpu_features", lambda: frozenset(flags))
    assert pick_device("auto", "auto") == (torch.device("cpu"), expected)
    assert pick_device("cpu", "fp32") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda", "auto")


def test_cpu_features_are_read_from_this_machine():
    flags = devices.cpu_features()
    assert isinstance(flags, frozenset)
    assert devices.cpu_has_bf16() == bool({"amx_bf16", "avx512_bf16"} & flags)
    assert str(torch.get_num_threads()) in devices.cpu_description()


def test_a_bf16_pipeline_samples_in_fp32_and_rounds_only_the_network(sd_folder):
    """bf16 weights on the CPU: the sampler's state and estimates stay fp32, the network sees
    bf16 inputs in channels_last convolutions, and the images stay near fp32's."""
    pipe = destatic.load(sd_folder)
    kwargs = dict(steps=4, guidance=5.0, width=16, height=16, seed=3, sampler="dpmpp_2m")
    exact = pipe.generate("a red cat", **kwargs)
    pipe.to(dtype="bf16")
    assert pipe.dtype == torch.bfloat16 and pipe.state_dtype == torch.float32
    conv = pipe.network.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    seen, inputs = [], []
    hook = pipe.network.register_forward_pre_hook(lambda m, a: inputs.append(a[0].dtype))
    images = pipe.generate("a red cat", callback=seen.append, **kwargs)
    hook.remove()
    assert set(inputs) == {torch.bfloat16}
    assert {info.x.dtype for info in seen} == {torch.float32}
    assert {info.denoised.dtype for info in seen} == {torch.float32}
    assert (images - exact).abs().mean() < 0.02


def test_upcast_only_for_fp16_with_force_upcast():
    class Config:
        force_upcast = True

    assert upcast_dtype(Config, torch.float16) == torch.float32
    assert upcast_dtype(Config, torch.bfloat16) == torch.bfloat16
    assert upcast_dtype(object(), torch.float16) == torch.float16


def test_fp32_stays_exact_and_contiguous(sd_folder):
    """An explicit fp32 pipeline computes exactly what the loaded one does; a bf16 pipeline
    cast back to fp32 gets its contiguous layout back (its weights keep bf16's rounding)."""
    kwargs = dict(steps=3, guidance=5.0, width=16, height=16, seed=1)
    exact = destatic.load(sd_folder).generate("a red cat", **kwargs)
    assert torch.equal(
        destatic.load(sd_folder).to("cpu", "fp32").generate("a red cat", **kwargs), exact
    )
    pipe = destatic.load(sd_folder).to(dtype="bf16").to(dtype="fp32")
    assert pipe.network.conv_in.weight.is_contiguous()
    assert pipe.autoencoder.decoder.conv_in.weight.is_contiguous()


def test_crowded_cpu_advice_counts_other_running_processes(monkeypatch):
    """torch threads beside other running processes stall each other (a 2-thread training step
    ran 4-5x slower beside one busy process): the trainer warns and says how many threads fit."""
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(devices, "_running_elsewhere", lambda: 1)
    advice = devices.crowded_cpu_advice(threads=2)
    assert "keep 1 of this machine's 2 CPUs busy" in advice and "train.threads = 1" in advice
    assert devices.crowded_cpu_advice(threads=1) is None
    monkeypatch.setattr(devices, "_running_elsewhere", lambda: 0)
    assert devices.crowded_cpu_advice(threads=2) is None


def test_running_elsewhere_reads_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 3\nprocs_blocked 0\n")
    real = devices.Path
    monkeypatch.setattr(devices, "Path", lambda p: stat if p == "/proc/stat" else real(p))
    assert devices._running_elsewhere(samples=2, interval=0) == 2
