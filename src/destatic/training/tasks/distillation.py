"""What distilling a trained pipeline into a 1–4 step generator shares: the guided teacher, its
σ-space ODE step, the student and the options. The methods are consistency distillation
(:mod:`~destatic.training.tasks.lcm`) and rectified-flow reflow
(:mod:`~destatic.training.tasks.reflow`).

Both students start as copies of the teacher's U-Net with one addition, a guidance-scale input
(LCM's w-conditioning, :func:`~destatic.models.unet.guidance_embedding`, zero-initialised so the
copy starts as the teacher): classifier-free guidance is *folded in*, and the exported pipeline
passes ``guidance`` to the network instead of running a second branch.

Everything is written in σ-space, ``x = x0 + σ·n`` (docs/architecture.md), with the teacher as a
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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from destatic.bundled import DEFAULT_MODEL
from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.pipelines import Pipeline, load
from destatic.process.targets import per_sample
from destatic.training.config import Config, ConfigError, SampleConfig, require
from destatic.training.tasks.denoiser import DenoiserTask

__all__ = [
    "DistillationTask",
    "check_student_options",
    "euler_step",
    "guided_denoise",
    "load_teacher",
    "noisy",
    "student_defaults",
    "student_from_teacher",
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
    teacher = load(folder or None)
    where = f"teacher {folder or DEFAULT_MODEL}"
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


def check_student_options(where: str, guidance_min: float, guidance_max: float, dim: int) -> None:
    """The options every student has: the folded-in guidance range and its embedding width."""
    require(
        1 <= guidance_min <= guidance_max,
        f"{where}.guidance_min = {guidance_min:g}, guidance_max = {guidance_max:g}: need "
        "1 ≤ guidance_min ≤ guidance_max (equal values fold in one fixed scale)",
    )
    require(
        2 <= dim <= 4096 and dim % 2 == 0,
        f"{where}.embedding_dim = {dim}: use an even width in 2 … 4096",
    )


def student_defaults(
    sampler: str, steps: int, lo: float, hi: float, sample: SampleConfig
) -> dict[str, Any]:
    """A student's generation defaults: its sampler and steps, the grid of its ``[sample]``
    table (unset: the model's default grid, not the teacher's pair grid), and the ``[sample]``
    guidance clamped to the folded-in range it was trained on."""
    defaults: dict[str, Any] = {"sampler": sampler, "steps": steps}
    if sample.grid:
        defaults["grid"] = sample.grid
    guidance = min(max(sample.guidance, lo), hi)
    return defaults | {"guidance": guidance, "guidance_range": [lo, hi]}


class DistillationTask(DenoiserTask):
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
