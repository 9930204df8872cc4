"""The training loop end to end on a tiny captioned folder: resume after kill -9, NaN handling,
the exported pipeline, the autoencoder task and two processes against one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import destatic
from destatic.io import load_weights
from destatic.training import ConfigError, TrainingError, latest_checkpoint, load_config, train
from destatic.training.state import load_checkpoint
from tests.training_fixtures import (
    TINY_UNET,
    assert_same,
    final_weights,
    kill_after_checkpoint,
    write_config,
    write_squares,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 coloured shapes with captions (``name.txt`` beside ``name.png``)."""
    return write_squares(tmp_path_factory.mktemp("shapes"), 24)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_train_exports_a_pipeline_that_generates(folder, tmp_path):
    cfg = load_config(write_config(tmp_path / "c.toml", folder, tmp_path / "run"))
    model = train(cfg)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 6
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "samples" / "step-00000006.png").is_file()
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*"))) == 2  # keep = 2
    pipe = destatic.load(model)
    assert pipe.autoencoder is None and pipe.text_encoder.max_length == 8
    assert (
        pipe.sampling_defaults["guidance"] == cfg.sample.guidance
    )  # the samples' scale is the default
    images = pipe.generate("a red square", steps=3, guidance=2.0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    # the exported network is the EMA of the last checkpoint
    ema = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))["ema"]
    exported = load_weights(model / "unet")
    assert_same(exported, {k[7:]: v for k, v in ema.items() if k.startswith("module.")})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kill_9_and_resume_gives_the_same_weights(folder, tmp_path, precision):
    """6 steps straight = a run killed (SIGKILL) after a checkpoint past step 3, resumed; in
    bf16 autocast too (the default on CPUs with AMX)."""
    extra = f'precision = "{precision}"'
    straight = load_config(write_config(tmp_path / "a.toml", folder, tmp_path / "straight", extra))
    train(straight)

    cfg_path = write_config(tmp_path / "b.toml", folder, tmp_path / "killed", extra)
    stopped = kill_after_checkpoint(cfg_path, tmp_path / "killed", 3)
    assert 3 <= stopped < 6
    train(load_config(cfg_path))  # the same command again resumes
    assert_same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed"))
    steps = [
        int(line.split(",")[0].split(":")[1])
        for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]  # no repeated records after the resume


def test_compiled_training_tracks_eager_and_resumes_exactly(folder, tmp_path):
    """``train.compile``: the losses of eager bf16 within bf16's rounding, and a run killed
    after a checkpoint and resumed ends with the weights of one that never stopped (the killed
    and resumed processes compile again and check their gradients again; inductor's cache
    serves them). bf16 trains channels_last: the restored AdamW moments must take the weights'
    layout, or fused AdamW pairs the wrong elements. (With torch 2.13 this tiny U-Net compiled
    by blocks fails the trainer's gradient check under bf16 — its conv2, shortcut and
    downsampler weights get no gradient — so from its second step it is compiled by layers.)"""
    compiled = 'precision = "bf16"\ncompile = true'
    straight = load_config(
        write_config(tmp_path / "a.toml", folder, tmp_path / "straight", compiled)
    )
    train(straight)
    eager = 'precision = "bf16"'
    train(load_config(write_config(tmp_path / "e.toml", folder, tmp_path / "eager", eager)))

    def losses(out: Path) -> list[float]:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert losses(tmp_path / "straight") == pytest.approx(losses(tmp_path / "eager"), rel=0.03)
    assert losses(tmp_path / "straight") != losses(tmp_path / "eager")  # it did compile

    cfg_path = write_config(tmp_path / "b.toml", folder, tmp_path / "killed", compiled)
    assert 3 <= kill_after_checkpoint(cfg_path, tmp_path / "killed", 3) < 6
    train(load_config(cfg_path))
    assert_same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed"))


