"""``sample``: the one entry point that runs any registered sampler safely.

It checks the grid and the state, seeds the noise per sample, counts model evaluations, stops
with a clear error on NaN or inf, and handles a grid that starts at σ = ∞ (pure noise of a
rectified-flow or zero-terminal-SNR model).

**Starting at σ = ∞.** There ``x = x0 + σ·n`` is infinite, so the state is carried as ``x/σ = n``
(see :mod:`destatic.process.base`). Every first-order rule (Euler, DDIM, DPM++ first stage) has
the same limit for the step σ = ∞ → σ₁: ``x₁ = D(n, ∞) + σ₁·n``. ``sample`` takes that step
once, for every sampler, and hands the rest of the grid to the sampler; multistep history starts
after it (which is also the limit of the multistep rules, whose correction weight 1/r → 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from destatic.process.base import Process
from destatic.sampling.base import SAMPLER_INFO, SAMPLERS, Callback, StepInfo, sigma_batch
from destatic.sampling.noise import Generators, NoiseFn, randn, resolve_noise

__all__ = ["NonFiniteError", "check_sigmas", "initial_noise", "sample", "sampler_info"]


class NonFiniteError(FloatingPointError):
    """The sampler state or the model output became NaN or inf."""


def sampler_info(name: str):
    """The registry entry (function, order, evaluations per step) of a sampler name."""
    if name not in SAMPLER_INFO:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    return SAMPLER_INFO[name]


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """A valid grid as float64, or a ValueError that says what is wrong with it."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(
            f"sigmas must be 1-D with at least 2 values (1 step), got shape {tuple(sigmas.shape)}"
        )
    if torch.isnan(sigmas).any():
        raise ValueError("sigmas contain NaN")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        bad = int(torch.nonzero(sigmas[1:] >= sigmas[:-1])[0])
        raise ValueError(
            f"sigmas must be strictly decreasing: sigmas[{bad}]={float(sigmas[bad]):g} is followed "
            f"by {float(sigmas[bad + 1]):g}"
        )
    if float(sigmas[-1]) < 0:
        raise ValueError(f"sigmas must end at a value >= 0, got {float(sigmas[-1]):g}")
    if torch.isinf(sigmas[1:]).any():
        raise ValueError("only sigmas[0] may be infinite (pure noise)")
    return sigmas


def initial_noise(
    shape: tuple[int, ...],
    sigmas: torch.Tensor,
    generator: Generators = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The starting state for ``sigmas``: ``σ₀·z`` (just ``z`` when σ₀ = ∞), z per-sample seeded."""
    z = randn(shape, generator, device=device, dtype=dtype)
    start = float(sigmas[0])
    return z if math.isinf(start) else z * start


class _Counted:
    """Counts calls and refuses non-finite model outputs."""

    def __init__(self, denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        out = self.denoiser(x, sigma)
        if not bool(torch.isfinite(out).all()):
            where = "state" if not bool(torch.isfinite(x).all()) else "model output"
            raise NonFiniteError(
                f"NaN or inf in the {where} at σ={float(sigma.reshape(-1)[0]):.4g} "
                f"(evaluation {self.nfe}); check the model and its dtype (fp16 overflows: try "
                "bf16 or fp32), the guidance scale, and the grid"
            )
        return out


def sample(
    sampler: str,
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callback | None = None,
    noise: NoiseFn | str | None = None,
    process: Process | None = None,
    final_std: float | None = None,
    **options,
) -> torch.Tensor:
    """Run ``sampler`` from state ``x`` at ``sigmas[0]`` down the grid; returns the final state.

    ``generator`` (one, or one per sample) seeds every fresh noise draw; ``noise`` replaces the
    draws entirely (k-diffusion's ``noise_sampler(sigma, sigma_next)``) or names their kind,
    ``"gaussian"`` or ``"brownian"`` (:func:`~destatic.sampling.noise.resolve_noise`; unset:
    the ``process``'s ``sde_noise``). ``process``, the model's, also goes to the samplers that
    need it (``tcd``). ``callback`` gets a
    :class:`StepInfo` after each model call of a step, with the running evaluation count.
    ``final_std`` (the model's local data std, :func:`~destatic.sampling.final_step.
    estimate_local_std`) replaces the sampler's last step σ_L → 0 by the exact one of locally
    Gaussian data, from the sampler's evaluation at σ_L (no extra call; the grid must end at 0).
    """
    info = sampler_info(sampler)  # unknown names fail here, listing the valid ones
    sigmas = check_sigmas(sigmas)
    if final_std is not None:
        options |= {"generator": generator, "noise": noise, "process": process}
        return _with_final_step(sampler, denoiser, x, sigmas, final_std, callback, **options)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be [batch, ...] with batch >= 1, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("the initial state x contains NaN or inf")
    counted = _Counted(denoiser)
    noise = resolve_noise(noise, x, sigmas, generator, process)
    if info.needs_process and process is not None:
        options["process"] = process
    report = None
    if callback is not None:

        def report(step: StepInfo, offset: int = 0) -> None:
            callback(
                StepInfo(
                    step.i + offset, step.sigma, step.sigma_next, step.x, step.denoised, counted.nfe
                )
            )

    offset = 0
    if math.isinf(float(sigmas[0])):
        sigma_1 = float(sigmas[1])
        denoised = counted(x, sigma_batch(x, math.inf))
        if report is not None:
            report(StepInfo(0, math.inf, sigma_1, x, denoised))
        x = denoised + sigma_1 * x
        sigmas, offset = sigmas[1:], 1
        if len(sigmas) < 2:
            return x
    fn = SAMPLERS[sampler]
    step_callback = None if report is None else (lambda s: report(s, offset))
    out = fn(counted, x, sigmas, noise=noise, callback=step_callback, **options)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"{sampler} produced NaN or inf; try more steps or another grid")
    return out


def _with_final_step(sampler, denoiser, x, sigmas, std, callback, **options) -> torch.Tensor:
    """:func:`sample` with its last step replaced (``final_std``)."""
    from destatic.sampling.final_step import local_gaussian_final_step

    if len(sigmas) < 3 or float(sigmas[-1]) != 0:
        raise ValueError("final_std needs a grid of at least 2 steps that ends at σ = 0")
    sigma_last = float(sigmas[-2])
    seen: list[StepInfo] = []

    def keep(step: StepInfo) -> None:
        if step.sigma == sigma_last and not seen:
            seen.append(step)
        if callback is not None:
            callback(step)

    sample(sampler, denoiser, x, sigmas, callback=keep, **options)
    return local_gaussian_final_step(seen[0].x, seen[0].denoised, sigma_last, std)
