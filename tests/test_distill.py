"""Distillation: the consistency parameterisation, the teacher's σ-space step, the LCM target with
an exact (Gaussian-mixture) teacher, the reflow pair cache, and both tasks end to end (train,
resume exactly, export, generate in 1/2/4 steps) on a tiny teacher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import destatic
from destatic.lab import GaussianMixture
from destatic.models.unet import UNet2DCondition, UNetConfig, guidance_embedding
from destatic.process import ConsistencyTarget, Denoiser, RectifiedFlow, consistency_coefficients
from destatic.sampling import make_sigmas, sample
from destatic.training import ConfigError, latest_checkpoint, load_config, train
from destatic.training.state import load_checkpoint
from destatic.training.tasks.distillation import (
    euler_step,
    guided_denoise,
    noisy,
    student_from_teacher,
)
from destatic.training.tasks.lcm import ConsistencyPair, LCMTask
from destatic.training.tasks.reflow import ReflowTask, reflow_pairs, teacher_solutions
from tests.training_fixtures import PIXEL_UNET, assert_same, final_weights, write_squares


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """12 coloured squares with captions (``name.txt`` beside ``name.png``)."""
    return write_squares(tmp_path_factory.mktemp("shapes"), 12)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny random rectified-flow pixel pipeline (MiniLM text) saved as a folder."""
    from destatic.models.text import MiniLMTextEncoder
    from destatic.pipelines import Pipeline, save

    torch.manual_seed(0)
    net = UNet2DCondition(UNetConfig(**PIXEL_UNET))
    with torch.no_grad():
        for p in net.parameters():  # no zero branches: every input matters
            p.add_(0.05 * torch.randn_like(p))
    pipe = Pipeline(net, None, MiniLMTextEncoder.from_package(8), RectifiedFlow(), "flow")
    root = tmp_path_factory.mktemp("teacher")
    save(pipe, root)
    return root


def write_config(path: Path, folder: Path, teacher: Path, out: Path, task: str, extra: str = ""):
    table = (
        f'[lcm]\nteacher = "{teacher}"\nteacher_steps = 4\ngrid = "normal"\nguidance_min = 1.0\n'
        "guidance_max = 4.0\nembedding_dim = 8\ntarget_decay = 0.9\n"
        if task == "lcm"
        else f'[reflow]\nteacher = "{teacher}"\npairs = 10\nchunk = 4\nsampler = "euler"\n'
        'sampler_steps = 3\ngrid = "normal"\n'
        "guidance_min = 2.0\nguidance_max = 3.0\nembedding_dim = 8\n"
    )
    path.write_text(
        f"""
[data]
dataset = "folder"
path = "{folder}"
size = 16
caption_dropout = 0.0

{table}
[optim]
lr = 1e-3
warmup_steps = 1

[train]
task = "{task}"
steps = 4
batch_size = 4
checkpoint_every = 1
log_every = 1
sample_every = 0
threads = 1
progress = false
tensorboard = false
{extra}

[sample]
prompts = ["a red square"]
sampler = "{"lcm" if task == "lcm" else "euler"}"
steps = 2
guidance = 3.0

[output]
dir = "{out}"
"""
    )
    return path


# ---------------------------------------------------------------------------------------------
# The math