def test_nan_losses_skip_then_stop_without_a_nan_checkpoint(folder, tmp_path, monkeypatch):
    from destatic.training import tasks

    cfg = load_config(
        write_config(tmp_path / "c.toml", folder, tmp_path / "run", "max_bad_steps = 3")
    )
    real = tasks.DenoiserTask.loss
    calls = {"n": 0}

    def poisoned(self, model, batch, device):
        calls["n"] += 1
        loss = real(self, model, batch, device)
        return loss * float("nan") if calls["n"] == 2 or calls["n"] >= 4 else loss

    monkeypatch.setattr(tasks.DenoiserTask, "loss", poisoned)
    with pytest.warns(UserWarning, match="update skipped"):
        with pytest.raises(TrainingError) as err:
            train(cfg)
    # steps 1 and 3 train, 2 is skipped, 4, 5 and 6 are skipped and the third in a row stops
    message = str(err.value)
    assert "3 steps in a row" in message and "(step 6)" in message
    assert "step-00000005" in message  # the last good checkpoint, named
    root = tmp_path / "run" / "checkpoints"
    step4, step5 = (load_checkpoint(root / f"step-0000000{i}") for i in (4, 5))
    assert step5["bad_steps"] == 2
    assert all(torch.isfinite(v).all() for v in step5["model"].values())
    assert_same(step4["model"], step5["model"])  # skipped updates leave the weights alone
    assert not (root / "step-00000006").exists()


def test_resume_with_another_model_is_a_clear_error(folder, tmp_path):
    path = write_config(tmp_path / "c.toml", folder, tmp_path / "run", "")
    train(load_config(path, {"train.steps": 1}))
    other = load_config(path, {"train.steps": 2, "model.text_max_length": 9})
    with pytest.raises(ValueError, match=r"\[model\] differs"):
        train(other)


def test_grad_accumulation_matches_one_big_batch(folder, tmp_path):
    a = load_config(write_config(tmp_path / "a.toml", folder, tmp_path / "a"), {"train.steps": 3})
    b = load_config(
        write_config(tmp_path / "b.toml", folder, tmp_path / "b"),
        {"train.steps": 3, "train.grad_accum": 2},
    )
    train(a)
    train(b)
    assert_same(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"), atol=1e-5)


def test_autoencoder_task_exports_a_loadable_vae(folder, tmp_path):
    extra = 'task = "autoencoder"\n\n[autoencoder.config]\nblock_out_channels = [8, 16]\n'
    extra += 'down_block_types = ["DownEncoderBlock2D", "DownEncoderBlock2D"]\n'
    extra += 'up_block_types = ["UpDecoderBlock2D", "UpDecoderBlock2D"]\nnorm_num_groups = 4\n'
    cfg = load_config(write_config(tmp_path / "c.toml", folder, tmp_path / "vae", extra))
    out = train(cfg)
    from destatic.models.registry import load_component

    vae = load_component(out)
    assert vae.config.scaling_factor != 0.18215  # measured on the data
    assert (tmp_path / "vae" / "samples" / "step-00000006.png").is_file()

    # and a latent denoiser trains on its cached latents
    latent = load_config(
        write_config(tmp_path / "d.toml", folder, tmp_path / "ldm"),
        {"model.autoencoder": str(out), "train.steps": 2},
    )
    pipe = destatic.load(train(latent))
    assert pipe.autoencoder is not None
    assert pipe.generate("a red square", steps=2).shape == (1, 3, 16, 16)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo via torchrun on POSIX")
def test_two_processes_match_one(folder, tmp_path):
    """torchrun with 2 CPU processes (gloo), global batch 4 = one process with batch 4."""
    one = load_config(write_config(tmp_path / "a.toml", folder, tmp_path / "one"))
    one.train.steps = 3
    train(one)
    cfg = write_config(tmp_path / "b.toml", folder, tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(29500 + os.getpid() % 1000)]
    cmd += ["-m", "destatic.cli", "train", str(cfg), "--set", "train.steps=3"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), atol=1e-5)


