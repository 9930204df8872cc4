"""AnimateDiff motion modules (destatic.models.animatediff) against diffusers' ``MotionAdapter``
and ``UNetMotionModel`` on tiny random weights: the same keys and the same output."""

from __future__ import annotations

import pytest
import torch

from destatic.models.animatediff import (
    MotionAdapter,
    MotionAdapterConfig,
    UNetMotion,
    UNetMotionConfig,
)
from destatic.models.unet import UNet2DCondition, UNetConfig

diffusers = pytest.importorskip("diffusers")

UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=24,
    attention_head_dim=4,
    norm_num_groups=8,
)
ADAPTER = dict(
    block_out_channels=(32, 64),
    motion_layers_per_block=1,
    motion_transformer_layers_per_block=1,
    motion_num_attention_heads=4,
    motion_norm_num_groups=8,
    motion_max_seq_length=12,
    use_motion_mid_block=True,
)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET)
    adapter = diffusers.MotionAdapter(**ADAPTER)
    _randomise(unet, 1)
    _randomise(adapter, 2)
    return unet, adapter, diffusers.UNetMotionModel.from_unet2d(unet, adapter).eval()


def _ours(reference) -> UNetMotion:
    unet, adapter, _ = reference
    ours = UNet2DCondition(UNetConfig.from_diffusers(dict(unet.config)))
    ours.load_state_dict(unet.state_dict(), strict=True)
    ad = MotionAdapter(MotionAdapterConfig.from_diffusers(dict(adapter.config)))
    ad.load_state_dict(adapter.state_dict(), strict=True)
    return UNetMotion.from_unet(ours, ad, num_frames=8).eval()


def test_same_keys_and_output_as_unet_motion_model(reference):
    _, _, theirs = reference
    ours = _ours(reference)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 16, 16, generator=g)  # (B, C, F, H, W)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 5, 24, generator=g)
    with torch.no_grad():
        want = theirs(x, t, ctx.repeat_interleave(8, 0)).sample  # diffusers: per frame
        got = ours(x, t, ctx)
    assert got.shape == want.shape == x.shape
    assert (got - want).abs().max() < 1e-5


def test_config_round_trips_through_diffusers_names(reference):
    _, _, theirs = reference
    config = UNetMotionConfig.from_diffusers(dict(theirs.config))
    d = config.to_dict()
    assert d["down_block_types"] == list(theirs.config.down_block_types)
    assert UNetMotionConfig.from_diffusers(d).to_dict() == d
    model = UNetMotion(config)
    model.load_state_dict(theirs.state_dict(), strict=True)


def test_fresh_motion_modules_draw_the_image_model_frame_by_frame(reference):
    unet, _, _ = reference
    image = UNet2DCondition(UNetConfig.from_diffusers(dict(unet.config)))
    image.load_state_dict(unet.state_dict())
    video = UNetMotion.from_unet(image, num_frames=4, motion_max_seq_length=8).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 5, 24, generator=g)
    with torch.no_grad():
        clip = video(x, torch.tensor([300.0]), ctx)
        frames = image(x[0].transpose(0, 1), torch.tensor(300.0), ctx.expand(4, -1, -1))
    assert torch.allclose(clip[0].transpose(0, 1), frames, atol=1e-5)
    n_motion = sum(p.numel() for p in video.motion_parameters())
    assert 0 < n_motion < sum(p.numel() for p in video.parameters())


def test_bad_inputs_are_one_line(reference):
    unet, _, _ = reference
    image = UNet2DCondition(UNetConfig.from_diffusers(dict(unet.config)))
    wrong = MotionAdapter(
        MotionAdapterConfig(block_out_channels=(32, 128), motion_norm_num_groups=8)
    )
    with pytest.raises(ValueError, match="adapter made for this U-Net"):
        UNetMotion.from_unet(image, wrong)
    video = UNetMotion.from_unet(image, num_frames=4, motion_max_seq_length=4)
    x = torch.randn(1, 4, 6, 16, 16)
    with pytest.raises(ValueError, match="more than the 4"):
        video(x, torch.tensor([1.0]), torch.randn(1, 5, 24))
