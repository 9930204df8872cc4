"""Training building blocks: configs, objectives and atomic checkpoints."""

from __future__ import annotations

import errno
import math

import pytest
import torch

from destatic.io import CheckpointError
from destatic.lab import GaussianMixture
from destatic.training import (
    ConfigError,
    edm_objective,
    flow_objective,
    latest_checkpoint,
    load_checkpoint,
    load_config,
    save_checkpoint,
    vp_objective,
)
from destatic.training.config import Config
from destatic.training.state import flatten, unflatten

# ---------------------------------------------------------------------------------------------
# configs


def _write(tmp_path, text: str):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_config_defaults_and_overrides(tmp_path):
    cfg = load_config(
        _write(tmp_path, '[train]\nsteps = 7\n[objective]\nkind = "vp"\nmin_snr_gamma = 5\n'),
        {"train.batch_size": 4, "optim.lr": 1e-3},
    )
    assert cfg.train.steps == 7 and cfg.train.batch_size == 4 and cfg.optim.lr == 1e-3
    assert cfg.objective.kind == "vp" and cfg.objective.options == {"min_snr_gamma": 5}
    assert Config.from_dict(cfg.to_dict() | {"objective": {"kind": "vp"}}).train.steps == 7


@pytest.mark.parametrize(
    "text, message",
    [
        ("[trian]\nsteps = 3\n", "unknown table(s) ['trian']"),
        ("[train]\nstesp = 3\n", "unknown [train] key(s) ['stesp']"),
        ('[train]\nsteps = "many"\n', "train.steps = 'many': expected int"),
        ("[train]\nsteps = 0\n", "train.steps = 0: use a positive integer"),
        ("[optim]\nlr = 2.0\n", "optim.lr = 2.0"),
        ("[train]\nbatch_size = 6\ngrad_accum = 4\n", "not a multiple of"),
        ('[data]\ndataset = "mnist"\n', "data.dataset = 'mnist': choose one of"),
        ('[data]\ndataset = "folder"\n', "data.path is needed"),
        ('[objective]\nkind = "flow"\ngamma = 3\n', "unknown [objective] key(s) ['gamma']"),
        ('[sample]\nsampler = "eulr"\n', "sample.sampler = 'eulr'"),
        ("[train\n", "is not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    assert message in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        load_config(path)


# ---------------------------------------------------------------------------------------------
# objectives

OBJECTIVES = {
    "flow": lambda: flow_objective(shift=3.0),
    "vp-eps": lambda: vp_objective(target="epsilon", min_snr_gamma=None),
    "vp-v-minsnr": lambda: vp_objective(target="v_prediction", min_snr_gamma=5.0),
    "vp-zsnr-v": lambda: vp_objective(target="v_prediction", zero_terminal_snr=True),
    "edm": lambda: edm_objective(),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_an_oracle_network_has_zero_loss(name):
    """A network that knows x0 and recovers σ from its inputs scores exactly 0: the input
    scaling, the noise label and the regression target of every objective fit together."""
    obj = OBJECTIVES[name]()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)

    def oracle(x_in, label):
        sigma = obj.process.label_to_sigma(label.double())
        x = x_in / obj.process.c_in(sigma)[:, None]
        noise = (x - x0) / sigma[:, None]
        return obj.target.target(x0, noise, sigma[:, None])

    loss = obj.loss(oracle, x0, {}, generator=g)
    assert loss.shape == (64,)
    assert float(loss.max()) < 1e-8


@pytest.mark.parametrize("name", ["flow", "vp-v-minsnr", "edm"])
def test_the_exact_denoiser_beats_a_wrong_one(name):
    """On a Gaussian mixture, the exact posterior mean (as the objective's raw network) has a
    lower expected loss than the same network with an offset output."""
    obj = OBJECTIVES[name]()
    mix = GaussianMixture.standard(dim=2)
    exact = mix.network(obj.process, obj.target)

    def wrong(x_in, label):
        return exact(x_in, label) + 0.2

    g = torch.Generator().manual_seed(1)
    x0 = mix.sample(16384, generator=g)
    sigma = obj.sample_sigma(16384, torch.Generator().manual_seed(2))
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    good = float(obj.loss(exact, x0, {}, sigma=sigma, noise=noise).mean())
    bad = float(obj.loss(wrong, x0, {}, sigma=sigma, noise=noise).mean())
    assert good < bad
    if obj.min_snr_gamma is None:  # w = 1: the offset adds its square, 0.2² (cross term ≈ 0)
        assert abs(bad - good - 0.04) < 0.01


def test_flow_time_is_logit_normal_and_shifted():
    obj = flow_objective(shift=3.0, logit_mean=0.5, logit_std=0.8)
    sigma = obj.sample_sigma(200_000, torch.Generator().manual_seed(0))
    t = (sigma / 3.0) / (1 + sigma / 3.0)  # unshifted flow time
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - 0.5) < 0.01
    assert abs(float(logit.std()) - 0.8) < 0.01


def test_min_snr_weights():
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    snr = sigma.pow(-2)
    eps = vp_objective(target="epsilon", min_snr_gamma=5.0).weight(sigma)
    v = vp_objective(target="v_prediction", min_snr_gamma=5.0).weight(sigma)
    torch.testing.assert_close(eps, snr.clamp(max=5) / snr)
    torch.testing.assert_close(v, snr.clamp(max=5) / (snr + 1))
    assert torch.equal(vp_objective(min_snr_gamma=None).weight(sigma), torch.ones(3).double())


def test_vp_draws_training_timesteps():
    obj = vp_objective()
    sigma = obj.sample_sigma(10_000, torch.Generator().manual_seed(0))
    table = obj.process.sigma_table()
    assert torch.isin(sigma, table).all()
    assert len(torch.unique(sigma)) > 990


def test_objective_errors():
    with pytest.raises(ValueError, match="zero terminal SNR needs"):
        vp_objective(target="epsilon", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="predicts epsilon"):
        vp_objective(target="flow")
    with pytest.raises(ValueError, match="logit_std"):
        flow_objective(logit_std=0)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _state(step: int) -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "nested": {"t": (1, 2.5, "x", None), "inf": math.inf},
    }


def _same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


def test_flatten_round_trip_keeps_optimizer_state():
    state = _state(3)
    skeleton, tensors = flatten(state)
    _same(unflatten(skeleton, tensors), state)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    opt.load_state_dict(unflatten(skeleton, tensors)["optimizer"])  # torch accepts it back


def test_checkpoints_rotate_and_resume_from_the_newest(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    newest = latest_checkpoint(tmp_path)
    assert newest is not None and newest.name == "step-00000003"
    assert load_checkpoint(newest)["step"] == 3
    # the pointer file lost (or naming a deleted folder): the newest complete folder is used
    (tmp_path / "latest").write_text("step-00000009\n")
    assert latest_checkpoint(tmp_path).name == "step-00000003"


def test_a_half_written_checkpoint_is_ignored_and_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1))
    partial = tmp_path / ".tmp-step-00000002-abc"  # what kill -9 during a save leaves
    partial.mkdir()
    (partial / "state.safetensors").write_bytes(b"\0" * 10)
    incomplete = tmp_path / "step-00000005"  # a folder without its json
    incomplete.mkdir()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    save_checkpoint(tmp_path, 2, _state(2))
    assert not partial.exists()


