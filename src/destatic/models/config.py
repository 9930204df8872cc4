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
