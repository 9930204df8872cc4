"""The SD 1.x/2.x U-Net against diffusers' UNet2DConditionModel: same keys, same outputs."""

import dataclasses

import pytest
import torch

from destatic.models import UNet2DCondition, UNetConfig
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")

TINY = tiny_sd.UNET
SD2 = dict(TINY, use_linear_projection=True, attention_head_dim=(2, 4))
SD2_FULL = dict(
    SD2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=(1, 2),
    transformer_layers_per_block=(2, 1),
)


def _pair(kwargs: dict) -> tuple[torch.nn.Module, UNet2DCondition]:
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**kwargs).eval()
    tiny_sd.perturb(ref)
    ours = UNet2DCondition(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("kwargs", [TINY, SD2, SD2_FULL], ids=["sd1", "sd2", "sd2-deep"])
def test_matches_diffusers(kwargs: dict) -> None:
    ref, ours = _pair(kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999.0, 17.25])
    ctx = torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == want.shape == x.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_fractional_and_scalar_timesteps() -> None:
    ref, ours = _pair(TINY)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        a = ours(x, torch.tensor([500.0]), ctx)
        b = ours(x, torch.tensor([500.5]), ctx)
        c = ours(x, 500.5, ctx)
        want = ref(x, torch.tensor([500.5]), encoder_hidden_states=ctx).sample
    assert not torch.equal(a, b)  # the half step reaches the output
    assert torch.equal(b, c)
    assert (b - want).abs().max() <= 1e-5 * want.abs().max()


def test_odd_latent_size() -> None:
    ref, ours = _pair(TINY)
    x, ctx = torch.randn(1, 4, 9, 7), torch.randn(1, 3, 32)
    with torch.no_grad():
        want = ref(x, torch.tensor([3.0]), encoder_hidden_states=ctx).sample
        got = ours(x, torch.tensor([3.0]), ctx)
    assert got.shape == x.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text_time"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("some_future_option", 1),
    ],
)
def test_unsupported_option_is_named(option: str, value: object) -> None:
    cfg = dict(UNetConfig().to_dict(), **{option: value})
    with pytest.raises(ValueError, match=option):
        UNetConfig.from_diffusers(cfg)


def test_unsupported_block_type_is_named() -> None:
    cfg = dict(TINY, down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D"))
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        UNetConfig.from_diffusers(cfg)


def test_config_json_round_trip() -> None:
    cfg = UNetConfig.from_diffusers(
        dict(SD2_FULL, _class_name="UNet2DConditionModel", _diffusers_version="0.42.1")
    )
    assert cfg.extra["_class_name"] == "UNet2DConditionModel"
    back = UNetConfig.from_json(cfg.to_json())
    assert dataclasses.replace(back, extra=cfg.extra) == cfg
    assert back.attention_head_dim == (2, 4)
    assert UNetConfig.from_dict(UNetConfig().to_dict()) == UNetConfig()


def test_fresh_model_starts_at_zero() -> None:
    model = UNet2DCondition(UNetConfig(**TINY)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 2, 32))
    assert torch.count_nonzero(out) == 0
