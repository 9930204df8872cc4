"""The training loop: one code path for every task, device and number of processes.

Each optimizer step takes the next ``batch_size`` rows of an epoch permutation (seeded by
``seed`` and the epoch, so the data position is a pure function of the step) and draws every
random number of the step (σ, noise, caption choice and dropout, latent samples) for the whole
global batch from one generator. Process ``r`` of ``W`` then trains on its ``1/W`` share in
``grad_accum`` micro-batches; DDP averages the gradients (or FSDP2 with ``[train] parallel =
"fsdp"``, which shards weights, gradients, moments and EMA over the processes and gathers them
whole into the checkpoints: :mod:`destatic.training.distributed`). One process with the same
global batch therefore computes the same update, up to float summation order.

Per step: AdamW (torch's fused kernel in one process) with warm-up and an optional
cosine/linear decay (``LambdaLR``), gradient clipping, an EMA of the weights
(``torch.optim.swa_utils.AveragedModel``, one foreach ``lerp_`` with the usual warm-up
``min(decay, (1+n)/(10+n))``), autocast where it pays (bf16 on GPUs that support it and on CPUs
with bf16 matrix units), and with ``compile = true`` the network compiled block by block
(:func:`~destatic.models.speedups.compile_blocks`; a step's gradients are checked against
eager's, and where the compiler got them wrong the network is compiled layer by layer instead,
or trains eagerly). A loss or
gradient that is NaN/inf skips the update with a warning; ``max_bad_steps`` in a row stop the
run with an error naming the last good checkpoint. A checkpoint is never written from weights
that are not finite.

Every ``checkpoint_every`` steps the full state goes to ``checkpoints/`` atomically
(:mod:`destatic.training.state`) and the EMA weights are exported as an inference pipeline in
``model/`` (swapped in whole; ``export.json`` beside it names the step). Running the same command
again resumes from the newest checkpoint: the result is the same as a run that never stopped. A
checkpoint that does not verify or does not have this run's form (a flipped bit, integer
tensors, a step outside ``[0, train.steps]``, a lost scheduler state) is refused with one line
naming the previous good checkpoint. A finished run always ends with its ``model/``, last sample
grid and ``loss.png``: a rerun after a kill between the final checkpoint and those writes fills
them in. A full or read-only disk ends the run with one line naming the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from destatic.io import (
    WRITE_ERRORS,
    CheckpointError,
    CheckpointWriteError,
    atomic_folder,
    probe_writable,
    write_atomic,
    write_error_reason,
)
from destatic.models.speedups import (
    compile_blocks,
    compiled_gradient_errors,
    preferred_layout,
    set_layout,
    uncompile_blocks,
)
from destatic.pipelines.devices import crowded_cpu_advice, pick_dtype
from destatic.training.config import Config, ConfigError
from destatic.training.distributed import (
    World,
    full_model_state,
    full_optimizer_state,
    init_world,
    load_full_model_state,
    local,
    meta_copy,
    no_sync,
    parallelize,
    shard,
    shard_optimizer_state,
    whole_module,
)
from destatic.training.monitor import Monitor, plot_loss, save_grid
from destatic.training.state import (
    DamagedCheckpoint,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    mismatch,
    resume_advice,
    save_checkpoint,
)
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
    # auto: bf16 autocast where a pipeline's `auto` is bf16 — GPUs with bf16 units, CPUs with
    # AMX or AVX-512-BF16 (1.6x the fp32 samples/s of configs/emoji.toml: BENCHMARKS.md) — else
    # fp32 (a GPU without bf16 would need fp16's loss scaling: ask for it by name)
    return torch.bfloat16 if pick_dtype("auto", device) == torch.bfloat16 else None


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
    """``AveragedModel`` with ``ema ← ema + (1 - d)(θ - ema)``, ``d = min(decay, (1+n)/(10+n))``,
    one foreach ``lerp_`` per device and dtype (floating tensors; an integer buffer is copied)."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:
            torch._foreach_copy_(averaged, current)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def _moments_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Give restored optimizer state its parameter's memory layout. A checkpoint stores
    contiguous tensors; fused AdamW on the CPU (torch 2.13) walks a channels_last parameter and
    a contiguous moment as if they had one layout, pairing the wrong elements."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if (
                    torch.is_tensor(value)
                    and value.shape == p.shape
                    and value.stride() != p.stride()
                ):
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _finite(module: nn.Module) -> bool:
    return _finite_tensors(module.state_dict())