def _enospc() -> Exception:
    return OSError(errno.ENOSPC, "No space left on device")


def _safetensors_enospc() -> Exception:  # what safetensors' writer raises: not an OSError
    from safetensors import SafetensorError

    return SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
        'left on device" })'
    )


@pytest.mark.parametrize("error", [_enospc, _safetensors_enospc])
def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, error):
    good = save_checkpoint(tmp_path, 1, _state(1))
    import safetensors.torch

    def full(*args, **kwargs):
        raise error()

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path, 2, _state(2))
    message = str(err.value)
    assert "No space left on device" in message and str(good) in message
    assert "\n" not in message and "IoError" not in message
    assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(good)["step"] == 1
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    folder = save_checkpoint(tmp_path, 1, _state(1))
    (folder / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(folder)


def test_loss_plot_before_any_metrics_line(tmp_path):
    # a checkpoint can come before the first log line (log_every > checkpoint_every)
    from destatic.training.monitor import plot_loss, read_metrics

    assert read_metrics(tmp_path / "metrics.jsonl") == []
    plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("mode", [True, False])
def test_evaluating_restores_the_mode_even_on_errors(mode):
    from destatic.training.tasks.base import evaluating

    net = torch.nn.Dropout(0.5).train(mode)
    with evaluating(net) as inside:
        assert inside is net and not net.training
    assert net.training is mode
    with pytest.raises(RuntimeError), evaluating(net):
        raise RuntimeError("a sample grid failed")
    assert net.training is mode
