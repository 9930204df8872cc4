"""Distilling a trained pipeline into a 1–4 step generator: consistency distillation (LCM) and
rectified-flow reflow. Both students start as copies of the teacher's U-Net with one addition, a
guidance-scale input (LCM's w-conditioning, :func:`~destatic.models.unet.guidance_embedding`,
zero-initialised so the copy starts as the teacher): classifier-free guidance is *folded in*, and
the exported pipeline passes ``guidance`` to the network instead of running a second branch.

Everything below is written in σ-space, ``x = x0 + σ·n`` (DESIGN.md), with the teacher as a
denoiser ``D(x, σ, c)`` and, at σ = ∞, the state ``x/σ`` (= the noise n).

**Guided teacher.** ``D_w = D(x, σ, ∅) + w·(D(x, σ, c) - D(x, σ, ∅))`` (Ho & Salimans 2022), w
drawn per sample; LCM (Luo et al. 2023, eq. 13) writes it with ω = w - 1.

**The teacher's ODE step** (σ_{n+1} → σ_n). The probability-flow ODE is
``dx/dσ = (x - D(x, σ))/σ`` (Karras et al. 2022, eq. 4). Holding the x̂0 estimate fixed over the
step (DDIM, Song et al. 2021; the first-order "Euler" step of DPM-Solver++ in λ = -log σ):

    x_n = D_w + σ_n·ε̂,   ε̂ = (x_{n+1} - D_w)/σ_{n+1}      (ε̂ = x_{n+1}/σ_{n+1} → n at σ = ∞).

For a rectified-flow teacher this *is* its Euler step in flow time: with ``x_t = x/(1+σ)``,
``t = σ/(1+σ)`` and velocity ``v̂ = (x_t - D)/t``, the step ``x_t' = x_t + (t' - t)·v̂ =
(t'/t)·x_t + (1 - t'/t)·D`` equals ``x'/(1+σ')`` for the x' above (tested).

**Consistency distillation** (Song et al. 2023, Algorithm 2; LCM, Algorithm 1). Draw x0 from the
data, n ~ N(0, I), a neighbouring pair σ_{n+1} > σ_n of the teacher's N-step grid (LCM's
"skipping-step" k over T timesteps is N = T/k) and w ~ U[w_min, w_max]. With the consistency
function ``f_θ(x, σ, w, c) = c_skip(σ)·x + c_out(σ)·D_θ(x, σ, w, c)``
(:class:`~destatic.process.ConsistencyTarget`, f(x, 0) = x exactly):

    x_{n+1} = x0 + σ_{n+1}·n,
    x̂_n    = x_{n+1} stepped to σ_n by the guided teacher (above),
    L      = d(f_θ(x_{n+1}, σ_{n+1}, w, c), f_θ⁻(x̂_n, σ_n, w, c)),

with θ⁻ an EMA of θ (decay μ, updated after each optimizer step; no gradient through it) and d
the pseudo-Huber distance ``√(‖a - b‖² + c²) - c`` (Song & Dhariwal 2023, c = 0.00054·√dim) or
the mean squared error. At σ_n = 0 the target is x̂_n itself, the teacher's guided x̂0: the
boundary that anchors the chain. The exported pipeline's denoiser is f_θ itself, so the ``lcm``
sampler (x̂0, then fresh noise to the next σ) is multistep consistency sampling.

**Reflow** (Liu et al. 2022, "Flow Straight and Fast", §2.3). The teacher's deterministic ODE
solve (with CFG at w) couples each noise n with a sample x̂0 = Φ(n, w, c). Training the flow
objective on the straight interpolation between these *paired* endpoints,
``x_t = (1-t)·x̂0 + t·n`` (in σ-space ``x = x̂0 + σ·n``), target velocity ``n - x̂0``, gives a
flow with straighter paths, so Euler with few steps lands near Φ(n). The pairs are drawn once,
in chunks written atomically under ``output.dir/pairs``: a killed run keeps every finished
chunk, and chunks depend only on their index, so a resumed cache equals an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.pipelines.text_to_image import Pipeline
from destatic.process import ConsistencyTarget, Denoiser, RectifiedFlow
from destatic.process.targets import per_sample
from destatic.sampling import make_sigmas, sample
from destatic.training.config import Config, ConfigError
from destatic.training.tasks import Batch, DenoiserTask

__all__ = [
    "ConsistencyPair",
    "LCMTask",
    "ReflowTask",
    "euler_step",
    "guided_denoise",
    "load_teacher",
    "noisy",
    "reflow_pairs",
    "student_from_teacher",
    "teacher_solutions",
]


# ---------------------------------------------------------------------------------------------
# σ-space helpers


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x0 + σ·n`` per sample, and the state ``x/σ = n`` where σ = ∞."""
    inf = torch.isinf(sigma).reshape(-1, *[1] * (x0.ndim - 1))
    finite = torch.where(torch.isinf(sigma), torch.zeros_like(sigma), sigma)
    return torch.where(inf, noise, x0 + per_sample(finite, x0) * noise)


