"""Classifier-free guidance as a denoiser wrapper."""

import math

import pytest
import torch

from destatic.sampling import ClassifierFreeGuidance


class Recorder:
    """A conditional denoiser D(x, σ, label) = x·0.5 + label, recording its batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, *, label):
        self.batches.append(x.shape[0])
        return 0.5 * x + label[:, None]


def _inputs(batch=3):
    x = torch.randn(batch, 4, generator=torch.Generator().manual_seed(0))
    return x, torch.full((batch,), 2.0)


def test_guided_output_and_one_batched_call():
    model, (x, sigma) = Recorder(), _inputs()
    cond, uncond = {"label": torch.ones(3)}, {"label": torch.zeros(3)}
    out = ClassifierFreeGuidance(model, cond, uncond, scale=7.5)(x, sigma)
    torch.testing.assert_close(out, 0.5 * x + 7.5)  # D_u + w (D_c - D_u) = 0.5x + 0 + 7.5·1
    assert model.batches == [6]


def test_scale_one_skips_the_unconditional_call():
    model, (x, sigma) = Recorder(), _inputs()
    out = ClassifierFreeGuidance(model, {"label": torch.ones(3)}, None, scale=1.0)(x, sigma)
    torch.testing.assert_close(out, 0.5 * x + 1)
    assert model.batches == [3]


def test_guidance_interval():
    model, (x, _) = Recorder(), _inputs()
    cfg = ClassifierFreeGuidance(
        model, {"label": torch.ones(3)}, {"label": torch.zeros(3)}, scale=5.0, interval=(0.3, 5.0)
    )
    torch.testing.assert_close(cfg(x, torch.full((3,), 10.0)), 0.5 * x + 1)  # above: no guidance
    assert model.batches == [3]
    torch.testing.assert_close(cfg(x, torch.full((3,), 1.0)), 0.5 * x + 5)  # inside: guided
    torch.testing.assert_close(cfg(x, torch.full((3,), 0.3)), 0.5 * x + 1)  # interval is (lo, hi]


def test_rescale_matches_the_conditional_std():
    def model(x, sigma, *, label):
        return x * label[:, None]

    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    cond, uncond = {"label": torch.full((2,), 2.0)}, {"label": torch.full((2,), 1.0)}
    sigma = torch.ones(2)
    plain = ClassifierFreeGuidance(model, cond, uncond, 4.0)(x, sigma)
    full = ClassifierFreeGuidance(model, cond, uncond, 4.0, rescale=1.0)(x, sigma)
    half = ClassifierFreeGuidance(model, cond, uncond, 4.0, rescale=0.5)(x, sigma)
    torch.testing.assert_close(full.std(dim=1), (2 * x).std(dim=1))
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)


def test_nested_conditioning_is_batched():
    def model(x, sigma, *, text):
        return x + text["tokens"].mean(dim=1, keepdim=True)

    x, sigma = _inputs(2)
    cond = {"text": {"tokens": torch.ones(2, 5)}}
    uncond = {"text": {"tokens": torch.zeros(2, 5)}}
    torch.testing.assert_close(ClassifierFreeGuidance(model, cond, uncond, 3.0)(x, sigma), x + 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale": 5.0, "uncond": None}, "unconditional"),
        ({"scale": 5.0, "rescale": 1.5}, "rescale"),
        ({"scale": 5.0, "interval": (2.0, 1.0)}, "interval"),
    ],
)
def test_bad_guidance_settings(kwargs, message):
    args = {"cond": {"label": torch.ones(1)}, "uncond": {"label": torch.zeros(1)}, **kwargs}
    with pytest.raises(ValueError, match=message):
        ClassifierFreeGuidance(Recorder(), **args)


def test_interval_accepts_infinite_upper_bound():
    cfg = ClassifierFreeGuidance(
        Recorder(),
        {"label": torch.ones(1)},
        {"label": torch.zeros(1)},
        2.0,
        interval=(0.0, math.inf),
    )
    assert cfg(torch.zeros(1, 4), torch.tensor([math.inf])).shape == (1, 4)
