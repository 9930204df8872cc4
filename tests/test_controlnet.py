"""ControlNet: diffusers parity (weights load strictly, same residuals, same steered U-Net)."""

from __future__ import annotations

import pytest
import torch

from destatic.models.controlnet import ControlledUNet, ControlNet, ControlNetConfig
from destatic.models.unet import UNet2DCondition, UNetConfig
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pair():
    """A tiny diffusers UNet and its ControlNet (perturbed: no zero convs left at zero)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**dict(tiny_sd.UNET, sample_size=8)).eval()
    control = diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 16)
    ).eval()
    tiny_sd.perturb(unet)
    tiny_sd.perturb(control)
    return unet, control


def ours(unet, control):
    u = UNet2DCondition(UNetConfig.from_diffusers(dict(unet.config)))
    u.load_state_dict(unet.state_dict(), strict=True)
    c = ControlNet(ControlNetConfig.from_diffusers(dict(control.config)))
    c.load_state_dict(control.state_dict(), strict=True)
    return u.eval(), c.eval()


def test_controlnet_matches_diffusers(pair):
    unet, control = pair
    u, c = ours(unet, control)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, 32, generator=g)
    image = torch.rand(2, 3, 16, 16, generator=g)  # 2× the latent side: one stride-2 level
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        down, mid = control(
            x, t, ctx, controlnet_cond=image, conditioning_scale=0.7, return_dict=False
        )
        r = c(x, t, ctx, image, scale=0.7)
        for a, b in zip(down, r.down, strict=True):
            torch.testing.assert_close(b, a, atol=2e-5, rtol=0)
        torch.testing.assert_close(r.mid, mid, atol=2e-5, rtol=0)
        expected = unet(
            x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        steered = ControlledUNet(u, [(c, image, 0.7, None)])
        torch.testing.assert_close(steered(x, t, ctx), expected, atol=2e-5, rtol=0)


def test_a_fresh_controlnet_changes_nothing(pair):
    unet, _ = pair
    u, _ = ours(unet, diffusers.ControlNetModel.from_unet(unet))
    c = ControlNet.from_unet(u, conditioning_embedding_out_channels=(8, 16))
    for name in ("conv_in", "down_blocks", "mid_block"):  # the encoder is the U-Net's copy
        a, b = getattr(c, name).state_dict(), getattr(u, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 5, 32)
    image = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            ControlledUNet(u, [(c, image, 1.0, None)])(x, 3.0, ctx), u(x, 3.0, ctx)
        )


def test_inactive_window_and_batch_checks(pair):
    unet, control = pair
    u, c = ours(unet, control)
    x, ctx = torch.randn(4, 4, 8, 8), torch.randn(4, 5, 32)
    image = torch.rand(1, 3, 16, 16)  # one image serves the whole batch
    with torch.no_grad():
        off = ControlledUNet(u, [(c, image, 1.0, lambda t: False)])(x, 3.0, ctx)
        torch.testing.assert_close(off, u(x, 3.0, ctx))
        on = ControlledUNet(u, [(c, image, 1.0, lambda t: True)])(x, 3.0, ctx)
        assert (on - off).abs().max() > 1e-3
        with pytest.raises(ValueError, match="does not divide"):
            ControlledUNet(u, [(c, torch.rand(3, 3, 16, 16), 1.0, None)])(x, 3.0, ctx)


def test_controlnet_steers_a_guidance_distilled_student(pair):
    """An LCM student (w-embedding, ``time_cond_proj_dim``) under a ControlNet still receives
    its guidance input; the ControlNet keeps its own time embedding."""
    import dataclasses

    unet, control = pair
    u, c = ours(unet, control)
    student = UNet2DCondition(dataclasses.replace(u.config, time_cond_proj_dim=8)).eval()
    student.load_state_dict(u.state_dict(), strict=False)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.5)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    image = torch.rand(1, 3, 16, 16)
    steered = ControlledUNet(student, [(c, image, 1.0, None)])
    with torch.no_grad():
        residuals = c(x, 3.0, ctx, image.repeat(2, 1, 1, 1), 1.0)
        for w in (1.0, 6.0):
            want = student(x, 3.0, ctx, control=residuals, guidance=w)
            torch.testing.assert_close(steered(x, 3.0, ctx, guidance=w), want)
        assert (
            steered(x, 3.0, ctx, guidance=1.0) - steered(x, 3.0, ctx, guidance=6.0)
        ).abs().max() > 1e-3


def test_config_from_diffusers_rejects_unsupported_options(pair):
    _, control = pair
    cfg = dict(control.config)
    ControlNetConfig.from_diffusers(cfg)
    with pytest.raises(ValueError, match="channel_order"):
        ControlNetConfig.from_diffusers({**cfg, "controlnet_conditioning_channel_order": "bgr"})
    with pytest.raises(ValueError, match="global_pool_conditions"):
        ControlNetConfig.from_diffusers({**cfg, "global_pool_conditions": True})


def test_pipeline_with_controlnet_matches_diffusers(sd_folder):  # noqa: F811
    """StableDiffusionControlNetPipeline, DDIM, guidance 3, control on steps 20%–80%."""
    import destatic
    from tests.test_pipeline import SCHEDULERS, SD, scheduler_sigmas

    folder, reference = sd_folder
    torch.manual_seed(3)
    control = diffusers.ControlNetModel.from_unet(
        reference.unet, conditioning_embedding_out_channels=(8, 16)
    ).eval()
    tiny_sd.perturb(control)
    name, config, _ = SCHEDULERS["ddim"]
    scheduler = getattr(diffusers, name)(**SD, **config)
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **{**reference.components, "scheduler": scheduler}, controlnet=control
    )
    pipe.set_progress_bar_config(disable=True)
    edges = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    steps, start = 10, 0.2
    scheduler.set_timesteps(steps)
    sigmas = scheduler_sigmas(scheduler)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = pipe(
        "a red apple",
        image=edges,
        num_inference_steps=steps,
        guidance_scale=3.0,
        controlnet_conditioning_scale=0.8,
        control_guidance_start=start,
        control_guidance_end=0.8,
        latents=z * float(sigmas[0]) / (1 + float(sigmas[0]) ** 2) ** 0.5,
        height=16,
        width=16,
        output_type="np",
    ).images
    ours = destatic.load(folder)
    net = ControlNet(ControlNetConfig.from_diffusers(dict(control.config)))
    net.load_state_dict(control.state_dict(), strict=True)
    kwargs = dict(sampler="ddim", sigmas=sigmas, guidance=3.0, noise=z, width=16, height=16)
    got = ours.generate(
        "a red apple",
        controlnet=net.eval(),
        control_image=edges,
        control_scale=0.8,
        control_start=start,
        control_end=0.8,
        **kwargs,
    )
    torch.testing.assert_close(
        got.permute(0, 2, 3, 1), torch.from_numpy(expected), atol=1e-5, rtol=0
    )
    plain = ours.generate("a red apple", **kwargs)
    assert (plain - got).abs().max() > 1e-3  # the control did something
    with pytest.raises(ValueError, match="needs both"):
        ours.generate("x", control_image=edges, **kwargs)
    with pytest.raises(ValueError, match="control image is 8×8"):
        ours.generate("x", controlnet=net, control_image=edges[..., :8, :8], **kwargs)


from tests.test_pipeline import sd_folder  # noqa: E402, F401
