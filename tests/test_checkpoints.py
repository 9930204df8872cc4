"""Checkpoint I/O in the diffusers folder layout: load diffusers' own save_pretrained folders,
round-trip our saves, refuse pickles, and explain broken folders in one line."""

import json

import pytest
import torch

from destatic.io import (
    CheckpointError,
    find_weights,
    load_safetensors,
    load_weights,
    read_json,
    read_model_index,
)
from destatic.models import UNet2DCondition
from destatic.models.autoencoder import AutoencoderKL
from destatic.models.mmdit import MMDiT
from destatic.models.registry import COMPONENT_CLASSES, load_component, load_into, save_component
from destatic.process import RectifiedFlow, VPDiscrete
from destatic.process.flow import ResolutionShift
from destatic.process.schedulers import process_from_scheduler_config, scheduler_config_from_process
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")

UNET = tiny_sd.UNET
VAE = tiny_sd.VAE
MMDIT = tiny_sd.MMDIT

SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def _inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "unet": (torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)),
        "vae": torch.randn(1, 3, 32, 32, generator=g),
        "mmdit": (
            torch.randn(2, 4, 16, 16, generator=g),
            torch.randn(2, 7, 32, generator=g),
            torch.randn(2, 24, generator=g),
        ),
    }


def _ours(kind: str, model: torch.nn.Module) -> torch.Tensor:
    inp = _inputs()[kind]
    t = torch.tensor([999.0, 17.25])
    with torch.no_grad():
        if kind == "unet":
            return model(inp[0], t, inp[1])
        if kind == "vae":
            return model(inp)
        return model(inp[0], t, inp[1], inp[2])


def _ref(kind: str, model: torch.nn.Module) -> torch.Tensor:
    inp = _inputs()[kind]
    t = torch.tensor([999.0, 17.25])
    with torch.no_grad():
        if kind == "unet":
            return model(inp[0], t, encoder_hidden_states=inp[1]).sample
        if kind == "vae":
            return model(inp).sample
        return model(inp[0], inp[1], inp[2], t, return_dict=False)[0]


def _diffusers_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "unet":
        return tiny_sd.perturb(diffusers.UNet2DConditionModel(**UNET)).eval()
    if kind == "vae":
        return tiny_sd.perturb(diffusers.AutoencoderKL(**VAE)).eval()
    return tiny_sd.perturb(diffusers.SD3Transformer2DModel(**MMDIT)).eval()


OURS = {"unet": UNet2DCondition, "vae": AutoencoderKL, "mmdit": MMDiT}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """kind -> (diffusers model, its save_pretrained folder)."""
    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for kind in OURS:
        ref = _diffusers_model(kind)
        ref.save_pretrained(root / kind, safe_serialization=True)
        out[kind] = (ref, root / kind)
    return out


def _assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    assert got.shape == want.shape
    scale = max(want.abs().max().item(), 1.0)
    assert (got - want).abs().max().item() <= rel * scale


@pytest.mark.parametrize("kind", list(OURS))
def test_load_diffusers_folder_matches_diffusers(saved, kind) -> None:
    ref, folder = saved[kind]
    assert find_weights(folder).name == "diffusion_pytorch_model.safetensors"
    model = load_component(folder)
    assert isinstance(model, OURS[kind])
    _assert_close(_ours(kind, model), _ref(kind, ref))


