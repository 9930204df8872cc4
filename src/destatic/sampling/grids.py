"""σ grids: where a sampler evaluates the model.

Every grid is ``steps + 1`` decreasing σ values ending in 0. Two kinds:

* **σ-space grids** need only (σ_min, σ_max): ``karras`` (Karras et al. 2022, eq. 5),
  ``exponential`` (uniform in log σ), ``polyexponential`` (k-diffusion), ``ays`` (Align Your
  Steps, Sabour et al. 2024: published SD 1.5 σ's, log-linearly re-interpolated for any count),
  and the optimised ``lab2d`` / ``lab16d`` (:data:`OPTIMIZED`).
* **time grids** read the model's own schedule and need ``process=``: ``normal`` (alias
  ``linspace``) and ``sgm_uniform`` are uniform in the process's schedule time; ``leading`` and
  ``trailing`` are diffusers' timestep spacings (Lin et al. 2024, Table 2); ``simple`` and
  ``beta`` (Lee et al. 2024, α = β = 0.6) pick entries of the training σ table, as ComfyUI does;
  ``lcm`` is LCMScheduler's (and TCDScheduler's) pick from a 50-step schedule (:func:`_lcm`).

``snap=True`` moves each σ to the nearest trained timestep of a discrete model (round t(σ)), as
diffusers does for its multistep schedulers; repeated values are merged.

``karras`` and ``exponential`` are computed in float64, or in the process's ``grid_dtype``:
float32 for Stable Audio's :class:`~destatic.process.CosineEDM`, whose scheduler computes them
in float32 (the exponential one rising, then reversed) and whose Brownian-tree noise depends on
the exact σ's, so the grid is the scheduler's to the bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from destatic.process.base import Process

__all__ = ["AYS_SD15", "GRIDS", "OPTIMIZED", "loglinear_interp", "make_sigmas"]

# Align Your Steps (Sabour, Fidler, Kreis 2024), the published 10-step grid for Stable Diffusion
# 1.5 (σ from 14.615 to 0.029). As in ComfyUI's AlignYourSteps node, other step counts
# re-interpolate log σ linearly over steps + 1 points and the last point becomes 0.
AYS_SD15 = (14.6146, 6.4745, 3.8636, 2.6946, 1.8841, 1.3943, 0.9642, 0.6523, 0.3977, 0.1515, 0.0291)

# Grids found by ``benchmarks/optimize_grids.py`` (destatic.sampling.optimize): 8 steps of
# ``uni_pc_3`` on SD's schedule, minimising the RMS error to the exact ODE solution of the lab's
# 2-D and 16-D Gaussian-mixture problems (training noise disjoint from the lab's). These are the
# nonzero points; other step counts re-interpolate them log-linearly, other σ ranges rescale log σ.
OPTIMIZED = {
    "lab2d": (14.6146, 1.7833, 1.6555, 0.539, 0.2533, 0.1176, 0.0704, 0.0292),
    "lab16d": (14.6146, 4.6998, 2.8988, 1.8478, 0.9231, 0.3093, 0.1797, 0.0402),
}
_OPTIMIZED_RANGE = (0.0292, 14.6146)  # the σ range (SD 1.x) the knots above were made for


def loglinear_interp(knots, points: int) -> np.ndarray:
    """``points`` values whose log follows the piecewise-linear log of ``knots`` (AYS)."""
    log_knots = np.log(np.asarray(knots, dtype=np.float64))
    xs = np.linspace(0, 1, len(log_knots))
    return np.exp(np.interp(np.linspace(0, 1, points), xs, log_knots))


def _rescale(sigmas: np.ndarray, made_for: tuple[float, float], sigma_min: float, sigma_max: float):
    """Map log σ linearly from the range the knots were made for onto [σ_min, σ_max]."""
    lo, hi = (math.log(v) for v in made_for)
    unit = (np.log(sigmas) - lo) / (hi - lo)
    return torch.from_numpy(np.exp(math.log(sigma_min) + unit * math.log(sigma_max / sigma_min)))


def _ays(steps, sigma_min, sigma_max, **_):
    made_for = (AYS_SD15[-1], AYS_SD15[0])
    sigmas = _rescale(loglinear_interp(AYS_SD15, steps + 1), made_for, sigma_min, sigma_max)
    return sigmas[:-1]  # the last point is replaced by 0


def _optimized(name: str):
    def grid(steps, sigma_min, sigma_max, **_):
        knots = loglinear_interp(OPTIMIZED[name], steps)
        return _rescale(knots, _OPTIMIZED_RANGE, sigma_min, sigma_max)

    grid.__doc__ = f"The optimised grid {name!r} (see OPTIMIZED)."
    return grid


def _grid_dtype(process: Process | None) -> torch.dtype:
    return torch.float64 if process is None else process.grid_dtype


def _karras(steps, sigma_min, sigma_max, *, rho: float = 7.0, process=None, **_):
    ramp = torch.linspace(0, 1, steps, dtype=_grid_dtype(process))
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _exponential(steps, sigma_min, sigma_max, *, process=None, **_):
    dtype = _grid_dtype(process)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    if dtype == torch.float64:
        return torch.linspace(hi, lo, steps, dtype=dtype).exp()
    return torch.linspace(lo, hi, steps, dtype=dtype).exp().flip(0)


def _polyexponential(steps, sigma_min, sigma_max, *, rho: float = 1.0, **_):
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    return (ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp()


def _time_uniform(steps, sigma_min, sigma_max, *, process: Process, drop_last: bool = False, **_):
    start = float(process.sigma_to_t(torch.tensor(sigma_max, dtype=torch.float64)))
    end = float(process.sigma_to_t(torch.tensor(sigma_min, dtype=torch.float64)))
    t = torch.linspace(start, end, steps + 1 if drop_last else steps, dtype=torch.float64)
    return process.t_to_sigma(t[:steps])


def _normal(steps, sigma_min, sigma_max, **kw):
    return _time_uniform(steps, sigma_min, sigma_max, **kw)


def _sgm_uniform(steps, sigma_min, sigma_max, **kw):
    return _time_uniform(steps, sigma_min, sigma_max, drop_last=True, **kw)


def _table(process: Process, sigma_min: float, sigma_max: float) -> torch.Tensor:
    table = process.sigma_table()
    keep = (table >= sigma_min * (1 - 1e-9)) & (table <= sigma_max * (1 + 1e-9))
    return table[keep]


def _leading(steps, sigma_min, sigma_max, *, process: Process, offset: int = 0, **_):
    table = _table(process, sigma_min, sigma_max)
    idx = np.arange(steps) * (len(table) // steps) + offset
    return table[torch.from_numpy(idx[::-1].copy()).clamp(max=len(table) - 1)]


def _trailing(steps, sigma_min, sigma_max, *, process: Process, **_):
    table = _table(process, sigma_min, sigma_max)
    idx = np.round(np.arange(len(table), 0, -len(table) / steps)).astype(np.int64) - 1
    return table[torch.from_numpy(idx)]


def _lcm(
    steps,
    sigma_min,
    sigma_max,
    *,
    process: Process,
    original_steps: int = 50,
    strength: float = 1.0,
    **_,
):
    """diffusers' ``LCMScheduler.set_timesteps`` (Luo et al. 2023): the distillation schedule is
    every k-th timestep, ``t_j = j·k - 1`` for j = 1 … N_orig (k = T // N_orig), and ``steps``
    of them are taken from its reversed list at the indices ⌊i·N_orig/steps⌋, i = 0 … steps-1.
    Four steps of SD's T = 1000 give timesteps 999, 759, 499, 259.

    ``strength`` < 1 (image → image, as ``LatentConsistencyModelImg2ImgPipeline``) keeps the
    first N = ⌊N_orig·strength⌋ timesteps of the distillation schedule and takes all ``steps``
    from them the same way (N in place of N_orig): 4 steps at strength 0.5 give 499, 379, 259,
    139 — not the tail of the full grid that other image → image runs keep."""
    table = _table(process, sigma_min, sigma_max)
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    kept = int(original_steps * strength)
    if not 1 <= steps <= kept or original_steps > len(table):
        raise ValueError(
            f"the lcm grid takes 1 … {kept} steps of its {original_steps}-step schedule"
            + (f" at strength {strength:g}" if strength < 1 else "")
            + f" (and at most {len(table)} timesteps), got {steps}"
        )
    k = len(table) // original_steps
    origin = (np.arange(1, kept + 1) * k - 1)[::-1]
    pick = np.floor(np.linspace(0, kept, steps, endpoint=False)).astype(np.int64)
    return table[torch.from_numpy(origin[pick].copy())]


def _simple(steps, sigma_min, sigma_max, *, process: Process, **_):
    table = _table(process, sigma_min, sigma_max)
    stride = len(table) / steps
    return table[torch.tensor([len(table) - 1 - int(i * stride) for i in range(steps)])]


def _beta(
    steps, sigma_min, sigma_max, *, process: Process, alpha: float = 0.6, beta: float = 0.6, **_
):
    from scipy.stats import beta as beta_dist

    table = _table(process, sigma_min, sigma_max)
    u = 1 - np.linspace(0, 1, steps, endpoint=False)
    idx = np.rint(beta_dist.ppf(u, alpha, beta) * (len(table) - 1)).astype(np.int64)
    return table[torch.from_numpy(idx)]


GridFn = Callable[..., torch.Tensor]
GRIDS: dict[str, GridFn] = {
    "karras": _karras,
    "exponential": _exponential,
    "polyexponential": _polyexponential,
    "ays": _ays,
    **{name: _optimized(name) for name in OPTIMIZED},
    "normal": _normal,
    "linspace": _normal,
    "sgm_uniform": _sgm_uniform,
    "leading": _leading,
    "trailing": _trailing,
    "simple": _simple,
    "beta": _beta,
    "lcm": _lcm,
}
_NEEDS_PROCESS = {
    "normal",
    "linspace",
    "sgm_uniform",
    "leading",
    "trailing",
    "simple",
    "beta",
    "lcm",
}


def _snap(sigmas: torch.Tensor, process: Process) -> torch.Tensor:
    t = process.sigma_to_t(sigmas).round()
    return process.t_to_sigma(t)


def make_sigmas(
    grid: str,
    steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    *,
    process: Process | None = None,
    snap: bool = False,
    **options,
) -> torch.Tensor:
    """``steps + 1`` decreasing σ (float64), the last 0. σ_min/σ_max default to the process's.

    >>> make_sigmas("karras", 4, 0.03, 14.6).shape
    torch.Size([5])
    """
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if process is not None:
        sigma_min = process.sigma_min if sigma_min is None else sigma_min
        sigma_max = process.sigma_max if sigma_max is None else sigma_max
    if grid in _NEEDS_PROCESS and process is None:
        raise ValueError(f"grid {grid!r} follows a model's own timesteps: pass process=")
    if sigma_min is None or sigma_max is None:
        raise ValueError("pass sigma_min and sigma_max, or process=")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    if math.isinf(sigma_max) and grid not in _NEEDS_PROCESS:
        raise ValueError(
            f"grid {grid!r} needs a finite sigma_max, but this process starts at σ = ∞; "
            "use a time grid (normal, sgm_uniform, simple, beta) or pass a finite sigma_max"
        )
    sigmas = GRIDS[grid](steps, float(sigma_min), float(sigma_max), process=process, **options)
    if snap:
        if process is None:
            raise ValueError("snap=True needs the model's process=")
        sigmas = _snap(sigmas, process)
    sigmas = torch.unique_consecutive(sigmas.to(torch.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)])
