"""Model configs as dataclasses that round-trip through JSON (``config.json``)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = [
    "MAX_SAMPLE_SIZE",
    "JsonConfig",
    "check_divides",
    "check_positive",
    "check_positive_float",
    "check_sample_size",
]

C = TypeVar("C", bound="JsonConfig")

#: The largest ``sample_size`` a model config may declare (its default image side, in pixels or
#: latent pixels): a default-size image above it would not fit in memory.
MAX_SAMPLE_SIZE = 4096


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive(**fields: Any) -> None:
    """A ValueError naming the first field that is not a positive integer (or a non-empty tuple
    or list of them); ``None`` values are skipped (optional fields)."""
    for name, value in fields.items():
        if value is None:
            continue
        several = isinstance(value, tuple | list)
        items = value if several else (value,)
        if not items or not all(_is_positive_int(v) for v in items):
            what = "positive integers" if several else "a positive integer"
            raise ValueError(f"{name} must be {what}, got {value!r}")


def check_positive_float(**fields: Any) -> None:
    """A ValueError naming the first field that is not a finite number > 0."""
    for name, value in fields.items():
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_divides(divisor_name: str, divisor: int, name: str, values: Sequence[int]) -> None:
    """A ValueError unless ``divisor`` divides every entry of ``values`` (call after
    :func:`check_positive` on both)."""
    for value in values:
        if value % divisor:
            raise ValueError(
                f"{divisor_name}={divisor} must divide every {name} entry, but not {value}"
            )


def check_sample_size(value: int | None, name: str = "sample_size") -> None:
    """``value`` is None or a positive integer of at most :data:`MAX_SAMPLE_SIZE`."""
    check_positive(**{name: value})
    if value is not None and value > MAX_SAMPLE_SIZE:
        raise ValueError(
            f"{name}={value} is beyond {MAX_SAMPLE_SIZE}: a default-size image would not fit "
            "in memory"
        )


class JsonConfig:
    """Mixin for config dataclasses: ``to_dict``/``from_dict``/``to_json``/``from_json``.

    A field named ``extra`` (diffusers' private ``_…`` keys kept for saving back) is left out of
    the dict; tuples become lists; unknown keys are a clear error.
    """

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value cannot build a working model
        (called on configs read from files; here: nothing to check)."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        d.pop("extra", None)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
        config = cls(**d)
        config.validate()
        return config

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    @classmethod
    def _read_diffusers(
        cls, cfg: dict[str, Any], unsupported: dict[str, tuple], model: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(known fields, private ``_…`` keys) of a diffusers config.json dict.

        Each key of ``unsupported`` must be absent or one of its allowed values; any other key
        that is not a field of ``cls`` is an error too. Both errors name the option.
        """
        cfg = dict(cfg)
        for key, allowed in unsupported.items():
            if key in cfg:
                value = cfg.pop(key)
                if value not in allowed:
                    raise ValueError(
                        f"unsupported diffusers {model} option {key}={value!r} "
                        f"(destatic supports only {allowed[0]!r})"
                    )
        private = {k: cfg.pop(k) for k in list(cfg) if k.startswith("_")}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}  # type: ignore[arg-type]
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unsupported diffusers {model} option(s): {unknown}")
        return cfg, private
