"""The SD KL autoencoder against diffusers' AutoencoderKL: same keys, same outputs."""

import pytest
import torch

from destatic.models.autoencoder import AutoencoderConfig, AutoencoderKL
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")

TINY = tiny_sd.VAE


def _pair() -> tuple[torch.nn.Module, AutoencoderKL]:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY).eval()
    tiny_sd.perturb(ref)
    ours = AutoencoderKL(AutoencoderConfig.from_diffusers(dict(ref.config))).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5 * max(b.abs().max().item(), 1.0), diff
    return diff


@torch.no_grad()
def test_parity_with_diffusers() -> None:
    ref, ours = _pair()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    post_ref = ref.encode(x).latent_dist
    post = ours.encode(x)
    assert post.mean.shape == (2, 4, 16, 16)
    _close(post.mean, post_ref.mean)
    _close(post.logvar, post_ref.logvar)
    _close(post.kl(), post_ref.kl())
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    _close(ours.decode(z), ref.decode(z).sample)
    _close(ours(x), ref(x).sample)
    # Posterior sampling consumes the generator the same way.
    s = post.sample(torch.Generator().manual_seed(3))
    s_ref = post_ref.sample(torch.Generator().manual_seed(3))
    _close(s, s_ref)
    lat = ours.latents_from_images(x, torch.Generator().manual_seed(3))
    _close(lat, s_ref * ref.config.scaling_factor)
    _close(ours.images_from_latents(lat), ref.decode(s_ref).sample)


def test_config_round_trip() -> None:
    cfg = AutoencoderConfig.from_diffusers(
        dict(TINY, shift_factor=0.1, use_quant_conv=False, force_upcast=False)
    )
    assert AutoencoderConfig.from_dict(cfg.to_dict()) == cfg
    assert AutoencoderConfig.from_json(cfg.to_json()) == cfg
    model = AutoencoderKL(cfg)
    assert model.quant_conv is None and model.post_quant_conv is not None


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("act_fn", "gelu"),
        ("latents_mean", (0.0, 0.0, 0.0, 0.0)),
        ("down_block_types", ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")),
        ("some_new_option", 1),
    ],
)
def test_unsupported_option(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option.split("_block")[0]):
        AutoencoderConfig.from_diffusers(dict(TINY, **{option: value}))
