"""Loading a training config: the TOML file, its overrides, and every table validated — the
core tables by :mod:`destatic.training.config`, each task's own table by the dataclass the task
declares (:mod:`destatic.training.tasks`)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from destatic.training.config import Config, ConfigError, require
from destatic.training.tasks import task_sections

__all__ = ["load_config"]


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
        require(bool(key), f"override {dotted!r} must look like table.key")
        table.setdefault(section, {})[key] = value
    return Config.from_dict(table, where=str(path), tasks=task_sections())