def euler_step(
    x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """The first-order ODE step σ → σ_next per sample: ``D + σ_next·(x - D)/σ`` (module doc);
    where σ = ∞ the state is x/σ, so ``(x - D)/σ`` is the state itself."""
    inf = torch.isinf(sigma)
    safe = torch.where(inf, torch.ones_like(sigma), sigma)
    eps = torch.where(inf.reshape(-1, *[1] * (x.ndim - 1)), x, (x - denoised) / per_sample(safe, x))
    return denoised + per_sample(sigma_next, x) * eps


def guided_denoise(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: Mapping[str, torch.Tensor],
    uncond: Mapping[str, torch.Tensor],
    scale: torch.Tensor,
) -> torch.Tensor:
    """``D_u + w·(D_c - D_u)`` with a per-sample scale w [B], both branches in one call."""
    both = denoiser(
        torch.cat([x, x]),
        torch.cat([sigma, sigma]),
        **{k: torch.cat([uncond[k], cond[k]]) for k in cond},
    )
    d_u, d_c = both.chunk(2)
    return d_u + per_sample(scale, x) * (d_c - d_u)


# ---------------------------------------------------------------------------------------------
# Teacher and student


def load_teacher(folder: str, device: torch.device) -> Pipeline:
    """The frozen teacher pipeline (``""``: the bundled default model), a plain text → image
    U-Net (not already distilled, not an inpainting model)."""
    import destatic

    teacher = destatic.load(folder or None)
    where = f"teacher {folder or destatic.DEFAULT_MODEL}"
    if not isinstance(teacher.network, UNet2DCondition):
        raise ConfigError(f"{where}: distillation needs a U-Net pipeline (the student's w-input)")
    if teacher.guidance_embedded:
        raise ConfigError(f"{where} is already guidance-distilled; distil its own teacher")
    if teacher.inpainting_model:
        raise ConfigError(f"{where} is an inpainting model; distil a text → image model")
    teacher.network.to(device).requires_grad_(False).eval()
    return teacher


def student_from_teacher(teacher: UNet2DCondition, embedding_dim: int) -> UNet2DCondition:
    """A copy of ``teacher`` with a w-embedding of width ``embedding_dim`` (zero: the copy
    computes exactly what the teacher does, for every w)."""
    fields = {**teacher.config.to_dict(), "time_cond_proj_dim": embedding_dim}
    student = UNet2DCondition(UNetConfig.from_dict(fields))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise ConfigError(f"cannot copy the teacher: missing {missing}, unexpected {unexpected}")
    return student.to(next(teacher.parameters()).dtype)


class ConsistencyPair(nn.Module):
    """The trained student θ and its target network θ⁻ (an EMA of θ, never trained by the
    optimizer), saved and restored together so a resumed run is exact. ``forward`` is the
    student's. ``synced``: the optimizer steps θ⁻ has absorbed."""

    def __init__(self, student: UNet2DCondition):
        super().__init__()
        self.student = student
        self.target = copy.deepcopy(student).requires_grad_(False)
        self.register_buffer("synced", torch.zeros(()))

    @property
    def config(self) -> UNetConfig:
        return self.student.config

    def forward(self, x, timestep, context, guidance=None):  # the student's
        return self.student(x, timestep, context, guidance=guidance)

    @torch.no_grad()
    def update_target(self, step: int, decay: float) -> None:
        """θ⁻ ← μ·θ⁻ + (1-μ)·θ once for each optimizer step up to ``step``."""
        if step <= int(self.synced):
            return
        for t, s in zip(self.target.parameters(), self.student.parameters(), strict=True):
            t.lerp_(s.detach(), 1 - decay)
        self.synced.fill_(step)


def _student_defaults(sampler: str, steps: int, lo: float, hi: float, sample) -> dict:
    """A student's generation defaults: its sampler and steps, the grid of its ``[sample]``
    table (unset: the model's default grid, not the teacher's pair grid), and the ``[sample]``
    guidance clamped to the folded-in range it was trained on."""
    defaults = {"sampler": sampler, "steps": steps}
    if sample.grid:
        defaults["grid"] = sample.grid
    guidance = min(max(sample.guidance, lo), hi)
    return defaults | {"guidance": guidance, "guidance_range": [lo, hi]}


class _DistillTask(DenoiserTask):
    """A denoiser task whose text encoder, autoencoder and process are the teacher's."""

    teacher: Pipeline

    def _text_encoder(self):
        return self.teacher.text_encoder

    def _autoencoder(self, device: torch.device):
        return self.teacher.autoencoder

    def _check(self, cfg: Config) -> None:
        if cfg.model.inpainting:
            raise ConfigError("model.inpainting: distillation trains text → image students")
        if self.autoencoder is None and cfg.data.size != self.teacher.default_size:
            raise ConfigError(
                f"data.size = {cfg.data.size} but the teacher draws {self.teacher.default_size}²"
            )


# ---------------------------------------------------------------------------------------------
# Consistency distillation


class LCMTask(_DistillTask):
    """Latent consistency distillation (module doc) of ``[lcm] teacher``."""

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.teacher = load_teacher(cfg.lcm.teacher, device)
        super().__init__(cfg, device, progress)
        self._check(cfg)
        c, t = cfg.lcm, self.teacher
        self.sigmas = make_sigmas(c.grid, c.teacher_steps, process=t.process)  # N+1, float64
        scale = c.timestep_scaling * t.process.num_timesteps
        self.consistency = ConsistencyTarget(t.target, c.sigma_data, scale)
        self.teacher_denoiser = Denoiser(t.network, t.process, t.target)
        self.pipeline = self._pipeline(self.model)

    def _network(self, channels: int, side: int, device: torch.device) -> nn.Module:
        return ConsistencyPair(
            student_from_teacher(self.teacher.network, self.cfg.lcm.embedding_dim)
        )

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        batch = super().draw(index, generator)
        n, c = len(index), self.cfg.lcm
        batch["interval"] = torch.randint(0, len(self.sigmas) - 1, (n,), generator=generator)
        u = torch.rand(n, generator=generator)
        batch["guidance"] = c.guidance_min + (c.guidance_max - c.guidance_min) * u
        return batch

    def targets(
        self, batch: Batch, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(x_{n+1}, the consistency target f_θ⁻(x̂_n, σ_n), the student's inputs)."""
        x0, noise = batch["x0"].to(device), batch["noise"].to(device)
        i = batch["interval"]
        sigma_hi, sigma_lo = self.sigmas[i].to(device), self.sigmas[i + 1].to(device)
        w = batch["guidance"].to(device)
        cond = self.conditioning(batch["caption"], device)
        uncond = self.conditioning(torch.zeros_like(batch["caption"]), device)
        x_hi = noisy(x0, noise, sigma_hi)
        pair = self.model
        with torch.no_grad():
            d_w = guided_denoise(self.teacher_denoiser, x_hi, sigma_hi, cond, uncond, w)
            x_lo = euler_step(x_hi, d_w, sigma_hi, sigma_lo)
            f_target = Denoiser(pair.target, self.teacher.process, self.consistency)
            target = f_target(x_lo, sigma_lo, **cond, guidance=w)
        return x_hi, target, {**cond, "guidance": w, "sigma": sigma_hi}

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        self.model.update_target(self.step, self.cfg.lcm.target_decay)
        x_hi, target, inputs = self.targets(batch, device)
        sigma = inputs.pop("sigma")
        f = Denoiser(model, self.teacher.process, self.consistency)
        pred = f(x_hi, sigma, **inputs)
        diff = (pred.float() - target.float()).flatten(1)
        if self.cfg.lcm.loss == "l2":
            return diff.pow(2).mean(1)
        c = self.cfg.lcm.huber_c * math.sqrt(diff.shape[1])
        return (diff.pow(2).sum(1) + c * c).sqrt() - c

    def _pipeline(self, weights: nn.Module) -> Pipeline:
        t, c = self.teacher, self.cfg.lcm
        defaults = _student_defaults(
            "lcm", c.steps, c.guidance_min, c.guidance_max, self.cfg.sample
        )
        return Pipeline(
            weights.student, t.autoencoder, t.text_encoder, t.process, self.consistency, defaults
        )


# ---------------------------------------------------------------------------------------------
# Reflow


@torch.no_grad()
def teacher_solutions(
    teacher: Pipeline,
    noise: torch.Tensor,
    cond: Mapping[str, torch.Tensor],
    uncond: Mapping[str, torch.Tensor],
    scale: torch.Tensor,
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 16,
    grid: str | None = None,
) -> torch.Tensor:
    """The teacher's guided probability-flow ODE solve from unit ``noise`` (at the grid's first
    σ) to σ = 0: model-space samples x̂0, per-sample CFG scales ``scale``."""
    sigmas = make_sigmas(grid or teacher.default_grid, steps, process=teacher.process)
    denoiser = Denoiser(teacher.network, teacher.process, teacher.target)
    start = float(sigmas[0])
    x = noise if math.isinf(start) else noise * start

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return guided_denoise(denoiser, x, sigma, cond, uncond, scale)

    return sample(sampler, guided, x, sigmas)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def reflow_pairs(
    folder: Path,
    meta: dict,
    count: int,
    chunk: int,
    make_chunk: Callable[[int], dict[str, torch.Tensor]] | None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The first ``count`` pairs of the cache in ``folder``: ``chunk-NNNNN.safetensors`` files of
    ``chunk`` pairs each, made by ``make_chunk(k)`` when missing or damaged and written
    atomically. ``meta`` (the settings the pairs depend on) is kept in ``meta.json``; a cache made
    with other settings is an error, never mixed in. ``make_chunk=None``: only read."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from destatic.checkpoints import CheckpointError, load_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        stored = json.loads(meta_path.read_text(encoding="utf-8"))
        if stored != meta:
            changed = sorted(k for k in {*stored, *meta} if stored.get(k) != meta.get(k))
            raise ConfigError(
                f"{folder} holds reflow pairs made with other settings ({', '.join(changed)}); "
                "delete it or use another output.dir"
            )
    elif make_chunk is not None:
        _atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1)))
    chunks = math.ceil(count / chunk)
    parts: list[dict[str, torch.Tensor]] = []
    bar = tqdm(total=chunks * chunk, desc="reflow pairs", unit="pair", disable=not progress)
    for k in range(chunks):
        path = folder / f"chunk-{k:05d}.safetensors"
        part = None
        if path.is_file():
            try:
                part = load_safetensors(path)
            except CheckpointError:
                part = None  # damaged: made again
        if part is None:
            if make_chunk is None:
                raise ConfigError(f"{path} is missing; run the pair generation first")
            part = {k_: v.contiguous().cpu() for k_, v in make_chunk(k).items()}
            _atomic_write(path, lambda p, part=part: save_file(part, str(p)))
        parts.append(part)
        bar.update(chunk)
    bar.close()
    return {key: torch.cat([p[key] for p in parts])[:count] for key in parts[0]}


class ReflowTask(_DistillTask):
    """Reflow (module doc) of the rectified-flow ``[reflow] teacher`` on cached pairs."""

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.teacher = load_teacher(cfg.reflow.teacher, device)
        t = self.teacher
        if (
            not isinstance(t.process, RectifiedFlow)
            or getattr(t.target, "name", t.target) != "flow"
        ):
            raise ConfigError(
                "reflow straightens a rectified-flow teacher (process flow, target flow)"
            )
        super().__init__(cfg, device, progress)
        self._check(cfg)
        if self.objective.process != t.process or self.objective.target.name != "flow":
            raise ConfigError(
                f'[objective] must be the teacher\'s: kind = "flow", shift = {t.process.shift:g}'
            )
        self.device = device
        self.pairs = self._pairs(progress)
        self.pipeline = self._pipeline(self.model)

    def _network(self, channels: int, side: int, device: torch.device) -> nn.Module:
        self.shape = (channels, side, side)
        return student_from_teacher(self.teacher.network, self.cfg.reflow.embedding_dim)

    def _meta(self) -> dict:
        from destatic.training.data import _hash_module

        r, d = self.cfg.reflow, self.cfg.data
        h = hashlib.sha1()
        _hash_module(h, self.teacher.network)
        names = "\n".join(sorted(self.bank.index, key=self.bank.index.get))
        return {
            "teacher": h.hexdigest()[:20],
            "captions": hashlib.sha1(names.encode()).hexdigest()[:20],
            "data": {"dataset": d.dataset, "path": d.path, "size": d.size, "alt": d.alt_captions},
            "sampler": r.sampler,
            "sampler_steps": r.sampler_steps,
            "grid": r.grid or self.teacher.default_grid,
            "shift": self.teacher.process.shift,
            "guidance": [r.guidance_min, r.guidance_max],
            "chunk": r.chunk,
            "seed": self.cfg.train.seed,
        }

    def make_chunk(self, k: int) -> dict[str, torch.Tensor]:
        """Pairs ``k·chunk …``: everything random drawn from a generator seeded by (seed, k)."""
        r = self.cfg.reflow
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + 7_919 * (k + 1))
        n = r.chunk
        rows = torch.randint(0, len(self.caption_ids), (n,), generator=g)
        choice = torch.rand(n, generator=g)
        captions = torch.stack(
            [ids[int(c * len(ids))] for ids, c in zip(self._ids(rows), choice, strict=True)]
        )
        w = r.guidance_min + (r.guidance_max - r.guidance_min) * torch.rand(n, generator=g)
        noise = torch.randn((n, *self.shape), generator=g)
        device, dtype = self.device, self.teacher.dtype
        cond = self.conditioning(captions, device)
        uncond = self.conditioning(torch.zeros_like(captions), device)
        x0 = teacher_solutions(
            self.teacher,
            noise.to(device, dtype),
            cond,
            uncond,
            w.to(device),
            sampler=r.sampler,
            steps=r.sampler_steps,
            grid=r.grid or None,
        )
        return {"noise": noise, "sample": x0.float().cpu(), "caption": captions, "guidance": w}

    def _pairs(self, progress: bool) -> dict[str, torch.Tensor]:
        r = self.cfg.reflow
        folder = Path(self.cfg.output.dir) / "pairs"
        meta = self._meta()
        dist = torch.distributed
        shared = dist.is_available() and dist.is_initialized()
        if shared and dist.get_rank() != 0:
            dist.barrier()  # rank 0 draws the pairs
            return reflow_pairs(folder, meta, r.pairs, r.chunk, None, progress=False)
        if progress:
            print(f"reflow: {r.pairs} teacher pairs in {folder}", file=sys.stderr)
        pairs = reflow_pairs(folder, meta, r.pairs, r.chunk, self.make_chunk, progress)
        if shared:
            dist.barrier()
        return pairs

    @property
    def num_items(self) -> int:
        return len(self.pairs["noise"]) if hasattr(self, "pairs") else len(self.caption_ids)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> Batch:
        p = self.pairs
        return {
            "x0": p["sample"][index],
            "noise": p["noise"][index],
            "caption": p["caption"][index],
            "guidance": p["guidance"][index],
            "sigma": self.objective.sample_sigma(len(index), generator),
        }

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        cond = self.conditioning(batch["caption"], device)
        cond["guidance"] = batch["guidance"].to(device)
        return self.objective.loss(
            model, batch["x0"].to(device), cond, sigma=batch["sigma"], noise=batch["noise"]
        )

    def _pipeline(self, weights: nn.Module) -> Pipeline:
        t, r = self.teacher, self.cfg.reflow
        defaults = _student_defaults(
            "euler", r.steps, r.guidance_min, r.guidance_max, self.cfg.sample
        )
        return Pipeline(weights, t.autoencoder, t.text_encoder, t.process, t.target, defaults)
