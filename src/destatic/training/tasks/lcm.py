"""Latent consistency distillation (``[train] task = "lcm"``) of a trained pipeline into a
1–4 step student, guidance folded in (:mod:`~destatic.training.tasks.distillation`: the guided
teacher and its ODE step).

Consistency distillation (Song et al. 2023, Algorithm 2; LCM, Luo et al. 2023, Algorithm 1).
Draw x0 from the data, n ~ N(0, I), a neighbouring pair σ_{n+1} > σ_n of the teacher's N-step
grid (LCM's "skipping-step" k over T timesteps is N = T/k) and w ~ U[w_min, w_max]. With the
consistency function ``f_θ(x, σ, w, c) = c_skip(σ)·x + c_out(σ)·D_θ(x, σ, w, c)``
(:class:`~destatic.process.ConsistencyTarget`, f(x, 0) = x exactly):

    x_{n+1} = x0 + σ_{n+1}·n,
    x̂_n    = x_{n+1} stepped to σ_n by the guided teacher,
    L      = d(f_θ(x_{n+1}, σ_{n+1}, w, c), f_θ⁻(x̂_n, σ_n, w, c)),

with θ⁻ an EMA of θ (decay μ, updated after each optimizer step; no gradient through it) and d
the pseudo-Huber distance ``√(‖a - b‖² + c²) - c`` (Song & Dhariwal 2023, c = 0.00054·√dim) or
the mean squared error. At σ_n = 0 the target is x̂_n itself, the teacher's guided x̂0: the
boundary that anchors the chain. The exported pipeline's denoiser is f_θ itself, so the ``lcm``
sampler (x̂0, then fresh noise to the next σ) is multistep consistency sampling.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.pipelines import Pipeline
from destatic.process import ConsistencyTarget, Denoiser
from destatic.sampling import GRIDS, make_sigmas
from destatic.training.config import Config, choice, require
from destatic.training.tasks.base import Batch, register
from destatic.training.tasks.distillation import (
    DistillationTask,
    check_student_options,
    euler_step,
    guided_denoise,
    load_teacher,
    noisy,
    student_defaults,
    student_from_teacher,
)

__all__ = ["ConsistencyPair", "LCMTask", "LCMTrainConfig"]


@dataclass
class LCMTrainConfig:
    """The ``[lcm]`` table."""

    teacher: str = ""  # the pipeline folder to distil ("" = the bundled default model)
    teacher_steps: int = 32  # N: pairs (σ_{n+1}, σ_n) are neighbours on the teacher's N-step grid
    grid: str = "normal"  # that grid (uniform in the teacher's own time)
    guidance_min: float = 1.0  # the folded-in CFG scale w is drawn uniformly from this range
    guidance_max: float = 5.0
    embedding_dim: int = 64  # width of the student's w-embedding (time_cond_proj_dim)
    target_decay: float = 0.95  # EMA μ of the target network θ⁻
    loss: str = "pseudo_huber"  # pseudo_huber | l2
    huber_c: float = 0.00054  # pseudo-Huber c per √(values per sample) (Song & Dhariwal 2023)
    sigma_data: float = 0.5  # consistency parameterisation c_skip/c_out (LCM)
    timestep_scaling: float = 10.0  # LCM's timestep scaling (× the process's timesteps × σ)
    steps: int = 4  # the exported pipeline's default number of steps

    def check(self) -> None:
        require(
            2 <= self.teacher_steps <= 1000,
            f"lcm.teacher_steps = {self.teacher_steps}: use 2 … 1000",
        )
        choice("lcm.grid", self.grid, tuple(GRIDS))
        check_student_options("lcm", self.guidance_min, self.guidance_max, self.embedding_dim)
        require(0 <= self.target_decay < 1, f"lcm.target_decay = {self.target_decay}: use [0, 1)")
        choice("lcm.loss", self.loss, ("pseudo_huber", "l2"))
        require(self.huber_c > 0, f"lcm.huber_c = {self.huber_c}: use > 0")
        require(self.sigma_data > 0, f"lcm.sigma_data = {self.sigma_data}: use > 0")
        require(
            self.timestep_scaling > 0,
            f"lcm.timestep_scaling = {self.timestep_scaling}: use > 0",
        )
        require(1 <= self.steps <= 1000, f"lcm.steps = {self.steps}: use 1 … 1000")


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


@register
class LCMTask(DistillationTask):
    """Latent consistency distillation (module doc) of ``[lcm] teacher``."""

    name = "lcm"
    section = LCMTrainConfig

    def __init__(self, cfg: Config, device: torch.device, progress: bool = True):
        self.teacher = load_teacher(cfg.lcm.teacher, device)
        super().__init__(cfg, device, progress)
        self._check(cfg)
        c, t = cfg.lcm, self.teacher
        self.sigmas = make_sigmas(c.grid, c.teacher_steps, process=t.process)  # N+1, float64
        scale = c.timestep_scaling * t.process.num_timesteps
        self.consistency = ConsistencyTarget(t.target, c.sigma_data, scale)
        self.teacher_denoiser = Denoiser(t.network, t.process, t.target)
        self.pipeline = self._pipeline(self.trainable)

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
        pair = self.trainable
        with torch.no_grad():
            d_w = guided_denoise(self.teacher_denoiser, x_hi, sigma_hi, cond, uncond, w)
            x_lo = euler_step(x_hi, d_w, sigma_hi, sigma_lo)
            f_target = Denoiser(pair.target, self.teacher.process, self.consistency)
            target = f_target(x_lo, sigma_lo, **cond, guidance=w)
        return x_hi, target, {**cond, "guidance": w, "sigma": sigma_hi}

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
        self.trainable.update_target(self.step, self.cfg.lcm.target_decay)
        x_hi, target, inputs = self.targets(batch, device)
        sigma = inputs.pop("sigma")
        f = Denoiser(model, self.teacher.process, self.consistency)
        pred = f(x_hi, sigma, **inputs)
        diff = (pred.float() - target.float()).flatten(1)
        if self.cfg.lcm.loss == "l2":
            return diff.pow(2).mean(1)
        c = self.cfg.lcm.huber_c * math.sqrt(diff.shape[1])
        return (diff.pow(2).sum(1) + c * c).sqrt() - c

    def _pipeline(self, trainable: nn.Module) -> Pipeline:
        t, c = self.teacher, self.cfg.lcm
        defaults = student_defaults("lcm", c.steps, c.guidance_min, c.guidance_max, self.cfg.sample)
        return Pipeline(
            trainable.student, t.autoencoder, t.text_encoder, t.process, self.consistency, defaults
        )
