"""A Gaussian mixture with its exact denoiser: a perfect "model" that needs no training.

For data ``x0 ~ Σ_k w_k N(μ_k, s²I)`` and ``x = x0 + σ·n``, Bayes' rule gives in closed form

    p(k | x) ∝ w_k · N(x; μ_k, (s² + σ²)I)
    E[x0 | x, k] = μ_k + s²/(s² + σ²)·(x - μ_k)
    D(x, σ) = E[x0 | x] = (s²·x + σ²·Σ_k p(k|x) μ_k) / (s² + σ²),

the optimal denoiser of docs/architecture.md. At σ = ∞ the state is ``x/σ`` and D is the prior mean.
:meth:`GaussianMixture.network` turns it into what an ε-, v-, x0- or flow-trained network of any
process would output, so the preconditioning code can be tested against the exact answer.
"""

from __future__ import annotations

import math

import torch

from destatic.process.base import Process
from destatic.process.targets import get_target, preconditioning

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """An isotropic Gaussian mixture in ``dim`` dimensions (float64 parameters)."""

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k = self.means.shape[0]
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else weights
        self.weights = torch.as_tensor(weights, dtype=torch.float64) / weights.sum()
        self.std = float(std)

    @classmethod
    def standard(
        cls, dim: int = 2, components: int = 8, std: float = 0.1, seed: int = 0
    ) -> GaussianMixture:
        """The lab's default problem: ``components`` equal-weight modes of std ``std``, scaled so
        every coordinate has mean 0 and variance 1 overall (the scale latent-diffusion models
        are trained on). In 2-D the means sit evenly on a circle (the "8 Gaussians" benchmark);
        in other dimensions they are drawn once from ``seed``."""
        if dim == 2:
            angle = torch.arange(components, dtype=torch.float64) * (2 * math.pi / components)
            means = torch.stack([angle.cos(), angle.sin()], dim=1)
        else:
            g = torch.Generator().manual_seed(seed)
            means = torch.randn(components, dim, generator=g, dtype=torch.float64)
        means = means - means.mean(0)
        means = means / means.std(0, unbiased=False) * (1 - std**2) ** 0.5
        return cls(means, std)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact draws from the mixture, [n, dim] float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.std * z

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The exact posterior mean E[x0 | x0 + σ·n = x]; x of shape [B, dim], σ of shape [B]."""
        dtype = x.dtype
        x64 = x.to(torch.float64).reshape(x.shape[0], -1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0])[:, None]
        means, weights = self.means.to(x.device), self.weights.to(x.device)
        s2 = self.std**2
        inf = torch.isinf(sigma)
        var = s2 + torch.where(inf, torch.zeros_like(sigma), sigma**2)  # unused where σ = ∞
        sq = torch.cdist(x64, means) ** 2  # [B, K]
        logits = torch.where(inf, weights.log().expand_as(sq), weights.log() - sq / (2 * var))
        posterior_mean = logits.softmax(-1) @ means  # Σ_k p(k|x) μ_k
        out = torch.where(inf, posterior_mean, (s2 * x64 + sigma**2 * posterior_mean) / var)
        return out.reshape(x.shape).to(dtype)

    __call__ = denoise

    def network(self, process: Process, target: str):
        """The raw network ``net(x_in, c_noise) -> F`` an exact model of this mixture would be,
        for ``process`` and prediction ``target`` (the inverse of the Denoiser wrapper)."""
        target_ = get_target(target)

        def net(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
            sigma = process.label_to_sigma(c_noise.to(torch.float64)).to(x_in.device)
            c_in, c_skip, c_out, _ = preconditioning(process, target_, sigma)
            view = (-1, *[1] * (x_in.ndim - 1))
            x = x_in.to(torch.float64) / c_in.reshape(view)
            denoised = self.denoise(x, sigma).to(torch.float64)
            return ((denoised - c_skip.reshape(view) * x) / c_out.reshape(view)).to(x_in.dtype)

        return net