def _finite_tensors(state: dict[str, torch.Tensor]) -> bool:
    """Whether every float tensor of ``state`` is finite (this process's shards when sharded)."""
    return all(
        bool(torch.isfinite(local(v)).all()) for v in state.values() if v.is_floating_point()
    )


#: Scheduler entries a checkpoint must have (in every torch version) and hold in this form.
SCHEDULER_KEYS = ("base_lrs", "last_epoch", "_step_count", "_last_lr")
#: In ``model/``: ``{"step": N}``, the step its weights are from.
EXPORT_RECORD = "export.json"


def _step_problem(state: dict, folder: Path) -> str | None:
    """What is wrong with a restored state's ``step`` and ``bad_steps``, or None."""
    step, bad = state.get("step"), state.get("bad_steps")
    if type(step) is not int or step < 0:
        return f"step = {step!r} is not a step count"
    named = checkpoint_step(folder)
    if named is not None and named != step:
        return f"step = {step} but the folder is {folder.name}"
    if type(bad) is not int or not 0 <= bad <= step:
        return f"bad_steps = {bad!r} is not a count up to step {step}"
    return None


def _optimizer_problem(
    saved: Any, optimizer: torch.optim.Optimizer, step: int, bad: int
) -> str | None:
    """Where a restored optimizer state does not fit ``optimizer`` (its groups, and each
    parameter's moments: the parameter's dtype and shape; its step count ≤ ``step``), or is
    empty although an update was made (``step`` > ``bad``, the trailing skipped steps), or
    None."""
    live = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        return "optimizer state is malformed"
    groups, expected = saved["param_groups"], len(live["param_groups"])
    if not isinstance(groups, list) or len(groups) != expected:
        return f"optimizer.param_groups is not a list of {expected} parameter groups"
    for i, (group, own) in enumerate(zip(groups, live["param_groups"], strict=True)):
        if not isinstance(group, dict) or group.get("params") != own["params"]:
            return f"optimizer group {i} lists other parameters"
        form = {k: own[k] for k in ("lr", "betas", "eps", "weight_decay") if k in own}
        found = mismatch({k: group.get(k) for k in form}, form, f"optimizer.param_groups.{i}")
        if found:
            return found
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not isinstance(saved["state"], dict):
        return "optimizer.state is malformed"
    if step > bad and not saved["state"]:
        return f"optimizer.state is empty after {step} steps"
    for index, entry in saved["state"].items():
        where = f"optimizer.state.{index}"
        if type(index) is not int or not 0 <= index < len(params) or not isinstance(entry, dict):
            return f"{where} is for no parameter of this model"
        for key, value in entry.items():
            if key != "step":
                found = mismatch(value, params[index].detach(), f"{where}.{key}")
            elif not (isinstance(value, torch.Tensor) and value.numel() == 1):
                found = f"{where}.step is not a scalar tensor"
            elif not 0 <= float(value) <= step:
                found = f"{where}.step = {float(value):g} is outside 0 … {step}"
            else:
                found = None
            if found:
                return found
    return None