@pytest.mark.parametrize("kind", list(OURS))
def test_save_load_round_trip(saved, kind, tmp_path) -> None:
    _, folder = saved[kind]
    model = load_component(folder)
    name = read_json(folder / "config.json")["_class_name"]
    config = model.config.to_dict()
    save_component(model, tmp_path / "fp32", class_name=name, config=config)
    assert sorted(p.name for p in (tmp_path / "fp32").iterdir()) == [
        "checksums.json",
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    again = load_component(tmp_path / "fp32")
    assert torch.equal(_ours(kind, again), _ours(kind, model))

    save_component(model, tmp_path / "fp16", class_name=name, config=config, dtype=torch.float16)
    state = load_weights(tmp_path / "fp16")
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    half = load_component(tmp_path / "fp16")
    assert next(half.parameters()).dtype == torch.float32
    _assert_close(_ours(kind, half), _ours(kind, model), rel=2e-2)


def test_our_class_names_and_sharded_weights(saved, tmp_path) -> None:
    from safetensors.torch import save_file

    _, folder = saved["vae"]
    model = load_component(folder, class_name="AutoencoderKL")
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    keys = list(state)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    target = tmp_path / "sharded"
    target.mkdir()
    for shard, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(target / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (target / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (target / "config.json").write_text((folder / "config.json").read_text())
    assert find_weights(target).name.endswith(".index.json")
    loaded = load_weights(target)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in keys)
    assert isinstance(load_component(target), AutoencoderKL)
    assert set(COMPONENT_CLASSES) >= {"UNet2DCondition", "MMDiT", "UNet2DConditionModel"}


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _copy(folder, dest, weights=True):
    dest.mkdir()
    (dest / "config.json").write_text((folder / "config.json").read_text())
    if weights:
        data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
        (dest / "diffusion_pytorch_model.safetensors").write_bytes(data)
    return dest


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_folder_and_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_component(tmp_path / "nope")
    _one_line(e)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_model_index(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"model_index\.json"):
        read_model_index(tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        load_component(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model_index\.json is not valid JSON") as e:
        read_model_index(tmp_path)
    _one_line(e)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert read_model_index(tmp_path)["_class_name"] == "StableDiffusionPipeline"


def test_missing_weights_lists_folder(saved, tmp_path) -> None:
    folder = _copy(saved["vae"][1], tmp_path / "vae", weights=False)
    (folder / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="no safetensors weights") as e:
        load_component(folder)
    assert "config.json" in _one_line(e) and "notes.txt" in str(e.value)


def test_pickle_only_is_refused(saved, tmp_path) -> None:
    folder = _copy(saved["vae"][1], tmp_path / "vae", weights=False)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="convert to safetensors"):
        load_component(folder)
    with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded"):
        load_safetensors(folder / "diffusion_pytorch_model.bin")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "short"])
def test_corrupt_safetensors(saved, tmp_path, damage) -> None:
    folder = _copy(saved["vae"][1], tmp_path / "vae")
    path = folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    broken = {
        "truncated": data[: len(data) // 2],
        "garbage": bytes(range(256)) * 8,
        "short": b"\x01\x02",
    }[damage]
    path.write_bytes(broken)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_component(folder)
    assert str(path) in _one_line(e)


def test_unknown_class(saved, tmp_path) -> None:
    folder = _copy(saved["vae"][1], tmp_path / "vae")
    cfg = read_json(folder / "config.json")
    (folder / "config.json").write_text(json.dumps(dict(cfg, _class_name="HunyuanDiT2DModel")))
    with pytest.raises(CheckpointError, match="HunyuanDiT2DModel") as e:
        load_component(folder)
    assert "UNet2DConditionModel" in _one_line(e)


def test_config_that_does_not_fit_the_weights(saved, tmp_path) -> None:
    folder = _copy(saved["unet"][1], tmp_path / "unet")
    cfg = read_json(folder / "config.json")
    (folder / "config.json").write_text(json.dumps(dict(cfg, layers_per_block=2)))
    first_missing = r"missing keys down_blocks\.0\.attentions\.1\.norm\.weight"
    with pytest.raises(CheckpointError, match=first_missing) as e:
        load_component(folder)
    assert str(folder) in _one_line(e)

    (folder / "config.json").write_text(json.dumps(dict(cfg, cross_attention_dim=16)))
    with pytest.raises(CheckpointError, match=r"attn2\.to_k\.weight: expected \(32, 16\)"):
        load_component(folder)

    (folder / "config.json").write_text(json.dumps(dict(cfg, act_fn="gelu")))
    with pytest.raises(CheckpointError, match="act_fn"):
        load_component(folder)


def test_unexpected_key_and_dtype_cast() -> None:
    model = torch.nn.Linear(3, 2).to(torch.float64)
    state = {k: v.float() for k, v in torch.nn.Linear(3, 2).state_dict().items()}
    load_into(model, state, where="here")
    assert model.weight.dtype == torch.float64
    assert torch.equal(model.weight.float(), state["weight"])
    extra = r"weights in here .*unexpected keys extra\.weight"
    with pytest.raises(CheckpointError, match=extra) as e:
        load_into(model, dict(state, **{"extra.weight": torch.zeros(1)}), where="here")
    _one_line(e)


# ---------------------------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------------------------


def test_sd1_scheduler() -> None:
    process, target = process_from_scheduler_config(SD1_SCHEDULER)
    assert process == VPDiscrete()
    assert target == "epsilon"
    ddim = dict(SD1_SCHEDULER, _class_name="DDIMScheduler")
    assert process_from_scheduler_config(ddim) == (VPDiscrete(), "epsilon")
    # The table agrees with diffusers' own scheduler.
    ref = diffusers.DDIMScheduler.from_config(ddim)
    sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod).sqrt().double()
    # diffusers computes the table in float32
    torch.testing.assert_close(process.sigma_table(), sigmas, rtol=1e-4, atol=0)


def test_v_prediction_zero_snr_and_round_trip() -> None:
    cfg = dict(
        SD1_SCHEDULER,
        _class_name="EulerDiscreteScheduler",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    process, target = process_from_scheduler_config(cfg)
    assert process == VPDiscrete(zero_terminal_snr=True)
    assert target == "v_prediction"
    out = scheduler_config_from_process(process, target)
    assert out["_class_name"] == "EulerDiscreteScheduler"
    assert process_from_scheduler_config(out) == (process, target)
    diffusers.EulerDiscreteScheduler.from_config(out)  # diffusers accepts it


def test_flow_match_and_round_trip() -> None:
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
    process, target = process_from_scheduler_config(dict(cfg, shift=3.0))
    assert process == RectifiedFlow(shift=3.0)
    assert target == "flow"
    out = scheduler_config_from_process(process, target)
    assert process_from_scheduler_config(out) == (process, "flow")
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(out)
    assert ref.config.shift == 3.0
    dynamic = dict(cfg, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    flux = RectifiedFlow(resolution=ResolutionShift(base_shift=0.5, max_shift=1.15))
    assert process_from_scheduler_config(dynamic) == (flux, "flow")  # the shift follows the size


def test_unsupported_schedulers() -> None:
    # (LCMScheduler and TCDScheduler load since issue 15: tests/test_lcm_scheduler.py)
    with pytest.raises(CheckpointError, match="unsupported scheduler class 'IPNDMScheduler'") as e:
        process_from_scheduler_config(dict(SD1_SCHEDULER, _class_name="IPNDMScheduler"))
    assert "DDIMScheduler" in _one_line(e)
    with pytest.raises(CheckpointError, match="trained_betas"):
        process_from_scheduler_config(dict(SD1_SCHEDULER, trained_betas=[0.1] * 1000))
    with pytest.raises(CheckpointError, match="beta_schedule 'sigmoid'"):
        process_from_scheduler_config(dict(SD1_SCHEDULER, beta_schedule="sigmoid"))
    with pytest.raises(CheckpointError, match="prediction_type"):
        process_from_scheduler_config(dict(SD1_SCHEDULER, prediction_type="flow"))


def test_edm_scheduler_config_round_trip_and_diffusers_preconditioning():
    """EDMEulerScheduler ↔ (EDM, EDMTarget): the same c_in, c_noise, c_skip and c_out."""
    from diffusers import EDMEulerScheduler

    from destatic.process import EDM, Denoiser, EDMTarget
    from destatic.process.schedulers import (
        process_from_scheduler_config,
        scheduler_config_from_process,
    )

    process, target = EDM(min_sigma=0.01, max_sigma=50.0, sigma_data=0.7), EDMTarget(0.7)
    cfg = scheduler_config_from_process(process, target)
    back, back_target = process_from_scheduler_config(cfg)
    assert back == process and back_target == target
    sched = EDMEulerScheduler.from_config({k: v for k, v in cfg.items() if k != "_class_name"})
    x = torch.randn(3, 4, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    seen = {}

    def net(x_in, label):
        seen["x_in"], seen["label"] = x_in, label
        return torch.ones_like(x_in)

    ours = Denoiser(net, process, target)(x, sigma)
    s = sigma[:, None]
    torch.testing.assert_close(seen["x_in"], sched.precondition_inputs(x, s))
    torch.testing.assert_close(seen["label"], sched.precondition_noise(sigma))
    torch.testing.assert_close(ours, sched.precondition_outputs(x, torch.ones_like(x), s))
