"""Training configs: a TOML file validated into dataclasses.

``destatic train configs/emoji.toml`` reads one file with the tables ``[data]``, ``[model]``,
``[objective]``, ``[autoencoder]``, ``[evaluator]``, ``[control]``, ``[lcm]``, ``[reflow]``,
``[lora]``, ``[optim]``, ``[train]``, ``[sample]`` and ``[output]`` (all optional; every key has a
default).
Unknown tables or keys, values of the wrong type and out-of-range values are a
:class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import inspect
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AutoencoderTrainConfig",
    "Config",
    "ConfigError",
    "ControlTrainConfig",
    "DataConfig",
    "EvaluatorTrainConfig",
    "LCMTrainConfig",
    "LoraTrainConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "OutputConfig",
    "ReflowTrainConfig",
    "SampleConfig",
    "TrainConfig",
    "load_config",
]


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{where} = {value!r}: choose one of {', '.join(allowed)}")


@dataclass
class DataConfig:
    dataset: str = "emoji"  # emoji | clipart | folder
    path: str = ""  # the image folder for dataset = "folder"
    size: int = 32  # image side in pixels
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    alt_captions: bool = True  # also train on a dataset's alternative captions (emoji)

    def check(self) -> None:
        _choice("data.dataset", self.dataset, ("emoji", "clipart", "folder"))
        _require(self.dataset != "folder" or bool(self.path), "data.path is needed for folder")
        _require(8 <= self.size <= 4096, f"data.size = {self.size}: use 8 … 4096 pixels")
        _require(
            0 <= self.caption_dropout < 1,
            f"data.caption_dropout = {self.caption_dropout}: use a share in [0, 1)",
        )


@dataclass
class ModelConfig:
    kind: str = "unet"  # unet | mmdit
    autoencoder: str = ""  # folder of a trained AutoencoderKL: latent space; "" = pixel space
    text_max_length: int = 32  # tokens the text encoder pads/truncates prompts to
    unet: dict[str, Any] = field(default_factory=dict)  # UNetConfig fields
    mmdit: dict[str, Any] = field(default_factory=dict)  # MMDiTConfig fields
    inpainting: bool = False  # also read a mask and the masked image (2·C + 1 input channels)
    init: str = ""  # start from this pipeline folder's network (extra input channels at zero)

    def check(self) -> None:
        _choice("model.kind", self.kind, ("unet", "mmdit"))
        _require(
            2 <= self.text_max_length <= 512,
            f"model.text_max_length = {self.text_max_length}: use 2 … 512",
        )


@dataclass
class ObjectiveConfig:
    kind: str = "flow"  # flow | vp | edm (destatic.training.objectives)
    options: dict[str, Any] = field(default_factory=dict)  # the objective's keyword arguments

    def check(self) -> None:
        from destatic.training.objectives import OBJECTIVES

        _choice("objective.kind", self.kind, tuple(OBJECTIVES))
        params = inspect.signature(OBJECTIVES[self.kind]).parameters
        named = {k for k, p in params.items() if p.kind is not p.VAR_KEYWORD}
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = sorted(set(self.options) - named)
        _require(
            takes_any or not unknown,
            f"unknown [objective] key(s) {unknown} for kind {self.kind!r}; "
            f"valid: kind, {', '.join(sorted(named))}",
        )


@dataclass
class AutoencoderTrainConfig:
    """Used when ``[train] task = "autoencoder"``."""

    config: dict[str, Any] = field(default_factory=dict)  # AutoencoderConfig fields
    reconstruction: str = "l1"  # l1 | mse
    kl_weight: float = 1e-6
    adversarial_weight: float = 0.0  # weight of the PatchGAN generator term; 0 = off
    adversarial_start: int = 0  # step from which the adversarial terms count (LDM: disc_start)
    discriminator_channels: int = 64
    discriminator_layers: int = 3  # stride-2 convolutions: patches of about 2^(layers+2) px

    def check(self) -> None:
        _choice("autoencoder.reconstruction", self.reconstruction, ("l1", "mse"))
        _require(self.kl_weight >= 0, f"autoencoder.kl_weight = {self.kl_weight}: use ≥ 0")
        _require(
            self.adversarial_weight >= 0,
            f"autoencoder.adversarial_weight = {self.adversarial_weight}: use ≥ 0 (0 = off)",
        )
        _require(
            self.adversarial_start >= 0,
            f"autoencoder.adversarial_start = {self.adversarial_start}: use ≥ 0",
        )
        _require(
            self.discriminator_channels >= 1 and 1 <= self.discriminator_layers <= 6,
            "autoencoder.discriminator_channels must be ≥ 1 and discriminator_layers 1 … 6",
        )


@dataclass
class EvaluatorTrainConfig:
    """Used when ``[train] task = "evaluator"`` (:mod:`destatic.metrics.evaluator`)."""

    config: dict[str, Any] = field(default_factory=dict)  # EvaluatorConfig fields
    shift: int = 2  # augmentation: random translation by up to this many pixels

    def check(self) -> None:
        _require(0 <= self.shift <= 16, f"evaluator.shift = {self.shift}: use 0 … 16 pixels")


@dataclass
class ControlTrainConfig:
    """Used when ``[train] task = "control"``: a ControlNet for a trained pipeline, on edge
    maps of the training images (:mod:`destatic.models.controlnet`)."""

    base: str = ""  # the pipeline folder it steers ("" = the bundled default model)
    conditioning_embedding_out_channels: list[int] = field(default_factory=lambda: [16])
    edges_sigma: float = 1.0  # Canny's Gaussian blur, in pixels

    def check(self) -> None:
        _require(
            len(self.conditioning_embedding_out_channels) >= 1
            and all(c >= 1 for c in self.conditioning_embedding_out_channels),
            "control.conditioning_embedding_out_channels needs positive widths",
        )
        _require(self.edges_sigma > 0, f"control.edges_sigma = {self.edges_sigma}: use > 0")


def _check_distill(where: str, guidance_min: float, guidance_max: float, dim: int) -> None:
    _require(
        1 <= guidance_min <= guidance_max,
        f"{where}.guidance_min = {guidance_min:g}, guidance_max = {guidance_max:g}: need "
        "1 ≤ guidance_min ≤ guidance_max (equal values fold in one fixed scale)",
    )
    _require(
        2 <= dim <= 4096 and dim % 2 == 0,
        f"{where}.embedding_dim = {dim}: use an even width in 2 … 4096",
    )


@dataclass
class LCMTrainConfig:
    """Used when ``[train] task = "lcm"``: latent consistency distillation of a trained pipeline
    (:mod:`destatic.training.distill`)."""

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
        from destatic.sampling import GRIDS

        _require(
            2 <= self.teacher_steps <= 1000,
            f"lcm.teacher_steps = {self.teacher_steps}: use 2 … 1000",
        )
        _choice("lcm.grid", self.grid, tuple(GRIDS))
        _check_distill("lcm", self.guidance_min, self.guidance_max, self.embedding_dim)
        _require(0 <= self.target_decay < 1, f"lcm.target_decay = {self.target_decay}: use [0, 1)")
        _choice("lcm.loss", self.loss, ("pseudo_huber", "l2"))
        _require(self.huber_c > 0, f"lcm.huber_c = {self.huber_c}: use > 0")
        _require(self.sigma_data > 0, f"lcm.sigma_data = {self.sigma_data}: use > 0")
        _require(
            self.timestep_scaling > 0,
            f"lcm.timestep_scaling = {self.timestep_scaling}: use > 0",
        )
        _require(1 <= self.steps <= 1000, f"lcm.steps = {self.steps}: use 1 … 1000")


@dataclass
class ReflowTrainConfig:
    """Used when ``[train] task = "reflow"``: rectified-flow reflow of a trained flow pipeline on
    cached (noise, teacher sample) pairs (:mod:`destatic.training.distill`)."""

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
        from destatic.sampling import GRIDS, SAMPLER_INFO

        _require(self.pairs >= 1, f"reflow.pairs = {self.pairs}: use a positive integer")
        _require(self.chunk >= 1, f"reflow.chunk = {self.chunk}: use a positive integer")
        _choice("reflow.sampler", self.sampler, tuple(SAMPLER_INFO))
        _require(
            not SAMPLER_INFO[self.sampler].stochastic,
            f"reflow.sampler = {self.sampler!r} draws fresh noise: reflow pairs need a "
            "deterministic ODE solver (euler, heun, dpmpp_2m, …)",
        )
        _require(
            1 <= self.sampler_steps <= 1000,
            f"reflow.sampler_steps = {self.sampler_steps}: use 1 … 1000",
        )
        if self.grid:
            _choice("reflow.grid", self.grid, tuple(GRIDS))
        _check_distill("reflow", self.guidance_min, self.guidance_max, self.embedding_dim)
        _require(1 <= self.steps <= 1000, f"reflow.steps = {self.steps}: use 1 … 1000")


@dataclass
class LoraTrainConfig:
    """Used when ``[train] task = "lora"``: a LoRA adapter on a frozen pipeline's network
    (:mod:`destatic.models.lora`), optionally DreamBooth with prior preservation (Ruiz et al.
    2022): instance images under one prompt, plus λ × the loss on class images the frozen base
    drew for ``class_prompt`` (generated once, cached in ``class_dir``)."""

    base: str = ""  # the pipeline folder to adapt ("" = the bundled default model)
    rank: int = 8
    alpha: float = 0.0  # 0 = rank (α/r = 1)
    targets: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    )
    dropout: float = 0.0
    instance_prompt: str = ""  # DreamBooth: every image of data.path under this prompt
    class_prompt: str = ""  # prior preservation with class images for this prompt ("" = off)
    num_class_images: int = 100
    prior_weight: float = 1.0  # λ of the prior-preservation loss
    class_steps: int = 20  # how the base draws the class images
    class_sampler: str = "dpmpp_2m"
    class_guidance: float = 3.0
    class_dir: str = ""  # where they are cached ("" = <output.dir>/class_images)

    def check(self) -> None:
        from destatic.sampling import SAMPLERS

        _require(1 <= self.rank <= 1024, f"lora.rank = {self.rank}: use 1 … 1024")
        _require(self.alpha >= 0, f"lora.alpha = {self.alpha}: use > 0 (0 = the rank)")
        _require(len(self.targets) >= 1, "lora.targets needs at least one module name")
        _require(0 <= self.dropout < 1, f"lora.dropout = {self.dropout}: use [0, 1)")
        _require(
            not self.class_prompt or bool(self.instance_prompt),
            "lora.class_prompt (prior preservation) needs lora.instance_prompt",
        )
        _require(
            self.num_class_images >= 1,
            f"lora.num_class_images = {self.num_class_images}: use a positive integer",
        )
        _require(self.prior_weight >= 0, f"lora.prior_weight = {self.prior_weight}: use ≥ 0")
        _require(
            1 <= self.class_steps <= 1000, f"lora.class_steps = {self.class_steps}: use 1 … 1000"
        )
        _choice("lora.class_sampler", self.class_sampler, tuple(SAMPLERS))
        _require(self.class_guidance >= 0, f"lora.class_guidance = {self.class_guidance}: use ≥ 0")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 200
    schedule: str = "constant"  # constant | cosine | linear (after warm-up)
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    ema_decay: float = 0.999  # 0 = no EMA (the exported model is the raw weights)

    def check(self) -> None:
        _require(0 < self.lr < 1, f"optim.lr = {self.lr}: use a learning rate in (0, 1)")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas = {self.betas}: two numbers in [0, 1)",
        )
        _require(self.weight_decay >= 0, f"optim.weight_decay = {self.weight_decay}: use ≥ 0")
        _require(self.eps > 0, f"optim.eps = {self.eps}: use > 0")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps = {self.warmup_steps}: use ≥ 0")
        _choice("optim.schedule", self.schedule, ("constant", "cosine", "linear"))
        _require(self.grad_clip >= 0, f"optim.grad_clip = {self.grad_clip}: use ≥ 0 (0 = off)")
        _require(0 <= self.ema_decay < 1, f"optim.ema_decay = {self.ema_decay}: use [0, 1)")


@dataclass
class TrainConfig:
    task: str = "denoiser"  # denoiser | autoencoder | evaluator | control | lcm | reflow | lora
    steps: int = 10_000  # optimizer steps
    batch_size: int = 64  # global batch per optimizer step (over processes and accumulation)
    grad_accum: int = 1  # micro-batches per optimizer step and process
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch (0: torch's default)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 1000  # 0 = only at the end
    max_bad_steps: int = 5  # consecutive NaN/inf losses before the run stops
    tensorboard: bool = True  # also log to TensorBoard (when the package is installed)
    progress: bool = True

    def check(self) -> None:
        _choice(
            "train.task",
            self.task,
            ("denoiser", "autoencoder", "evaluator", "control", "lcm", "reflow", "lora"),
        )
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            _require(value >= 1, f"train.{name} = {value}: use a positive integer")
        for name in ("keep_checkpoints", "max_bad_steps"):
            value = getattr(self, name)
            _require(value >= 1, f"train.{name} = {value}: use a positive integer")
        _require(self.sample_every >= 0, f"train.sample_every = {self.sample_every}: use ≥ 0")
        _require(self.threads >= 0, f"train.threads = {self.threads}: use ≥ 0")
        _require(
            self.batch_size % self.grad_accum == 0,
            f"train.batch_size = {self.batch_size} is not a multiple of "
            f"train.grad_accum = {self.grad_accum}",
        )


@dataclass
class SampleConfig:
    """Periodic sample grids: one image per prompt, with fixed seeds."""

    prompts: list[str] = field(
        default_factory=lambda: [
            "grinning face",
            "red heart",
            "cat face",
            "flag: japan",
            "pizza",
            "woman technologist: medium skin tone",
            "thumbs up",
            "rocket",
        ]
    )
    steps: int = 20
    sampler: str = "dpmpp_2m"
    grid: str = ""  # "" = the model's default grid (karras; sgm_uniform for flow models)
    guidance: float = 4.0
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        """The keyword arguments of ``Pipeline.generate`` for these grids (prompts aside)."""
        return dict(steps=self.steps, sampler=self.sampler, grid=self.grid, guidance=self.guidance)

    def check(self) -> None:
        from destatic.sampling import SAMPLERS

        _require(len(self.prompts) >= 1, "sample.prompts needs at least one prompt")
        _require(1 <= self.steps <= 1000, f"sample.steps = {self.steps}: use 1 … 1000")
        _choice("sample.sampler", self.sampler, tuple(SAMPLERS))
        if self.grid:
            from destatic.sampling import GRIDS

            _choice("sample.grid", self.grid, tuple(GRIDS))
        _require(self.guidance >= 0, f"sample.guidance = {self.guidance}: use ≥ 0")


@dataclass
class OutputConfig:
    dir: str = "runs/emoji"  # checkpoints, metrics, samples and the exported model go here

    def check(self) -> None:
        _require(bool(self.dir), "output.dir must not be empty")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    autoencoder: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    evaluator: EvaluatorTrainConfig = field(default_factory=EvaluatorTrainConfig)
    control: ControlTrainConfig = field(default_factory=ControlTrainConfig)
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    lcm: LCMTrainConfig = field(default_factory=LCMTrainConfig)
    reflow: ReflowTrainConfig = field(default_factory=ReflowTrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def check(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).check()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, table: dict[str, Any], where: str = "config") -> Config:
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - set(sections))
        _require(not unknown, f"{where}: unknown table(s) {unknown}; valid: {', '.join(sections)}")
        values = {}
        for name in sections:
            section_cls = typing.get_type_hints(cls)[name]
            raw = table.get(name, {})
            _require(isinstance(raw, dict), f"{where}: [{name}] must be a table")
            if section_cls is ObjectiveConfig:  # kind + free-form keyword arguments
                raw = dict(raw)
                values[name] = ObjectiveConfig(kind=raw.pop("kind", "flow"), options=raw)
                _check_type(f"{name}.kind", values[name].kind, str)
            else:
                values[name] = _section(section_cls, raw, name)
        return cls(**values).check()


def _check_type(key: str, value: Any, annotation: Any) -> None:
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        if any(_matches(value, a) for a in typing.get_args(annotation)):
            return
    elif _matches(value, annotation):
        return
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key} = {value!r}: expected {name}")


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    if annotation is type(None):
        return value is None
    if origin is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and (item is Any or all(_matches(v, item) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is Any:
        return True
    return isinstance(value, origin)


def _section(cls: type, raw: dict[str, Any], name: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    _require(not unknown, f"unknown [{name}] key(s) {unknown}; valid: {', '.join(names)}")
    kwargs = {}
    for key, value in raw.items():
        _check_type(f"{name}.{key}", value, hints[key])
        kwargs[key] = float(value) if hints[key] is float else value
    return cls(**kwargs)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a TOML training config; ``overrides`` maps ``"table.key"`` to values."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        _require(bool(key), f"override {dotted!r} must look like table.key")
        table.setdefault(section, {})[key] = value
    return Config.from_dict(table, where=str(path))
