"""The training loop: one code path for every task, device and number of processes.

Each optimizer step takes the next ``batch_size`` rows of an epoch permutation (seeded by
``seed`` and the epoch, so the data position is a pure function of the step) and draws every
random number of the step (σ, noise, caption choice and dropout, latent samples) for the whole
global batch from one generator. Process ``r`` of ``W`` then trains on its ``1/W`` share in
``grad_accum`` micro-batches; DDP averages the gradients. One process with the same global batch
therefore computes the same update, up to float summation order.

Per step: AdamW with warm-up and an optional cosine/linear decay (``LambdaLR``), gradient
clipping, an EMA of the weights (``torch.optim.swa_utils.AveragedModel`` with the usual warm-up
``min(decay, (1+n)/(10+n))``), autocast where it pays (bf16 on GPUs that support it). A loss or
gradient that is NaN/inf skips the update with a warning; ``max_bad_steps`` in a row stop the
run with an error naming the last good checkpoint. A checkpoint is never written from weights
that are not finite.

Every ``checkpoint_every`` steps the full state goes to ``checkpoints/`` atomically
(:mod:`destatic.training.state`) and the EMA weights are exported as an inference pipeline in
``model/``. Running the same command again resumes from the newest checkpoint: the result is
the same as a run that never stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from destatic.checkpoints import CheckpointError
from destatic.training.config import Config, ConfigError
from destatic.training.distributed import World, init_world
from destatic.training.monitor import Monitor, plot_loss, save_grid
from destatic.training.state import latest_checkpoint, load_checkpoint, save_checkpoint
from destatic.training.tasks import Batch, Task, make_task

__all__ = ["TrainingError", "resolve_device", "train"]


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and where the last good checkpoint is."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"train.device = {name!r} is not a torch device") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device asks for CUDA but torch sees no GPU; use 'auto' or 'cpu'")
    return device


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    # auto: bf16 where the hardware gains from it (GPUs with bf16 units); fp32 on CPU.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _lr_lambda(cfg: Config):
    o, steps = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
        if o.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if o.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def _ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    def avg(ema_param: torch.Tensor, param: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        return d * ema_param + (1 - d) * param

    return torch.optim.swa_utils.AveragedModel(model, avg_fn=avg, use_buffers=True)


def _finite(module: nn.Module) -> bool:
    return all(
        bool(torch.isfinite(p).all()) for p in module.state_dict().values() if p.is_floating_point()
    )


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> torch.Tensor:
    """Dataset rows of optimizer step ``step``: consecutive slices of per-epoch permutations."""
    start = step * batch_size
    rows = []
    while len(rows) < batch_size:
        epoch, offset = divmod(start + len(rows), n)
        order = _epoch_order(seed, epoch, n)
        rows.extend(order[offset : offset + batch_size - len(rows)].tolist())
    return torch.tensor(rows)


def _share(batch: Batch, world: World, accum: int) -> list[Batch]:
    """This process's micro-batches of a global batch."""
    n = next(iter(batch.values())).shape[0]
    per = n // (world.size * accum)
    parts = []
    for j in range(accum):
        start = (world.rank * accum + j) * per
        parts.append({k: v[start : start + per] for k, v in batch.items()})
    return parts


