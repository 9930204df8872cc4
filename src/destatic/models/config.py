"""Model configs as dataclasses that round-trip through JSON (``config.json``)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

__all__ = ["JsonConfig"]

C = TypeVar("C", bound="JsonConfig")


class JsonConfig:
    """Mixin for config dataclasses: ``to_dict``/``from_dict``/``to_json``/``from_json``.

    A field named ``extra`` (diffusers' private ``_…`` keys kept for saving back) is left out of
    the dict; tuples become lists; unknown keys are a clear error.
    """

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
        return cls(**d)

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