def test_consistency_function_meets_the_boundary_condition_exactly():
    net = UNet2DCondition(UNetConfig(**{**PIXEL_UNET, "cross_attention_dim": 8}))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    flow, target = RectifiedFlow(), ConsistencyTarget("flow")
    f, d = Denoiser(net, flow, target), Denoiser(net, flow, "flow")
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8)
    with torch.no_grad():
        assert torch.equal(f(x, torch.zeros(2), context=ctx), x)  # f(x, 0) = x, bit for bit
        for sigma in (1 / 31, 0.5, 7.0, math.inf):  # elsewhere f is the network's x̂0
            s = torch.full((2,), sigma, dtype=torch.float64)
            torch.testing.assert_close(
                f(x, s, context=ctx), d(x, s, context=ctx), atol=2e-5, rtol=0
            )
    c_skip, c_out = consistency_coefficients(torch.tensor([0.0, 1e-4, 1 / 32, 1e30]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[2] < 1e-5 and abs(c_out[2] - 1) < 1e-5  # LCM's scaling: f ≈ x̂0 on the grid
    assert float(c_skip[3] * 1e30) < 1e-30  # c_skip·σ → 0: finite at σ = ∞ on the state x/σ


def test_teacher_step_is_the_flow_models_euler_step(mixture):
    """σ-space Euler/DDIM with an exact x̂0 = Euler in flow time t with velocity (x_t - D)/t."""
    g = torch.Generator().manual_seed(0)
    x0, n = mixture.sample(6, g), torch.randn(6, 2, generator=g, dtype=torch.float64)
    sigma = torch.tensor([math.inf, 3.0, 1.0, 0.5, 0.2, 0.05], dtype=torch.float64)
    sigma_next = torch.tensor([4.0, 1.0, 0.5, 0.1, 0.0, 0.0], dtype=torch.float64)
    x = noisy(x0, n, sigma)
    assert torch.equal(x[0], n[0]) and torch.allclose(x[1:], x0[1:] + sigma[1:, None] * n[1:])
    d = mixture.denoise(x, sigma)
    stepped = euler_step(x, d, sigma, sigma_next)
    t, t_next = sigma / (1 + sigma), sigma_next / (1 + sigma_next)
    t = torch.where(torch.isinf(sigma), torch.ones_like(t), t)
    x_t = torch.where(torch.isinf(sigma)[:, None], n, x / (1 + sigma[:, None]))
    v = (x_t - d) / t[:, None]
    want_t = x_t + (t_next - t)[:, None] * v
    torch.testing.assert_close(stepped / (1 + sigma_next[:, None]), want_t)
    # and the step from σ = ∞ is the one destatic.sampling.sample takes there
    first = sample("euler", mixture.denoise, n[:1], torch.tensor([math.inf, 4.0, 0.0]))
    second = euler_step(stepped[:1], mixture.denoise(stepped[:1], sigma_next[:1]), sigma_next[:1],
                        torch.zeros(1, dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(first, second)


def test_the_exact_flow_map_is_the_fixed_point_of_the_lcm_target(smooth_mixture):
    """With an exact teacher, the consistency target built from the exact ODE flow map f*
    (σ → 0) misses f*(x_{n+1}) only by the Euler step's local error O(h²): the consistency
    loss has the flow map as its fixed point as the grid refines."""
    mix, flow = smooth_mixture, RectifiedFlow()

    def flow_map(x, sigma):  # f*(x, σ): the exact ODE solution at σ = 0 (fine Heun)
        grid = make_sigmas("normal", 400, process=flow)
        start = int(torch.searchsorted(-grid, -torch.tensor(float(sigma[0]), dtype=torch.float64)))
        tail = (
            torch.cat([sigma[:1], grid[start:]]) if float(sigma[0]) > grid[start] else grid[start:]
        )
        return sample("heun", mix.denoise, x, tail)

    g = torch.Generator().manual_seed(1)
    x0, n = mix.sample(128, g), torch.randn(128, 2, generator=g, dtype=torch.float64)
    errors = []
    for steps in (8, 16, 32):
        sigmas = make_sigmas("normal", steps, process=flow)
        hi, lo = sigmas[steps // 2 : steps // 2 + 1], sigmas[steps // 2 + 1 : steps // 2 + 2]
        x_hi = noisy(x0, n, hi.expand(128))
        x_lo = euler_step(x_hi, mix.denoise(x_hi, hi.expand(128)), hi.expand(128), lo.expand(128))
        gap = flow_map(x_hi, hi) - flow_map(x_lo, lo)
        errors.append(float(gap.pow(2).sum(1).mean().sqrt()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] / errors[2] > 3  # second order: halving h quarters the local error


def test_lcm_target_with_an_exact_teacher(folder, teacher, tmp_path):
    """LCMTask's target: the guided exact teacher's one ODE step (written in flow time here)
    from x0 + σ_{n+1}·n, through the target network's consistency function f_θ⁻."""
    cfg = load_config(write_config(tmp_path / "c.toml", folder, teacher, tmp_path / "r", "lcm"))
    task = LCMTask(cfg, torch.device("cpu"), progress=False)
    cond_mix = GaussianMixture.standard(768, components=3, std=0.3, seed=1)
    uncond_mix = GaussianMixture.standard(768, components=3, std=0.3, seed=2)
    empty = task.bank.tokens[0]

    def exact(x, sigma, context, **_):  # D(x, σ, c): one mixture per prompt, "" the other
        is_uncond = (context - empty.to(context)).abs().flatten(1).amax(1) == 0
        flat = x.flatten(1)
        d = torch.where(
            is_uncond[:, None], uncond_mix.denoise(flat, sigma), cond_mix.denoise(flat, sigma)
        )
        return d.reshape(x.shape).to(x.dtype)

    task.teacher_denoiser = exact
    with torch.no_grad():  # a target network that differs from the teacher
        for p in task.trainable.target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = task.draw(torch.arange(4), torch.Generator().manual_seed(0))
    batch["interval"] = torch.tensor([0, 1, 2, 3])  # σ = ∞ → σ₁, …, σ₃ → 0
    x_hi, target, _ = task.targets(batch, torch.device("cpu"))

    sig = task.sigmas
    s_hi, s_lo = sig[batch["interval"]], sig[batch["interval"] + 1]
    x0, n, w = batch["x0"], batch["noise"], batch["guidance"]
    ctx = task.bank.tokens[batch["caption"]]
    t, t_lo = s_hi / (1 + s_hi), s_lo / (1 + s_lo)
    t = torch.where(torch.isinf(s_hi), torch.ones_like(t), t)
    x_t = (1 - t).view(-1, 1, 1, 1).float() * x0 + t.view(-1, 1, 1, 1).float() * n
    state = torch.where(torch.isinf(s_hi).view(-1, 1, 1, 1), n, x0 + s_hi.view(-1, 1, 1, 1) * n)
    d_c = cond_mix.denoise(state.flatten(1), s_hi).reshape(state.shape)
    d_u = uncond_mix.denoise(state.flatten(1), s_hi).reshape(state.shape)
    d_w = d_u + w.view(-1, 1, 1, 1) * (d_c - d_u)
    v = (x_t - d_w) / t.view(-1, 1, 1, 1)
    x_lo = (x_t + (t_lo - t).view(-1, 1, 1, 1) * v) * (1 + s_lo.view(-1, 1, 1, 1))  # back to σ
    f = Denoiser(task.trainable.target, task.teacher.process, task.consistency)
    with torch.no_grad():
        want = f(x_lo.float(), s_lo, context=ctx, guidance=w)
    torch.testing.assert_close(target, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(target[3], d_w[3].float())  # σ_n = 0: the teacher's guided x̂0
    assert torch.equal(x_hi[0], n[0])  # σ = ∞ starts from the noise


# ---------------------------------------------------------------------------------------------
# The student network


def test_student_starts_as_its_teacher_and_embeds_guidance_like_diffusers():
    import diffusers

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(
        **{**PIXEL_UNET, "cross_attention_dim": 8}, time_cond_proj_dim=8
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = UNet2DCondition(UNetConfig.from_diffusers(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 700.0]), torch.randn(2, 4, 8)
    w = torch.tensor([2.0, 7.5])
    embed = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding
    with torch.no_grad():
        want = ref(x, t, ctx, timestep_cond=embed(None, w - 1, embedding_dim=8)).sample
        torch.testing.assert_close(ours(x, t, ctx, guidance=w), want, atol=1e-5, rtol=1e-5)
    assert guidance_embedding(w, 8).shape == (2, 8)

    teacher = UNet2DCondition(UNetConfig(**{**PIXEL_UNET, "cross_attention_dim": 8}))
    student = student_from_teacher(teacher, 8)
    with torch.no_grad():
        base = teacher(x, t, ctx)
        for scale in (1.0, 4.0):
            assert torch.equal(student(x, t, ctx, guidance=scale), base)
    with pytest.raises(ValueError, match="pass guidance="):
        student(x, t, ctx)
    with pytest.raises(ValueError, match="takes no guidance"):
        teacher(x, t, ctx, guidance=2.0)


def test_target_network_follows_the_student_once_per_step():
    pair = ConsistencyPair(UNet2DCondition(UNetConfig(**{**PIXEL_UNET, "cross_attention_dim": 8})))
    with torch.no_grad():
        for p in pair.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in pair.target.parameters()]
    pair.update_target(0, 0.9)  # nothing to absorb before the first update
    assert all(torch.equal(a, b) for a, b in zip(before, pair.target.parameters(), strict=True))
    pair.update_target(1, 0.9)
    pair.update_target(1, 0.9)  # a second micro-batch of the same step: no second update
    for a, b, s in zip(before, pair.target.parameters(), pair.student.parameters(), strict=True):
        torch.testing.assert_close(b, 0.9 * a + 0.1 * s)
    assert not any(p.requires_grad for p in pair.target.parameters())


# ---------------------------------------------------------------------------------------------
# End to end


def test_lcm_trains_resumes_exactly_and_exports_a_few_step_model(folder, teacher, tmp_path):
    straight = write_config(tmp_path / "a.toml", folder, teacher, tmp_path / "straight", "lcm")
    model = train(load_config(straight))
    stopped = write_config(tmp_path / "b.toml", folder, teacher, tmp_path / "stopped", "lcm")
    train(load_config(stopped, {"train.steps": 2}))  # a run that stops after step 2 …
    train(load_config(stopped))  # … and resumes to step 4
    assert_same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped"))
    state = load_checkpoint(latest_checkpoint(tmp_path / "straight" / "checkpoints"))["model"]
    assert float(state["synced"]) == 3  # θ⁻ absorbed updates 1–3 (the 4th comes next step)
    assert any(not torch.equal(state[f"target.{k}"], v) for k, v in _student(state).items())

    pipe = destatic.load(model)
    assert isinstance(pipe.target, ConsistencyTarget) and pipe.guidance_embedded
    assert pipe.defaults["sampler"] == "lcm" and pipe.defaults["guidance_range"] == [1.0, 4.0]
    assert (
        pipe.sampling_defaults["grid"] == "sgm_uniform"
    )  # not the teacher's pair grid ([lcm] grid)
    calls = []
    pipe.network.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    for steps in (1, 2, 4):
        images = pipe.generate(["a red square", "a blue square"], steps=steps, guidance=2.5)
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert calls == [2] * 7  # one call per step, no second (unconditional) branch
    assert torch.equal(pipe.generate("a red square"), pipe.generate("a red square", steps=4))
    with pytest.raises(ValueError, match="no negative prompt"):
        pipe.generate("a red square", negative_prompt="blue")


def _student(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[8:]: v for k, v in state.items() if k.startswith("student.")}


def test_generate_cli_uses_the_distilled_models_defaults(folder, teacher, tmp_path):
    from typer.testing import CliRunner

    from destatic.cli import app
    from destatic.pipelines import GenerationRequest

    cfg = write_config(tmp_path / "a.toml", folder, teacher, tmp_path / "run", "lcm")
    model = train(load_config(cfg, {"train.steps": 1}))
    out = tmp_path / "cat.png"
    result = CliRunner().invoke(
        app, ["generate", "a red square", "--model", str(model), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    params = GenerationRequest.from_png(out)
    assert (params.sampler, params.steps, params.guidance) == ("lcm", 4, 3.0)


def test_reflow_pairs_are_the_teachers_ode_solutions_and_survive_a_kill(folder, teacher, tmp_path):
    cfg = load_config(write_config(tmp_path / "c.toml", folder, teacher, tmp_path / "r", "reflow"))
    task = ReflowTask(cfg, torch.device("cpu"), progress=False)
    pairs = task.pairs
    assert pairs["noise"].shape == (10, 3, 16, 16) and len(pairs["caption"]) == 10
    assert ((pairs["guidance"] >= 2) & (pairs["guidance"] <= 3)).all()
    # each sample is the teacher pipeline's own guided euler solve of that pair's noise
    pipe = destatic.load(teacher)
    names = {i: c for c, i in task.bank.index.items()}
    for i in (0, 9):
        image = pipe.generate(
            names[int(pairs["caption"][i])],
            noise=pairs["noise"][i : i + 1],
            sampler="euler",
            steps=3,
            grid="normal",  # the pairs' grid ([reflow] grid)
            guidance=float(pairs["guidance"][i]),
        )
        torch.testing.assert_close(
            image, pipe.decode(pairs["sample"][i : i + 1]), atol=1e-5, rtol=0
        )

    folder_ = tmp_path / "r" / "pairs"
    assert sorted(p.name for p in folder_.glob("chunk-*")) == [
        "chunk-00000.safetensors",
        "chunk-00001.safetensors",
        "chunk-00002.safetensors",
    ]
    # a killed generation: one chunk never written, one cut short; only those are made again
    (folder_ / "chunk-00001.safetensors").unlink()
    path = folder_ / "chunk-00002.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    made = []

    def make(k):
        made.append(k)
        return task.make_chunk(k)

    again = reflow_pairs(folder_, task._meta(), 10, 4, make, progress=False)
    assert made == [1, 2]
    for key in pairs:
        assert torch.equal(again[key], pairs[key])
    meta = {**task._meta(), "sampler_steps": 5}
    with pytest.raises(ConfigError, match=r"other settings.*sampler_steps"):
        reflow_pairs(folder_, meta, 10, 4, make, progress=False)


def test_reflow_trains_resumes_exactly_and_exports(folder, teacher, tmp_path):
    straight = write_config(tmp_path / "a.toml", folder, teacher, tmp_path / "straight", "reflow")
    model = train(load_config(straight))
    stopped = write_config(tmp_path / "b.toml", folder, teacher, tmp_path / "stopped", "reflow")
    train(load_config(stopped, {"train.steps": 2}))
    train(load_config(stopped))
    assert_same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped"))
    pipe = destatic.load(model)
    assert pipe.guidance_embedded and pipe.defaults["sampler"] == "euler"
    # the student steps on its own grid (uniform in t down to 0), not the teacher's pair grid
    assert pipe.sampling_defaults["grid"] == "sgm_uniform"
    for steps in (1, 2, 4):
        images = pipe.generate("a green square", steps=steps)
        assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_distillation_config_errors_are_clear(folder, teacher, tmp_path):
    path = write_config(tmp_path / "c.toml", folder, teacher, tmp_path / "r", "lcm")
    with pytest.raises(ConfigError, match="guidance_min = 5, guidance_max = 4"):
        load_config(path, {"lcm.guidance_min": 5.0})
    with pytest.raises(ConfigError, match=r"lcm\.teacher_steps = 1"):
        load_config(path, {"lcm.teacher_steps": 1})
    with pytest.raises(ConfigError, match=r"lcm\.loss = 'l1'"):
        load_config(path, {"lcm.loss": "l1"})
    with pytest.raises(ConfigError, match="embedding_dim = 7"):
        load_config(path, {"lcm.embedding_dim": 7})
    reflow = write_config(tmp_path / "d.toml", folder, teacher, tmp_path / "s", "reflow")
    with pytest.raises(ConfigError, match="deterministic ODE solver"):
        load_config(reflow, {"reflow.sampler": "euler_ancestral"})
    with pytest.raises(ConfigError, match="teacher draws 16"):
        LCMTask(load_config(path, {"data.size": 32}), torch.device("cpu"), progress=False)
    with pytest.raises(ConfigError, match='kind = "flow", shift = 1'):
        ReflowTask(load_config(reflow, {"objective.shift": 3.0}), torch.device("cpu"), False)
    from destatic.io import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        train(load_config(path, {"lcm.teacher": str(tmp_path / "nope")}))


def test_teacher_solutions_match_the_pipeline_with_one_scale_each(teacher):
    """Per-sample CFG scales: each row is what the pipeline draws with that one scale."""
    pipe = destatic.load(teacher)
    emb = pipe.text_encoder.encode(["a red square", "a red square"])
    empty = pipe.text_encoder.encode(["", ""])
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    w = torch.tensor([1.5, 4.0])
    got = teacher_solutions(
        pipe,
        noise,
        {"context": emb.tokens},
        {"context": empty.tokens},
        w,
        sampler="dpmpp_2m",
        steps=4,
    )
    for i in range(2):
        want = pipe.generate("a red square", noise=noise[i : i + 1], steps=4, guidance=float(w[i]))
        torch.testing.assert_close(pipe.decode(got[i : i + 1]), want, atol=1e-5, rtol=0)
    d = Denoiser(pipe.network, pipe.process, pipe.target)
    x, s = noise, torch.full((2,), 2.0)
    with torch.no_grad():
        both = guided_denoise(d, x, s, {"context": emb.tokens}, {"context": empty.tokens}, w)
        single = d(x[:1], s[:1], context=empty.tokens[:1])
    torch.testing.assert_close(
        both[:1], single + 1.5 * (d(x[:1], s[:1], context=emb.tokens[:1]) - single)
    )