class _Run:
    def __init__(self, cfg: Config, world: World, device: torch.device, task: Task):
        self.cfg, self.world, self.device, self.task = cfg, world, device, task
        self.out = Path(cfg.output.dir)
        self.ckpt_dir = self.out / "checkpoints"
        model = task.model.to(device)
        model.train()
        self.model = model
        if world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.trained: nn.Module = DistributedDataParallel(model, device_ids=ids)
        else:
            self.trained = model
        o = cfg.optim
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        self.ema = _ema(model, o.ema_decay) if o.ema_decay > 0 else None
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.amp = _autocast_dtype(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is torch.float16)
        self.step = 0
        self.bad = 0

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "step": self.step,
            "samples_seen": self.step * self.cfg.train.batch_size,
            "bad_steps": self.bad,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"
            },
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "config": self.cfg.to_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def restore(self, folder: Path) -> None:
        state = load_checkpoint(folder)
        saved = state.get("config", {})
        for section in (
            "model",
            "objective",
            "autoencoder",
            "evaluator",
            "control",
            "lcm",
            "reflow",
            "lora",
        ):
            # a section newer than the checkpoint is absent there and holds its defaults
            if section in saved and saved[section] != self.cfg.to_dict()[section]:
                raise ConfigError(
                    f"[{section}] differs from the run in {self.out}: resuming needs the same "
                    f"{section} settings; use another output.dir for a new run"
                )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None:
                if "ema" not in state:
                    raise KeyError("ema")
                self.ema.load_state_dict(state["ema"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {folder} does not fit this config ({str(e).splitlines()[0]}); "
                "use the config it was trained with, or another output.dir"
            ) from e
        sched = self.scheduler.state_dict()
        sched.update(state["scheduler"])
        self.scheduler.load_state_dict(sched)
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = int(state["step"])
        self.bad = int(state["bad_steps"])

    @property
    def weights(self) -> nn.Module:
        """What is exported and sampled: the EMA weights, or the raw model without EMA."""
        return self.ema.module if self.ema is not None else self.model

    # -- one step ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float] | None:
        cfg = self.cfg.train
        index = batch_indices(cfg.seed, self.step, cfg.batch_size, self.task.num_items)
        self.task.step = self.step
        batch = self.task.draw(index, self.generator)
        parts = _share(batch, self.world, cfg.grad_accum)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            sync = (
                contextlib.nullcontext() if last or self.world.size == 1 else self.trained.no_sync()
            )
            with sync:
                autocast = torch.autocast(
                    self.device.type, dtype=self.amp, enabled=self.amp is not None
                )
                with autocast:
                    loss = self.task.loss(self.trained, part, self.device).mean() / len(parts)
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        total = self.world.mean(total)
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip or math.inf
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        loss_value, norm_value = float(total), float(grad_norm)
        self.step += 1
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.bad += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            self.scheduler.step()
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            warnings.warn(
                f"step {self.step}: {what} is {loss_value if what == 'loss' else norm_value}; "
                f"update skipped ({self.bad} in a row)",
                stacklevel=2,
            )
            if self.bad >= self.cfg.train.max_bad_steps:
                good = latest_checkpoint(self.ckpt_dir)
                where = f"last good checkpoint: {good}" if good else "no checkpoint was written"
                raise TrainingError(
                    f"{self.bad} steps in a row with a non-finite {what} (step {self.step}); "
                    f"{where}. Lower optim.lr, keep optim.grad_clip on, or use precision = "
                    "'fp32', then run again to resume"
                )
            return None
        self.bad = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return {"loss": loss_value, "grad_norm": norm_value, "lr": self.scheduler.get_last_lr()[0]}

    # -- outputs -------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        if not _finite(self.model) or (self.ema is not None and not _finite(self.ema.module)):
            good = latest_checkpoint(self.ckpt_dir)
            raise TrainingError(
                f"the weights at step {self.step} are not finite; no checkpoint written "
                f"(last good: {good}). Lower optim.lr and run again to resume from it"
            )
        if self.world.main:
            save_checkpoint(
                self.ckpt_dir, self.step, self.state(), keep=self.cfg.train.keep_checkpoints
            )
            self.export()
        self.world.barrier()

    def export(self) -> None:
        """EMA weights as an inference folder ``model/``, swapped in whole."""
        final = self.out / "model"
        tmp = Path(tempfile.mkdtemp(dir=self.out, prefix=".tmp-model-"))
        try:
            self.task.export(self.weights, tmp)
            old = self.out / ".old-model"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"could not export {final} ({e.strerror or e}); the training checkpoint in "
                f"{self.ckpt_dir} is intact: free disk space and run again"
            ) from e

    def samples(self) -> None:
        if not self.world.main:
            return
        images, labels = self.task.sample_grid(self.weights, self.cfg)
        save_grid(images, labels, self.out / "samples" / f"step-{self.step:08d}.png")


def train(cfg: Config, *, resume: bool = True) -> Path:
    """Run (or resume) the training ``cfg`` describes; returns the exported model folder."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    world = init_world(device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    per = t.batch_size // t.grad_accum
    if t.batch_size % (t.grad_accum * world.size) or per < world.size:
        raise ConfigError(
            f"train.batch_size = {t.batch_size} must split evenly over {world.size} processes × "
            f"{t.grad_accum} accumulation steps"
        )
    out = Path(cfg.output.dir)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    world.barrier()
    torch.manual_seed(t.seed)
    task = make_task(cfg, device, progress=t.progress and world.main)
    run = _Run(cfg, world, device, task)
    found = latest_checkpoint(run.ckpt_dir) if resume else None
    if found is not None:
        run.restore(found)
        if world.main:
            print(f"resuming from {found} (step {run.step})", file=sys.stderr)
    elif (run.ckpt_dir / "latest").exists() or any(run.ckpt_dir.glob("step-*")):
        if resume:
            raise CheckpointError(
                f"{run.ckpt_dir} holds no complete checkpoint; delete it to restart"
            )
    monitor = Monitor(out, tensorboard=t.tensorboard) if world.main else None
    if monitor is not None:
        monitor.truncate(run.step)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=t.steps,
        initial=run.step,
        disable=not (t.progress and world.main),
        unit="step",
        dynamic_ncols=True,
    )
    start, first_step = time.perf_counter(), run.step
    try:
        while run.step < t.steps:
            stats = run.train_step()
            bar.update(1)
            if stats is not None:
                elapsed = time.perf_counter() - start
                rate = (run.step - first_step) * t.batch_size / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", samples_s=f"{rate:.1f}")
                if monitor is not None and (run.step % t.log_every == 0 or run.step == t.steps):
                    monitor.log(
                        {"step": run.step, **stats, "samples_per_s": rate, "elapsed_s": elapsed}
                    )
            if run.step % t.checkpoint_every == 0 or run.step == t.steps:
                run.checkpoint()
                if monitor is not None:
                    plot_loss(monitor.path, out / "loss.png")
            if (t.sample_every and run.step % t.sample_every == 0) or run.step == t.steps:
                run.samples()
    finally:
        bar.close()
        if monitor is not None:
            monitor.close()
        world.close()
    return out / "model"
