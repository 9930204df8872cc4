"""What is being trained: one module per task, each registered by name in :data:`TASKS`
(``[train] task``); :mod:`~destatic.training.tasks.base` says what a task is."""

from destatic.training.tasks import (  # noqa: F401  (fill the registry)
    audio,
    audio_evaluator,
    autoencoder,
    control,
    denoiser,
    evaluator,
    lcm,
    lora,
    reflow,
    tokenizer,
    tokens,
    video,
)
from destatic.training.tasks.audio import AudioTask
from destatic.training.tasks.audio_evaluator import AudioEvaluatorTask
from destatic.training.tasks.autoencoder import AutoencoderTask
from destatic.training.tasks.base import TASKS, Batch, Task, make_task, register, task_sections
from destatic.training.tasks.control import ControlTask
from destatic.training.tasks.denoiser import DenoiserTask, random_masks
from destatic.training.tasks.evaluator import EvaluatorTask
from destatic.training.tasks.lcm import LCMTask
from destatic.training.tasks.lora import LoraTask
from destatic.training.tasks.reflow import ReflowTask
from destatic.training.tasks.tokenizer import TokenizerTask
from destatic.training.tasks.tokens import AutoregressiveTask, MaskGITTask, TokenTask
from destatic.training.tasks.video import VideoTask

__all__ = [
    "TASKS",
    "AudioEvaluatorTask",
    "AudioTask",
    "AutoencoderTask",
    "AutoregressiveTask",
    "Batch",
    "ControlTask",
    "DenoiserTask",
    "EvaluatorTask",
    "LCMTask",
    "LoraTask",
    "MaskGITTask",
    "ReflowTask",
    "Task",
    "TokenTask",
    "TokenizerTask",
    "VideoTask",
    "make_task",
    "random_masks",
    "register",
    "task_sections",
]
