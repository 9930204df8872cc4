"""Training configs: a TOML file validated into dataclasses.

``destatic train configs/emoji.toml`` reads one file with the tables ``[data]``, ``[model]``,
``[objective]``, ``[optim]``, ``[train]``, ``[sample]`` and ``[output]``, defined here, and one
table per task with options (``[lcm]``, ``[lora]``, …), defined by the task
(:mod:`destatic.training.tasks`) and read by :func:`destatic.training.load_config`; all are
optional and every key has a default.
Unknown tables or keys, values of the wrong type and out-of-range values are a
:class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from destatic.pipelines.families.own import OWN

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "OutputConfig",
    "SampleConfig",
    "TrainConfig",
]


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key and the fix."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    require(value in allowed, f"{where} = {value!r}: choose one of {', '.join(allowed)}")


@dataclass
class DataConfig:
    dataset: str = "emoji"  # emoji | clipart | folder
    path: str = ""  # the image folder for dataset = "folder"
    size: int = 32  # image side in pixels
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    alt_captions: bool = True  # also train on a dataset's alternative captions (emoji)

    def check(self) -> None:
        choice("data.dataset", self.dataset, ("emoji", "clipart", "folder"))
        require(self.dataset != "folder" or bool(self.path), "data.path is needed for folder")
        require(8 <= self.size <= 4096, f"data.size = {self.size}: use 8 … 4096 pixels")
        require(
            0 <= self.caption_dropout < 1,
            f"data.caption_dropout = {self.caption_dropout}: use a share in [0, 1)",
        )

    def check_files(self) -> None:
        """For ``dataset = "folder"``: ``path`` must be a folder with at least one image (checked
        when a run starts, before anything is built; :meth:`check` reads no files)."""
        if self.dataset != "folder":
            return
        from pathlib import Path

        from destatic.data.folder import IMAGE_SUFFIXES

        root = Path(self.path)
        require(root.is_dir(), f"data.path = {self.path!r} is not a folder; check the path")
        images = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        require(
            next(images, None) is not None,
            f"data.path = {self.path!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "put the captioned training images there",
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
        choice("model.kind", self.kind, ("unet", "mmdit"))
        require(
            2 <= self.text_max_length <= 512,
            f"model.text_max_length = {self.text_max_length}: use 2 … 512",
        )
        self._check_network()

    def _check_network(self) -> None:
        """Build the ``[model.unet]``/``[model.mmdit]`` network config now (``from_dict``
        validates it), so that options that cannot make a network (``norm_num_groups`` not
        dividing the widths, unknown fields, …) are a ConfigError when the file is read, not a
        traceback when the network is built."""
        from destatic.models.mmdit import MMDiTConfig
        from destatic.models.unet import UNetConfig

        config_cls, fields = (
            (UNetConfig, self.unet) if self.kind == "unet" else (MMDiTConfig, self.mmdit)
        )
        try:
            config_cls.from_dict(dict(fields))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[model.{self.kind}]: {e}") from None


@dataclass
class ObjectiveConfig:
    kind: str = "flow"  # flow | vp | edm (destatic.training.objectives)
    options: dict[str, Any] = field(default_factory=dict)  # the objective's keyword arguments

    def check(self) -> None:
        from destatic.training.objectives import OBJECTIVES

        choice("objective.kind", self.kind, tuple(OBJECTIVES))
        params = inspect.signature(OBJECTIVES[self.kind]).parameters
        named = {k for k, p in params.items() if p.kind is not p.VAR_KEYWORD}
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = sorted(set(self.options) - named)
        require(
            takes_any or not unknown,
            f"unknown [objective] key(s) {unknown} for kind {self.kind!r}; "
            f"valid: kind, {', '.join(sorted(named))}",
        )


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
        require(0 < self.lr < 1, f"optim.lr = {self.lr}: use a learning rate in (0, 1)")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas = {self.betas}: two numbers in [0, 1)",
        )
        require(self.weight_decay >= 0, f"optim.weight_decay = {self.weight_decay}: use ≥ 0")
        require(self.eps > 0, f"optim.eps = {self.eps}: use > 0")
        require(self.warmup_steps >= 0, f"optim.warmup_steps = {self.warmup_steps}: use ≥ 0")
        choice("optim.schedule", self.schedule, ("constant", "cosine", "linear"))
        require(self.grad_clip >= 0, f"optim.grad_clip = {self.grad_clip}: use ≥ 0 (0 = off)")
        require(0 <= self.ema_decay < 1, f"optim.ema_decay = {self.ema_decay}: use [0, 1)")


@dataclass
class TrainConfig:
    task: str = "denoiser"  # a registered task (destatic.training.tasks.TASKS)
    steps: int = 10_000  # optimizer steps
    batch_size: int = 64  # global batch per optimizer step (over processes and accumulation)
    grad_accum: int = 1  # micro-batches per optimizer step and process
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPUs/CPUs with bf16 units) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch (0: torch's default)
    parallel: str = "ddp"  # under torchrun: ddp (whole model per process) | fsdp (sharded)
    compile: bool = False  # torch.compile the network (a one-time compile of 1–2 minutes)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 1000  # 0 = only at the end
    max_bad_steps: int = 5  # consecutive NaN/inf losses before the run stops
    tensorboard: bool = True  # also log to TensorBoard (when the package is installed)
    progress: bool = True

    def check(self) -> None:
        choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            require(value >= 1, f"train.{name} = {value}: use a positive integer")
        for name in ("keep_checkpoints", "max_bad_steps"):
            value = getattr(self, name)
            require(value >= 1, f"train.{name} = {value}: use a positive integer")
        require(self.sample_every >= 0, f"train.sample_every = {self.sample_every}: use ≥ 0")
        require(self.threads >= 0, f"train.threads = {self.threads}: use ≥ 0")
        require(
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
    guidance: float = OWN.defaults["guidance"]  # destatic's one fallback (3)
    seed: int = 0

    def request(self, **fields: Any):
        """The :class:`~destatic.pipelines.GenerationRequest` of these grids (``fields`` set
        other prompts, seeds, a ControlNet, …)."""
        from destatic.pipelines import GenerationRequest

        sampling = dict(steps=self.steps, sampler=self.sampler, guidance=self.guidance)
        base = dict(prompt=list(self.prompts), grid=self.grid or None, seed=self.seed)
        return GenerationRequest(**{**base, **sampling, **fields})

    def check(self) -> None:
        from destatic.sampling import SAMPLERS

        require(len(self.prompts) >= 1, "sample.prompts needs at least one prompt")
        require(1 <= self.steps <= 1000, f"sample.steps = {self.steps}: use 1 … 1000")
        choice("sample.sampler", self.sampler, tuple(SAMPLERS))
        if self.grid:
            from destatic.sampling import GRIDS

            choice("sample.grid", self.grid, tuple(GRIDS))
        require(self.guidance >= 0, f"sample.guidance = {self.guidance}: use ≥ 0")


@dataclass
class OutputConfig:
    dir: str = "runs/emoji"  # checkpoints, metrics, samples and the exported model go here

    def check(self) -> None:
        require(bool(self.dir), "output.dir must not be empty")


@dataclass
class Config:
    """A run's settings: the core tables as fields, and each task's own table in
    ``task_sections`` by task name, read as an attribute (``cfg.lcm``)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # the tables of the tasks with options by name: the task's dataclass once validated
    # (from_dict with the tasks), else the table as read
    task_sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        """A task's table: ``cfg.lcm`` is ``cfg.task_sections["lcm"]``."""
        sections = self.__dict__.get("task_sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def sections(self) -> dict[str, Any]:
        """Every table by name: the core ones, then the tasks'."""
        core = {name: getattr(self, name) for name in _core_tables(type(self))}
        return core | self.task_sections

    def check(self) -> Config:
        for section in self.sections().values():
            if dataclasses.is_dataclass(section):  # a table kept as read has nothing to check
                section.check()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            name: dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(s)
            for name, s in self.sections().items()
        }

    @classmethod
    def from_dict(
        cls,
        table: dict[str, Any],
        where: str = "config",
        tasks: Mapping[str, type | None] | None = None,
    ) -> Config:
        """The validated config of ``table`` (a TOML file's tables). ``tasks``: every task's
        name and the dataclass of its table (None: it has no options), as
        :func:`destatic.training.tasks.task_sections` gives them; with them, unknown tables and
        task names are refused and every task's table is read (its defaults where absent).
        Without them, the tables besides the core ones are kept as read."""
        core = _core_tables(cls)
        # by table name: the task's, or the ``table`` its dataclass names (a table that tasks
        # share, as autoregressive and maskgit share [tokens])
        task_classes = {
            getattr(c, "table", name): c for name, c in (tasks or {}).items() if c is not None
        }
        if tasks is not None:
            known = [*core, *task_classes]
            unknown = sorted(set(table) - set(known))
            require(not unknown, f"{where}: unknown table(s) {unknown}; valid: {', '.join(known)}")
        for name, raw in table.items():
            require(isinstance(raw, dict), f"{where}: [{name}] must be a table")
        values: dict[str, Any] = {}
        for name, section_cls in core.items():
            raw = table.get(name, {})
            if section_cls is ObjectiveConfig:  # kind + free-form keyword arguments
                raw = dict(raw)
                values[name] = ObjectiveConfig(kind=raw.pop("kind", "flow"), options=raw)
                _check_type(f"{name}.kind", values[name].kind, str)
            else:
                values[name] = _section(section_cls, raw, name)
        if tasks is None:
            values["task_sections"] = {n: dict(t) for n, t in table.items() if n not in core}
        else:
            values["task_sections"] = {
                name: _section(section_cls, table.get(name, {}), name)
                for name, section_cls in task_classes.items()
            }
        config = cls(**values)
        if tasks is not None:
            choice("train.task", config.train.task, tuple(tasks))
        return config.check()


def _core_tables(cls: type[Config]) -> dict[str, type]:
    """The tables defined here, by name, with their dataclasses."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "task_sections"}


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
    require(not unknown, f"unknown [{name}] key(s) {unknown}; valid: {', '.join(names)}")
    kwargs = {}
    for key, value in raw.items():
        _check_type(f"{name}.{key}", value, hints[key])
        kwargs[key] = float(value) if hints[key] is float else value
    return cls(**kwargs)