def _scheduler_problem(saved: Any, live: dict, step: int) -> str | None:
    """Where a restored LR-schedule state lacks an entry, has another form than ``live`` or
    disagrees with ``step``, or None."""
    if not isinstance(saved, dict):
        return "scheduler state is malformed"
    form = {k: live[k] for k in SCHEDULER_KEYS if k in live}
    found = mismatch({k: v for k, v in saved.items() if k in form}, form, "scheduler")
    if found:
        return found
    if saved["last_epoch"] != step or saved.get("_step_count", step + 1) != step + 1:
        return f"scheduler.last_epoch = {saved['last_epoch']} but the checkpoint is at step {step}"
    return None


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
        model = task.trainable.to(device)
        model.train()
        self.amp = _autocast_dtype(cfg.train.precision, device)
        if cfg.train.compile:  # oneDNN's native bf16 layout, as for inference
            set_layout(model, preferred_layout(device, self.amp or torch.float32))
        self.trainable = model
        o = cfg.optim
        self.ema = _ema(model, o.ema_decay) if o.ema_decay > 0 else None
        if cfg.train.compile:  # block by block (models.speedups.compile_blocks says why)
            compile_blocks(model)  # after the EMA copy: the averaged model samples eagerly
        # fsdp: parameters, moments and EMA sharded over processes; the whole averaged module
        # exists on rank 0 only while it is exported or sampled (``gathered``)
        self.sharded = world.size > 1 and cfg.train.parallel == "fsdp"
        self.frame = meta_copy(model) if self.sharded else None
        self.whole: nn.Module | None = None
        self.trained: nn.Module = parallelize(model, world, device, cfg.train.parallel)
        if self.sharded and self.ema is not None:
            shard(self.ema.module, world, device)  # cut like the trainable: a local update
        params = [p for p in model.parameters() if p.requires_grad]
        # one fused kernel for the whole update where torch has it (not over DTensor shards)
        fused = not self.sharded and device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(
            params,
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            fused=fused or None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is torch.float16)
        self.step = 0
        self.bad = 0
        # compiled runs check one step's gradients against eager's, once per process and after
        # each fallback: the first step after an update (at step 0 a fresh U-Net's zeroed output
        # layer leaves every other gradient zero, eager's too)
        self.unchecked = cfg.train.compile and world.size == 1
        self.compiled = "blocks" if cfg.train.compile else "no"

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "step": self.step,
            "samples_seen": self.step * self.cfg.train.batch_size,
            "bad_steps": self.bad,
            "model": self.trainable.state_dict(),
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

    def saved_state(self) -> dict:
        """What a checkpoint holds: :meth:`state` with whole tensors. Under fsdp the shards of
        the weights, moments and EMA are gathered onto rank 0 (call in every process; the
        others get empty sections)."""
        state = self.state()
        if self.sharded:
            state["model"] = full_model_state(self.trainable)
            state["optimizer"] = full_optimizer_state(self.optimizer)
            if self.ema is not None:
                state["ema"] = full_model_state(self.ema)
        return state

    def restore(self, folder: Path) -> None:
        """Load checkpoint ``folder`` into this run, after checking that it verifies, that its
        sections match this config and that its state has this run's form.

        A damaged checkpoint is a :class:`DamagedCheckpoint`, another config a ConfigError; a
        step beyond ``train.steps`` is a ConfigError too.
        """
        state = load_checkpoint(folder)
        self._check_sections(state.get("config", {}))
        if self.ema is not None and "ema" not in state:
            raise CheckpointError(
                f"checkpoint {folder} has no EMA weights but optim.ema_decay > 0; use the "
                "config it was trained with, or another output.dir"
            )
        problem = self._state_problem(state, folder)
        if problem:
            raise DamagedCheckpoint(folder, problem)
        if state["step"] > self.cfg.train.steps:
            raise ConfigError(
                f"checkpoint {folder} is at step {state['step']}, past train.steps = "
                f"{self.cfg.train.steps}: raise train.steps to go on from it, or use another "
                "output.dir"
            )
        try:
            self._load_weights(state)
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {folder} does not fit this config ({str(e).splitlines()[0]}); "
                "use the config it was trained with, or another output.dir"
            ) from e
        sched = self.scheduler.state_dict()
        sched.update(state["scheduler"])
        self.scheduler.load_state_dict(sched)
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = int(state["step"])
        self.bad = int(state["bad_steps"])

    def _load_weights(self, state: dict) -> None:
        """The model, optimizer and EMA sections of a checked checkpoint (whole tensors; under
        fsdp each process keeps its shards)."""
        if not self.sharded:
            self.trainable.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            _moments_like_params(self.optimizer)
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            return
        load_full_model_state(self.trainable, state["model"])
        self.optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], self.optimizer))
        if self.ema is not None:
            load_full_model_state(self.ema, state["ema"])

    def _check_sections(self, saved: Any) -> None:
        """A ConfigError when the checkpoint's run had other model/task settings."""
        if not isinstance(saved, dict):
            saved = {}
        current = self.cfg.to_dict()
        for section in ("model", "objective", *self.cfg.task_sections):
            # a section newer than the checkpoint is absent there and holds its defaults
            if section in saved and section in current and saved[section] != current[section]:
                raise ConfigError(
                    f"[{section}] differs from the run in {self.out}: resuming needs the same "
                    f"{section} settings; use another output.dir for a new run"
                )

    def _state_problem(self, state: dict, folder: Path) -> str | None:
        """What makes a restored state unfit to resume this run (its step, a tensor of another
        dtype or shape, lost optimizer/scheduler/EMA/RNG entries, non-finite weights), or None.
        """
        return next((found for found in self._findings(state, folder) if found), None)

    def _findings(self, state: dict, folder: Path) -> Iterator[str | None]:
        """Each check's finding in turn, lazily: the later ones rely on a valid step."""
        live = self.state()
        yield _step_problem(state, folder)
        yield mismatch(state.get("model"), live["model"], "model")
        if "ema" in live:
            yield mismatch(state.get("ema"), live["ema"], "ema")
        step, bad = state["step"], state["bad_steps"]
        yield _optimizer_problem(state.get("optimizer"), self.optimizer, step, bad)
        yield _scheduler_problem(state.get("scheduler"), live["scheduler"], step)
        if live["scaler"] and state.get("scaler"):
            yield mismatch(state.get("scaler"), live["scaler"], "scaler")
        rng = {k: live["rng"][k] for k in ("generator", "torch")}
        saved = state.get("rng")
        yield mismatch(
            {k: saved.get(k) for k in rng} if isinstance(saved, dict) else saved, rng, "rng"
        )
        for key in ("model", "ema"):
            if key in state and not _finite_tensors(state[key]):
                yield f"{key} weights are not finite (no checkpoint is written from such)"

    @property
    def averaged(self) -> nn.Module:
        """What is exported and sampled: the EMA of the trainable module, or the module itself
        without EMA. Under fsdp a whole copy on rank 0, inside :meth:`gathered` only."""
        if self.sharded:
            if self.whole is None:
                raise RuntimeError("the sharded averaged module is whole only inside gathered()")
            return self.whole
        return self.ema.module if self.ema is not None else self.trainable

    @contextlib.contextmanager
    def gathered(self, state: dict | None = None) -> Iterator[None]:
        """Under fsdp, make :attr:`averaged` a whole module on rank 0 for the block, from
        ``state`` (a :meth:`saved_state`) or else gathered now (then call in every process);
        otherwise nothing to do."""
        if not self.sharded:
            yield
            return
        if state is None:
            source = self.ema if self.ema is not None else self.trainable
            weights = full_model_state(source)
        else:
            weights = state["ema"] if self.ema is not None else state["model"]
        if self.ema is not None:
            weights = {k[7:]: v for k, v in weights.items() if k.startswith("module.")}
        if self.world.main:
            self.whole = whole_module(self.frame, weights, self.device)
        try:
            yield
        finally:
            self.whole = None

    # -- one step ------------------------------------------------------------------------------
    def _check_compiled(self, part: Batch) -> None:
        """When the compiled network's gradients on ``part`` are not eager's
        (:func:`~destatic.models.speedups.compiled_gradient_errors`: a torch inductor bug),
        compile it a level finer (layers instead of blocks) and check again at the next step;
        if that is wrong too, train eagerly."""
        self.unchecked = False

        def loss() -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                return self.task.loss(self.trained, part, self.device).mean()

        wrong = compiled_gradient_errors(self.trainable, loss)
        if not wrong:
            return
        total = sum(p.requires_grad for p in self.trainable.parameters())
        finer = self.compiled == "blocks"
        warnings.warn(
            f"torch.compile by {self.compiled} gave {len(wrong)} of {total} parameters wrong "
            f"gradients (first: {wrong[0]}; a torch inductor bug); "
            + ("compiling by layers instead" if finer else "this run trains eagerly"),
            stacklevel=3,
        )
        uncompile_blocks(self.trainable)
        if finer:
            compile_blocks(self.trainable, finer=True)
            self.compiled, self.unchecked = "layers", True
        else:
            self.compiled = "no"

    def train_step(self) -> dict[str, float] | None:
        cfg = self.cfg.train
        index = batch_indices(cfg.seed, self.step, cfg.batch_size, self.task.num_items)
        self.task.step = self.step
        batch = self.task.draw(index, self.generator)
        parts = _share(batch, self.world, cfg.grad_accum)
        if self.unchecked and self.step > 0:
            self._check_compiled(parts[0])
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            with contextlib.nullcontext() if last else no_sync(self.trained):
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
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)  # DTensors: over all shards
        loss_value, norm_value = float(total), float(local(grad_norm))
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
            self.ema.update_parameters(self.trainable)
        return {"loss": loss_value, "grad_norm": norm_value, "lr": self.scheduler.get_last_lr()[0]}

    # -- outputs -------------------------------------------------------------------------------
    def last_good(self) -> str:
        """The clause naming the last good checkpoint, for error messages."""
        good = latest_checkpoint(self.ckpt_dir)
        return f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"

    @contextlib.contextmanager
    def writing(self, what: Path) -> Iterator[None]:
        """Turn a failed write of ``what`` (a full or read-only disk) into a one-line
        TrainingError naming the last good checkpoint."""
        try:
            yield
        except (*WRITE_ERRORS, CheckpointWriteError) as e:
            reason = e.reason if isinstance(e, CheckpointWriteError) else write_error_reason(e)
            raise TrainingError(
                f"could not write {what} ({reason}); {self.last_good()}: free disk space (or "
                f"make {self.out} writable) and run the same command again to resume"
            ) from e

    def checkpoint(self) -> None:
        finite = _finite(self.trainable) and (self.ema is None or _finite(self.ema.module))
        if not self.world.all(finite):
            good = latest_checkpoint(self.ckpt_dir)
            raise TrainingError(
                f"the weights at step {self.step} are not finite; no checkpoint written "
                f"(last good: {good}). Lower optim.lr and run again to resume from it"
            )
        state = self.saved_state()
        if self.world.main:
            save_checkpoint(self.ckpt_dir, self.step, state, keep=self.cfg.train.keep_checkpoints)
        with self.gathered(state):
            if self.world.main:
                self.export()
        self.world.barrier()

    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    def export(self) -> None:
        """EMA weights as an inference folder ``model/``, swapped in whole; then ``export.json``
        beside it records the step they are from (written after the swap: a kill in between
        only makes the next run export again). ``model/`` holds the model alone."""
        with self.writing(self.model_dir), atomic_folder(self.model_dir) as tmp:
            self.task.export(self.averaged, tmp)
        record = self.out / EXPORT_RECORD
        with self.writing(record):
            write_atomic(record, lambda f: f.write(json.dumps({"step": self.step}).encode()))

    def exported_step(self) -> int | None:
        """The step ``model/`` was exported at (None: no model/, or no record of it)."""
        if not self.model_dir.is_dir():
            return None
        try:
            step = json.loads((self.out / EXPORT_RECORD).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return step if type(step) is int else None

    def samples(self) -> None:
        """The sample grid of this step, written by rank 0 (call in every process)."""
        with self.gathered():
            if self.world.main:
                self._write_samples()

    def _write_samples(self) -> None:
        """Rank 0, inside :meth:`gathered`: the sample grid of this step."""
        out = self.out / "samples" / f"step-{self.step:08d}.png"
        images, labels = self.task.sample_grid(self.averaged, self.cfg)
        with self.writing(out):
            save_grid(images, labels, out)

    def finish(self, monitor: Monitor | None) -> None:
        """Complete a finished run's outputs: ``model/`` from the final weights, the final sample
        grid and ``loss.png``. Each is written only when missing or stale, so a rerun after a
        kill anywhere between the final checkpoint and here fills in what is missing."""
        with self.gathered():
            if self.world.main:
                if self.exported_step() != self.step:
                    self.export()
                if not (self.out / "samples" / f"step-{self.step:08d}.png").is_file():
                    self._write_samples()
                loss = self.out / "loss.png"
                if monitor is not None and _older(loss, monitor.path):
                    with self.writing(loss):
                        plot_loss(monitor.path, loss)
        self.world.barrier()


def _older(path: Path, than: Path) -> bool:
    """Whether ``path`` is missing or older than ``than`` (which exists)."""
    try:
        return path.stat().st_mtime_ns < than.stat().st_mtime_ns
    except FileNotFoundError:
        return True


def _check_output(out: Path) -> None:
    """Create ``out`` and make sure a file can be written there; else a one-line ConfigError."""
    try:
        probe_writable(out)
    except OSError as e:
        raise ConfigError(
            f"output.dir = {str(out)!r} is not writable ({write_error_reason(e)}); choose "
            "another output.dir or fix its permissions"
        ) from e


def _resume(run: _Run, found: Path) -> None:
    """``run.restore(found)``; a damaged checkpoint's message then names the previous good one."""
    try:
        run.restore(found)
    except DamagedCheckpoint as e:
        raise DamagedCheckpoint(e.folder, e.detail, resume_advice(run.ckpt_dir, e.folder)) from e


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
    cfg.data.check_files()
    if world.main:
        _check_output(out)
    world.barrier()
    if device.type == "cpu" and world.size == 1 and (advice := crowded_cpu_advice()):
        print(f"warning: {advice}", file=sys.stderr)
    torch.manual_seed(t.seed)
    task = make_task(cfg, device, progress=t.progress and world.main)
    run = _Run(cfg, world, device, task)
    found = latest_checkpoint(run.ckpt_dir) if resume else None
    if found is not None:
        _resume(run, found)
        if world.main:
            print(f"resuming from {found} (step {run.step})", file=sys.stderr)
    elif (run.ckpt_dir / "latest").exists() or any(run.ckpt_dir.glob("step-*")):
        if resume:
            raise CheckpointError(
                f"{run.ckpt_dir} holds no complete checkpoint; delete it to restart"
            )
    monitor = None
    if world.main:
        with run.writing(out / "metrics.jsonl"):
            # purge_step: TensorBoard hides what a killed run logged after this checkpoint
            monitor = Monitor(out, tensorboard=t.tensorboard, purge_step=run.step + 1)
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
                    with run.writing(monitor.path):
                        monitor.log(
                            {"step": run.step, **stats, "samples_per_s": rate, "elapsed_s": elapsed}
                        )
            if run.step % t.checkpoint_every == 0 or run.step == t.steps:
                run.checkpoint()
                if monitor is not None and run.step < t.steps:
                    with run.writing(out / "loss.png"):
                        plot_loss(monitor.path, out / "loss.png")
            if t.sample_every and run.step % t.sample_every == 0 and run.step < t.steps:
                run.samples()
        run.finish(monitor)
    finally:
        bar.close()
        if monitor is not None:
            monitor.close()
        world.close()
    return run.model_dir
