"""Rectified-flow reflow (``[train] task = "reflow"``) of a trained flow pipeline into a 1–4
step student, guidance folded in (:mod:`~destatic.training.tasks.distillation`).

Reflow (Liu et al. 2022, "Flow Straight and Fast", §2.3). The teacher's deterministic ODE solve
(with CFG at w) couples each noise n with a sample x̂0 = Φ(n, w, c). Training the flow objective
on the straight interpolation between these *paired* endpoints, ``x_t = (1-t)·x̂0 + t·n`` (in
σ-space ``x = x̂0 + σ·n``), target velocity ``n - x̂0``, gives a flow with straighter paths, so
Euler with few steps lands near Φ(n). The pairs are drawn once, in chunks written atomically
under ``output.dir/pairs``: a killed run keeps every finished chunk, and chunks depend only on
their index, so a resumed cache equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from destatic.io import CheckpointError, atomic_file, load_safetensors, write_atomic
from destatic.pipelines import Pipeline
from destatic.process import Denoiser, RectifiedFlow
from destatic.sampling import GRIDS, SAMPLER_INFO, make_sigmas, sample
from destatic.training.config import Config, ConfigError, choice, require
from destatic.training.data import hash_module
from destatic.training.tasks.base import Batch, register
from destatic.training.tasks.distillation import (
    DistillationTask,
    check_student_options,
    guided_denoise,
    load_teacher,
    student_defaults,
    student_from_teacher,
)

__all__ = ["ReflowTask", "ReflowTrainConfig", "reflow_pairs", "teacher_solutions"]


@dataclass
class ReflowTrainConfig:
    """The ``[reflow]`` table."""

    teacher: str = ""  # the pipeline folder to straighten ("" = the bundled default model)
    pairs: int = 2048  # (noise, sample) pairs drawn once with the teacher's ODE solve
    chunk: int = 64  # pairs per cache file (the unit of resumption) and per teacher batch
    sampler: str = "dpmpp_2m"  # the teacher's deterministic ODE solver
    sampler_steps: int = 16
    grid: str = ""  # "" = the teacher's default grid
    guidance_min: float = 3.0  # each pair's CFG scale, uniform in this range (folded in)
    guidance_max: float = 3.0
    embedding_dim: int = 64  # width of the student's w-embedding (time_cond_proj_dim)
    steps: int = 2  # the exported pipeline's default number of (euler) steps

    def check(self) -> None:
        require(self.pairs >= 1, f"reflow.pairs = {self.pairs}: use a positive integer")
        require(self.chunk >= 1, f"reflow.chunk = {self.chunk}: use a positive integer")
        choice("reflow.sampler", self.sampler, tuple(SAMPLER_INFO))
        require(
            not SAMPLER_INFO[self.sampler].stochastic,
            f"reflow.sampler = {self.sampler!r} draws fresh noise: reflow pairs need a "
            "deterministic ODE solver (euler, heun, dpmpp_2m, …)",
        )
        require(
            1 <= self.sampler_steps <= 1000,
            f"reflow.sampler_steps = {self.sampler_steps}: use 1 … 1000",
        )
        if self.grid:
            choice("reflow.grid", self.grid, tuple(GRIDS))
        check_student_options("reflow", self.guidance_min, self.guidance_max, self.embedding_dim)
        require(1 <= self.steps <= 1000, f"reflow.steps = {self.steps}: use 1 … 1000")


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
        write_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
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
            with atomic_file(path) as tmp:
                save_file(part, str(tmp))
        parts.append(part)
        bar.update(chunk)
    bar.close()
    return {key: torch.cat([p[key] for p in parts])[:count] for key in parts[0]}


@register
class ReflowTask(DistillationTask):
    """Reflow (module doc) of the rectified-flow ``[reflow] teacher`` on cached pairs."""

    name = "reflow"
    section = ReflowTrainConfig

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
        self.pipeline = self._pipeline(self.trainable)

    def _network(self, channels: int, side: int, device: torch.device) -> nn.Module:
        self.shape = (channels, side, side)
        return student_from_teacher(self.teacher.network, self.cfg.reflow.embedding_dim)

    def _meta(self) -> dict:
        r, d = self.cfg.reflow, self.cfg.data
        h = hashlib.sha1()
        hash_module(h, self.teacher.network)
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

    def _pipeline(self, trainable: nn.Module) -> Pipeline:
        t, r = self.teacher, self.cfg.reflow
        defaults = student_defaults(
            "euler", r.steps, r.guidance_min, r.guidance_max, self.cfg.sample
        )
        return Pipeline(trainable, t.autoencoder, t.text_encoder, t.process, t.target, defaults)