def test_non_finite_weights_are_never_checkpointed(folder, tmp_path, monkeypatch):
    cfg = load_config(write_config(tmp_path / "c.toml", folder, tmp_path / "run"))
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def corrupting(self, *args, **kwargs):  # an update that is finite in the loss but not after
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", corrupting)
    with pytest.raises(TrainingError, match="not finite; no checkpoint written"):
        train(cfg)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000002"


def test_edm_objective_trains_and_round_trips(folder, tmp_path):
    cfg = load_config(
        write_config(tmp_path / "c.toml", folder, tmp_path / "run"),
        {"objective.kind": "edm", "objective.sigma_data": 0.6, "train.steps": 2},
    )
    pipe = destatic.load(train(cfg))
    assert pipe.process.sigma_data == 0.6 and pipe.target.sigma_data == 0.6
    assert pipe.generate("a red square", steps=2).shape == (1, 3, 16, 16)


def test_cli_trains_exports_half_and_generates(folder, tmp_path):
    from typer.testing import CliRunner

    from destatic.cli import app

    cfg = write_config(tmp_path / "c.toml", folder, tmp_path / "run")
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(cfg), "--set", "train.steps=2"])
    assert result.exit_code == 0, result.output
    model = tmp_path / "run" / "model"
    result = runner.invoke(app, ["export", str(model), str(tmp_path / "half")])
    assert result.exit_code == 0, result.output
    assert load_weights(tmp_path / "half" / "unet")["conv_in.weight"].dtype == torch.float16
    args = ["generate", "a red square", "a blue square", "--model", str(tmp_path / "half")]
    result = runner.invoke(app, [*args, "--steps", "2", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in pngs] == ["000-a-red-square-seed0.png", "001-a-blue-square-seed1.png"]
    assert Image.open(pngs[0]).size == (16, 16)
    # errors are one line
    bad = runner.invoke(app, ["train", str(cfg), "--set", "train.steps=0"])
    assert bad.exit_code == 2 and "train.steps = 0" in bad.output
    bad = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "error:" in bad.output
    bad = runner.invoke(app, ["generate", "x", "--model", str(model), "--sampler", "eulr"])
    assert bad.exit_code == 2 and "unknown sampler" in bad.output


def test_adversarial_autoencoder_trains_both_networks_apart(folder, tmp_path):
    """The PatchGAN term: D learns from L_D only, the autoencoder from L_AE only, and the terms
    wait for adversarial_start."""
    from destatic.training.tasks import AutoencoderTask

    extra = 'task = "autoencoder"\n\n[autoencoder]\nadversarial_weight = 0.5\n'
    extra += "adversarial_start = 2\ndiscriminator_channels = 8\ndiscriminator_layers = 2\n"
    extra += "\n[autoencoder.config]\nblock_out_channels = [8, 16]\n"
    extra += 'down_block_types = ["DownEncoderBlock2D", "DownEncoderBlock2D"]\n'
    extra += 'up_block_types = ["UpDecoderBlock2D", "UpDecoderBlock2D"]\nnorm_num_groups = 4\n'
    cfg = load_config(write_config(tmp_path / "g.toml", folder, tmp_path / "gan", extra))
    task = AutoencoderTask(cfg, torch.device("cpu"), progress=False)
    model = task.trainable
    batch = task.draw(torch.arange(4), torch.Generator().manual_seed(0))

    def grads(step: int, part: int) -> tuple[float, float]:
        """(|∇ autoencoder|, |∇ discriminator|) of one term of the loss at ``step``."""
        model.zero_grad(set_to_none=True)
        task.step = step
        _, _, (fake_for_ae, real, fake) = model(batch["x"], batch["eps"])
        from destatic.models.discriminator import hinge_discriminator_loss

        term = -fake_for_ae.mean() if part == 0 else hinge_discriminator_loss(real, fake).mean()
        term.backward()
        norm = [
            sum(float(p.grad.abs().sum()) for p in m.parameters() if p.grad is not None)
            for m in (model.autoencoder, model.discriminator)
        ]
        return norm[0], norm[1]

    ae, d = grads(5, 0)
    assert ae > 0 and d == 0  # the generator term moves only the autoencoder
    ae, d = grads(5, 1)
    assert ae == 0 and d > 0  # the hinge term moves only the discriminator
    task.step = 0
    before = task.loss(model, batch, torch.device("cpu"))
    task.step = 2
    after = task.loss(model, batch, torch.device("cpu"))
    assert not torch.allclose(before, after)  # the terms switch on at adversarial_start
    out = train(cfg)  # end to end: the exported folder is a plain VAE
    from destatic.models.registry import load_component

    assert not any("discriminator" in k for k in load_component(out).state_dict())


def test_control_task_trains_a_controlnet_for_a_pipeline(folder, tmp_path):
    """A ControlNet on Canny edges of the data for a (tiny, just trained) base pipeline: only the
    ControlNet learns; it exports as a ControlNetModel folder the pipeline takes."""
    base = train(load_config(write_config(tmp_path / "b.toml", folder, tmp_path / "base")))
    before = {k: v.clone() for k, v in destatic.load(base).network.state_dict().items()}
    extra = 'task = "control"\n\n[control]\n'
    extra += f'base = "{base}"\nconditioning_embedding_out_channels = [8]\n'
    cfg = load_config(write_config(tmp_path / "c.toml", folder, tmp_path / "ctl", extra))
    out = train(cfg)
    from destatic.models.registry import load_component

    net = load_component(out)
    assert type(net).__name__ == "ControlNet"
    trained = load_weights(out)
    assert any(
        float(v.abs().max()) > 0 for k, v in trained.items() if "controlnet_down_blocks" in k
    )  # the zero convolutions moved off zero
    pipe = destatic.load(base)
    assert all(torch.equal(v, before[k]) for k, v in pipe.network.state_dict().items())
    edges = torch.zeros(1, 3, 16, 16)
    edges[..., 4:12, 4] = 1
    got = pipe.generate("a red square", steps=2, controlnet=net, control_image=edges)
    assert got.shape == (1, 3, 16, 16)
    bad = load_config(
        write_config(tmp_path / "d.toml", folder, tmp_path / "bad", extra.replace("[8]", "[8, 8]"))
    )
    with pytest.raises(ConfigError, match="2× down"):
        train(bad)


def test_inpainting_variant_starts_as_its_base_and_trains(folder, tmp_path):
    from destatic.training.tasks import DenoiserTask, random_masks

    base = train(load_config(write_config(tmp_path / "b.toml", folder, tmp_path / "base")))
    extra = f'\n[model]\ninpainting = true\ninit = "{base}"\ntext_max_length = 8\n{TINY_UNET}'
    text = write_config(tmp_path / "i.toml", folder, tmp_path / "inp").read_text()
    text = text.replace(f"[model]\ntext_max_length = 8\n{TINY_UNET}", "") + extra
    (tmp_path / "i.toml").write_text(text)
    cfg = load_config(tmp_path / "i.toml")
    task = DenoiserTask(cfg, torch.device("cpu"), progress=False)
    assert task.trainable.config.in_channels == 7 and task.trainable.config.out_channels == 3
    source = destatic.load(base).network
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 8, 384)
    extra_inputs = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            task.trainable(torch.cat([x, extra_inputs], 1), 5.0, ctx), source(x, 5.0, ctx)
        )
    masks = random_masks(64, 16, torch.Generator().manual_seed(0))
    full = masks.flatten(1).mean(1) == 1
    assert 0.1 < float(full.float().mean()) < 0.45 and float(masks[~full].mean()) < 0.6
    pipe = destatic.load(train(cfg))
    assert pipe.inpainting_model
    image = torch.rand(1, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    assert pipe.generate("a red square", steps=2, image=image, mask=mask).shape == (1, 3, 16, 16)


def _gradient_dropping_compile(model, finer: bool = False):
    """compile_blocks with a backend that detaches every unit's outputs: a stand-in for the
    inductor bug that left most of the 64² U-Net without gradients."""
    from destatic.models.speedups import blocks, layers

    def backend(graph, example_inputs):
        def run(*args):
            out = graph(*args)
            return type(out)(o.detach() if isinstance(o, torch.Tensor) else o for o in out)

        return run

    for unit in (layers if finer else blocks)(model):
        unit.compile(backend=backend)
    return model


def test_compiled_gradient_errors_names_what_the_compiler_got_wrong():
    from destatic.models import UNet2DCondition, UNetConfig
    from destatic.models.speedups import (
        blocks,
        compile_blocks,
        compiled_gradient_errors,
        layers,
        uncompile_blocks,
    )
    from tests.training_fixtures import PIXEL_UNET

    torch.manual_seed(0)
    model = UNet2DCondition(UNetConfig(**PIXEL_UNET))
    torch.nn.init.normal_(model.conv_out.weight)  # a fresh U-Net zeroes it: no gradients behind

    def loss():
        x, context = torch.randn(2, 3, 16, 16), torch.randn(2, 8, 384)
        return model(x, torch.rand(2) * 1000, context).square().mean()

    assert compiled_gradient_errors(model, loss) == []  # nothing compiled: eager is eager
    wrong = compiled_gradient_errors(_gradient_dropping_compile(model), loss)
    assert "conv_in.weight" in wrong and "down_blocks.0.resnets.0.conv2.weight" in wrong
    assert "conv_out.weight" not in wrong  # after the last block: its gradient is right
    assert all(p.grad is None for p in model.parameters())
    assert compiled_gradient_errors(uncompile_blocks(model), loss) == []
    assert compiled_gradient_errors(compile_blocks(model), loss) == []  # inductor, fp32
    units = layers(model)  # one level finer: each block's resnets, attentions, resamplers
    inside = {id(m) for b in blocks(model) for m in b.modules() if m is not b}
    assert len(units) > len(blocks(model)) and all(id(u) in inside for u in units)
    compile_blocks(uncompile_blocks(model), finer=True)  # each shape its own graph, none eager
    assert torch._dynamo.config.recompile_limit >= len(units)


def test_compiled_training_falls_back_to_eager_when_its_gradients_are_wrong(
    folder, tmp_path, monkeypatch
):
    """The trainer compares a compiled step's gradients with eager's (the first after an
    update): wrong by blocks, it compiles by layers and checks again; wrong again, it trains
    eagerly on. Each fallback is a warning naming the count."""
    from destatic.training import trainer

    monkeypatch.setattr(trainer, "compile_blocks", _gradient_dropping_compile)
    compiled = "compile = true"
    checked = load_config(write_config(tmp_path / "a.toml", folder, tmp_path / "a", compiled))
    with pytest.warns(UserWarning) as caught:
        train(checked)
    messages = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    assert len(messages) == 2, messages
    assert messages[0].startswith("torch.compile by blocks gave") and "by layers" in messages[0]
    assert messages[1].startswith("torch.compile by layers gave") and "eagerly" in messages[1]
    monkeypatch.setattr(trainer._Run, "_check_compiled", lambda self, part: None)
    blind = load_config(write_config(tmp_path / "b.toml", folder, tmp_path / "b", compiled))
    train(blind)
    name = "down_blocks.0.resnets.0.conv2.weight"
    moved = final_weights(tmp_path / "a")[name] - final_weights(tmp_path / "b")[name]
    assert float(moved.abs().max()) > 1e-3  # the checked run trained the blocks
