"""SDXL ControlNets (``addition_embed_type="text_time"``): a diffusers ``ControlNetModel`` made
for the tiny SDXL U-Net loads from its folder, its residuals match diffusers' with the U-Net's
``added_cond``, and it steers the SDXL pipeline to the same image as diffusers'
StableDiffusionXLControlNetPipeline (Euler, DPM++ 2M; scale and start/end window)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import destatic
from destatic.models.controlnet import ControlledUNet, ControlNet, ControlNetConfig
from destatic.models.registry import load_component
from destatic.models.unet import UNet2DCondition, UNetConfig
from tests import tiny_sd
from tests.test_pipeline import SD, scheduler_sigmas
from tests.test_pipeline_sdxl import DPMPP_2M, EULER, POOLED, base  # noqa: F401

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")


@pytest.fixture(scope="module")
def control(base, tmp_path_factory):  # noqa: F811
    """A diffusers SDXL ControlNet for the tiny SDXL U-Net (perturbed), saved as a folder."""
    torch.manual_seed(4)
    net = diffusers.ControlNetModel.from_unet(
        base[1].unet, conditioning_embedding_out_channels=(8, 16)
    ).eval()
    tiny_sd.perturb(net)
    assert net.config.addition_embed_type == "text_time"
    folder = tmp_path_factory.mktemp("sdxl_controlnet") / "controlnet"
    net.save_pretrained(folder, safe_serialization=True)
    return folder, net


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 12, generator=g)
    context = torch.randn(2, 77, 64, generator=g)
    added = {
        "text_embeds": torch.randn(2, POOLED, generator=g),
        "time_ids": torch.tensor([[16.0, 24, 0, 0, 16, 24], [32, 48, 4, 8, 16, 24]]),
    }
    image = torch.rand(2, 3, 16, 24, generator=g)
    return x, torch.tensor([999.0, 3.5]), context, added, image


@torch.no_grad()
def test_sdxl_controlnet_loads_and_matches_diffusers(base, control):  # noqa: F811
    folder, reference = control
    net = load_component(folder).eval()
    assert isinstance(net, ControlNet) and hasattr(net, "add_embedding")
    x, t, context, added, image = _inputs()
    down, mid = reference(
        x,
        t,
        context,
        controlnet_cond=image,
        conditioning_scale=0.7,
        added_cond_kwargs=added,
        return_dict=False,
    )
    r = net(x, t, context, image, scale=0.7, added_cond=added)
    for a, b in zip(down, r.down, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.mid, mid, atol=1e-5, rtol=0)
    unet = base[1].unet
    ours = UNet2DCondition(UNetConfig.from_diffusers(dict(unet.config)))
    ours.load_state_dict(unet.state_dict(), strict=True)
    expected = unet(
        x,
        t,
        context,
        added_cond_kwargs=added,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    steered = ControlledUNet(ours.eval(), [(net, image, 0.7, None)])
    torch.testing.assert_close(
        steered(x, t, context, added_cond=added), expected, atol=1e-5, rtol=0
    )
    other = dict(added, time_ids=added["time_ids"].flip(1))  # the ControlNet reads the time ids
    assert (net(x, t, context, image, 0.7, added_cond=other).mid - r.mid).abs().max() > 1e-4
    with pytest.raises(ValueError, match="micro-conditioned"):
        net(x, t, context, image)


@torch.no_grad()
def test_from_unet_copies_the_micro_conditioning(base):  # noqa: F811
    unet = base[1].unet
    ours = UNet2DCondition(UNetConfig.from_diffusers(dict(unet.config)))
    ours.load_state_dict(unet.state_dict(), strict=True)
    net = ControlNet.from_unet(ours.eval(), conditioning_embedding_out_channels=(8, 16)).eval()
    a, b = net.add_embedding.state_dict(), ours.add_embedding.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t, context, added, image = _inputs(2)
    fresh = ControlledUNet(ours, [(net, image, 1.0, None)])(x, t, context, added_cond=added)
    torch.testing.assert_close(fresh, ours(x, t, context, added_cond=added))


def _reference_image(base, control, scheduler, steps, z, **kwargs):  # noqa: F811
    name, config = scheduler
    sched = getattr(diffusers, name)(**SD, **config)
    pipe = diffusers.StableDiffusionXLControlNetPipeline(
        **{**base[1].components, "scheduler": sched}, controlnet=control[1]
    )
    pipe.set_progress_bar_config(disable=True)
    sched.set_timesteps(steps)
    sigmas = scheduler_sigmas(sched)
    start = float(sigmas[0])
    k_style = name == EULER[0]
    scale = start / sched.init_noise_sigma if k_style else start / math.sqrt(1 + start**2)
    image = pipe(latents=z * scale, num_inference_steps=steps, output_type="np", **kwargs).images
    return image, sigmas


@pytest.mark.parametrize(
    ("sampler", "scheduler", "negative"),
    [("euler", EULER, "blurry"), ("dpmpp_2m", DPMPP_2M, None)],
)
def test_same_image_as_diffusers_sdxl_controlnet_pipeline(
    base,  # noqa: F811
    control,
    sampler,
    scheduler,
    negative,
):
    """A 24×16 image (the time ids are (h, w)), guidance 5, control scale 0.7 on the steps from
    20% to 80%; without a negative prompt diffusers' zeros (force_zeros_for_empty_prompt)."""
    steps = 10
    edges = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(5))
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    common = {"negative_prompt": negative, "height": 16, "width": 24, "guidance_scale": 5.0}
    window = {"control_guidance_start": 0.2, "control_guidance_end": 0.8}
    expected, sigmas = _reference_image(
        base,
        control,
        scheduler,
        steps,
        z,
        prompt="a red apple",
        image=edges,
        controlnet_conditioning_scale=0.7,
        **common,
        **window,
    )
    ours = destatic.load(base[0])
    kwargs = dict(negative_prompt=negative, sampler=sampler, sigmas=sigmas, noise=z)
    kwargs.update(width=24, height=16, guidance=5.0)
    got = ours.generate(
        "a red apple",
        controlnet=str(control[0]),
        control_image=edges,
        control_scale=0.7,
        control_start=0.2,
        control_end=0.8,
        **kwargs,
    )
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5, rtol=0)
    plain = ours.generate("a red apple", **kwargs)
    assert (plain - got).abs().max() > 1e-3  # the control did something


def test_sd_controlnet_on_sdxl_is_one_line(base):  # noqa: F811
    """A ControlNet made for an SD 1.x U-Net (no micro-conditioning) on an SDXL model."""
    pipe = destatic.load(base[0])
    config = ControlNetConfig.from_diffusers(
        dict(tiny_sd.UNET, cross_attention_dim=64, conditioning_embedding_out_channels=(8, 16))
    )
    edges = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"made for an SD 1\.x/2\.x U-Net") as error:
        pipe.generate("x", controlnet=ControlNet(config), control_image=edges, steps=2)
    assert "\n" not in str(error.value)
