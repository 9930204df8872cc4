"""AUTOMATIC1111's sampler and schedule names as aliases of destatic's (sampler, grid) pairs.

A1111 (and the PNGs it writes) names a sampler with a label such as ``"DPM++ 2M Karras"``: a
solver plus, optionally, a schedule (its "Schedule type": ``Karras``, ``Exponential``, …). Here
a label resolves, case-insensitively, to destatic's names: ``"DPM++ 2M Karras"`` is
``("dpmpp_2m", "karras")``, ``"Euler a"`` is ``("euler_ancestral", None)`` (None: the model's
grid). destatic's own names pass through unchanged.

Labels whose solver destatic does not implement (``DPM2 a``, ``PLMS``, …) fail with a message
that says so, listing the valid names.
"""

from __future__ import annotations

from destatic.sampling.base import SAMPLER_INFO
from destatic.sampling.grids import GRIDS

__all__ = ["SAMPLER_LABELS", "SCHEDULE_LABELS", "resolve_grid", "resolve_sampler"]

#: A1111's sampler labels → destatic sampler names (matched in any case).
SAMPLER_LABELS: dict[str, str] = {
    "Euler": "euler",
    "Euler a": "euler_ancestral",
    "LMS": "lms",
    "Heun": "heun",
    "DPM2": "dpm_2",
    "DPM++ 2S a": "dpmpp_2s_ancestral",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 3M SDE": "dpmpp_3m_sde",
    "DDIM": "ddim",
    "DDPM": "ddpm",
    "UniPC": "uni_pc",
    "LCM": "lcm",
}

#: A1111's "Schedule type" labels → destatic grids (any case); ``Automatic`` is the model's.
#: Its ``Uniform`` (k-diffusion's ``get_sigmas``) and ``Normal`` are both uniform in the
#: schedule's time: our ``normal``.
SCHEDULE_LABELS: dict[str, str | None] = {
    "Automatic": None,
    "Karras": "karras",
    "Exponential": "exponential",
    "Polyexponential": "polyexponential",
    "SGM Uniform": "sgm_uniform",
    "Align Your Steps": "ays",
    "Simple": "simple",
    "Normal": "normal",
    "Uniform": "normal",
    "Beta": "beta",
}

#: A1111 labels with no destatic solver (named so the error can say so).
_MISSING = ("dpm2 a", "dpm fast", "dpm adaptive", "plms", "restart", "dpm++ 2m sde heun")


def _key(name: str) -> str:
    return " ".join(name.lower().split())


_SAMPLERS_BY_KEY = {_key(label): name for label, name in SAMPLER_LABELS.items()}
_SCHEDULES_BY_KEY = {_key(label): grid for label, grid in SCHEDULE_LABELS.items()}
_SCHEDULES_BY_KEY["sgmuniform"] = "sgm_uniform"  # A1111's alias


def _sampler_choices() -> str:
    return (
        f"choose one of {', '.join(sorted(SAMPLER_INFO))}, or an A1111 name such as "
        "'DPM++ 2M Karras' or 'Euler a' (destatic samplers lists them)"
    )


def resolve_grid(name: str | None) -> str | None:
    """A destatic grid name for ``name`` (ours, or an A1111 schedule type such as ``"SGM
    Uniform"``); None stays None (the model's grid), as does ``"Automatic"``."""
    if name is None or name in GRIDS:
        return name
    key = _key(name)
    if key in GRIDS:
        return key
    if key in _SCHEDULES_BY_KEY:
        return _SCHEDULES_BY_KEY[key]
    labels = ", ".join(SCHEDULE_LABELS)
    raise ValueError(
        f"unknown grid {name!r}; choose one of {', '.join(GRIDS)} (or an A1111 schedule type: "
        f"{labels})"
    )


def _split_label(key: str) -> tuple[str, str | None] | None:
    """(sampler label, grid) for an A1111 label with an optional schedule suffix, or None."""
    if key in _SAMPLERS_BY_KEY:
        return key, None
    for schedule in sorted(_SCHEDULES_BY_KEY, key=len, reverse=True):
        head = key.removesuffix(" " + schedule)
        if head != key and head in _SAMPLERS_BY_KEY:
            return head, _SCHEDULES_BY_KEY[schedule]
    return None


def resolve_sampler(name: str, grid: str | None = None) -> tuple[str, str | None]:
    """``(sampler, grid)`` in destatic's names for a sampler ``name`` (ours or an A1111 label,
    any case) and an optional ``grid`` (ours or an A1111 schedule type).

    A label's schedule (``"… Karras"``) sets the grid; naming a different ``grid`` as well is
    an error, as is a label destatic has no solver for. Errors are one-line ValueErrors that
    list the valid names."""
    grid = resolve_grid(grid)
    if name in SAMPLER_INFO:
        return name, grid
    key = _key(name)
    if key in SAMPLER_INFO:
        return key, grid
    found = _split_label(key)
    if found is None:
        if key in _MISSING:
            raise ValueError(f"A1111's sampler {name!r} is not in destatic; {_sampler_choices()}")
        raise ValueError(f"unknown sampler {name!r}; {_sampler_choices()}")
    label, label_grid = found
    sampler = _SAMPLERS_BY_KEY[label]
    if sampler not in SAMPLER_INFO:
        raise ValueError(
            f"A1111's sampler {name!r} ({sampler}) is not in destatic; {_sampler_choices()}"
        )
    if label_grid is not None and grid is not None and grid != label_grid:
        raise ValueError(
            f"sampler {name!r} implies the {label_grid} grid but grid {grid!r} was given; "
            "drop one of them"
        )
    return sampler, grid or label_grid
