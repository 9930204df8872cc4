"""PatchGAN discriminator for the autoencoder's optional adversarial term.

Isola et al. 2017 ("Image-to-Image Translation with Conditional Adversarial Networks"), as LDM's
autoencoders use it (Esser et al. 2021, "Taming Transformers"; Rombach et al. 2022): a stack of
4×4 stride-2 convolutions whose output is a grid of logits, each judging one receptive-field
patch as real or reconstructed. LDM normalises with BatchNorm; here it is GroupNorm, so the
score of an image never depends on the other images of its batch — the property the training
loop relies on to give the same update for any split of a batch over processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchDiscriminator",
    "adversarial_loss",
    "critic_logits",
    "hinge_discriminator_loss",
]


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class PatchDiscriminator(nn.Module):
    """``layers`` stride-2 4×4 convolutions (``channels`` doubling up to 8×), one stride-1
    convolution, then a 1-channel 4×4 convolution: logits [B, 1, h, w], one per patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"the discriminator needs at least one layer, got {layers}")
        mods: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(_groups(out), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Per-sample ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))]) over patches (Lim & Ye 2017)."""
    return 0.5 * (F.relu(1 - real).flatten(1).mean(1) + F.relu(1 + fake).flatten(1).mean(1))


def critic_logits(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D(x̂) through detached D parameters, D(x), D(x̂ detached)): the generator's term then
    trains only the generator and the hinge term only D, in one backward pass."""
    frozen = {k: v.detach() for k, v in discriminator.named_parameters()}
    fake_for_generator = torch.func.functional_call(discriminator, frozen, (fake,))
    return fake_for_generator, discriminator(real), discriminator(fake.detach())


def adversarial_loss(
    critic: tuple[torch.Tensor, torch.Tensor, torch.Tensor], weight: float
) -> torch.Tensor:
    """Per-sample −weight · mean D(x̂) + ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))]) from
    :func:`critic_logits`' three logit grids (LDM's PatchGAN terms with a fixed weight)."""
    fake_for_generator, real, fake = (c.float() for c in critic)
    return -weight * fake_for_generator.flatten(1).mean(1) + hinge_discriminator_loss(real, fake)
