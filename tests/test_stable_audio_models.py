"""Stable Audio's networks against diffusers on tiny random weights: StableAudioDiT against
StableAudioDiTModel (grouped-query cross-attention, partial RoPE that StableAudioPipeline computes
and we compute inside), StableAudioProjection against StableAudioProjectionModel, and
AutoencoderOobleck's encode/decode against diffusers'; each folder written by diffusers loads
with ``load_component`` and saves back to a folder diffusers loads."""

from __future__ import annotations

import pytest
import torch

from destatic.io import CheckpointError
from destatic.models.oobleck import AutoencoderOobleck, OobleckConfig
from destatic.models.registry import load_component, save_component, saved_as
from destatic.models.stable_audio import (
    StableAudioDiT,
    StableAudioDiTConfig,
    StableAudioProjection,
    StableAudioProjectionConfig,
)
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
    # diffusers builds AutoencoderOobleck with the old torch.nn.utils.weight_norm
    pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),
]

TINY_DIT = dict(
    sample_size=16,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    num_key_value_attention_heads=2,
    out_channels=4,
    cross_attention_dim=16,
    time_proj_dim=16,
    global_states_input_dim=16,
    cross_attention_input_dim=16,
)


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ (relative RMS)."""
    return ((got - expected).norm() / expected.norm()).item()


def _roundtrip(module: torch.nn.Module, folder) -> torch.nn.Module:
    """Save ``module`` as its pipeline folder would and load it back with diffusers."""
    name = saved_as(module)[1]
    save_component(module, folder, class_name=name, config=module.config.to_dict())
    return getattr(diffusers, name).from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    torch.manual_seed(0)
    reference = tiny_sd.perturb(diffusers.StableAudioDiTModel(**TINY_DIT)).eval()
    folder = tmp_path_factory.mktemp("stable_audio") / "transformer"
    reference.save_pretrained(folder)
    return folder, reference


def _dit_inputs(batch: int = 2, frames: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, frames, generator=g)
    context = torch.randn(batch, 5, 16, generator=g)
    global_context = torch.randn(batch, 1, 16, generator=g)
    return x, context, global_context


def _diffusers_dit(reference, x, t, context, global_context) -> torch.Tensor:
    """StableAudioPipeline's call: the rotary table for T + 1 tokens on half of each head."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    rotary = get_1d_rotary_pos_embed(
        reference.config.attention_head_dim // 2,
        x.shape[2] + global_context.shape[1],
        use_real=True,
        repeat_interleave_real=False,
    )
    return reference(
        x, t, encoder_hidden_states=context, global_hidden_states=global_context,
        rotary_embedding=rotary, return_dict=False,
    )[0]  # fmt: skip


@torch.no_grad()
def test_dit_matches_diffusers(dit_folder):
    folder, reference = dit_folder
    ours = load_component(folder)
    assert isinstance(ours, StableAudioDiT)
    assert ours.config.to_dict() == {k: reference.config[k] for k in TINY_DIT}
    x, context, global_context = _dit_inputs()
    for t in (torch.tensor([0.7, 0.05]), torch.tensor([0.3])):
        expected = _diffusers_dit(reference, x, t, context, global_context)
        got = ours(x, t, context, global_context)
        assert got.shape == x.shape
        assert _relative(got, expected) <= 1e-5
    # a scalar timestep is shared by the batch; an odd length runs (no fixed positions)
    assert _relative(ours(x, 0.3, context, global_context), expected) <= 1e-5
    odd = _dit_inputs(1, 11)
    expected = _diffusers_dit(reference, odd[0], torch.tensor([0.5]), *odd[1:])
    assert _relative(ours(odd[0], 0.5, *odd[1:]), expected) <= 1e-5


@torch.no_grad()
def test_dit_reads_every_input(dit_folder):
    ours = load_component(dit_folder[0])
    x, context, global_context = _dit_inputs()
    base = ours(x, 0.5, context, global_context)
    changed = context.clone()
    changed[1, 2:] = 0.0
    assert (ours(x, 0.5, changed, global_context) - base)[1].abs().max() > 1e-3
    assert (ours(x, 0.5, context, global_context * 2) - base).abs().max() > 1e-3
    assert (ours(x, 0.6, context, global_context) - base).abs().max() > 1e-3
    # positions matter: shifting the frames does not shift the output
    rolled = ours(x.roll(3, dims=2), 0.5, context, global_context).roll(-3, dims=2)
    assert (rolled - base).abs().max() > 1e-3


@torch.no_grad()
def test_dit_saves_back_for_diffusers(dit_folder, tmp_path):
    ours = load_component(dit_folder[0])
    again = _roundtrip(ours, tmp_path / "transformer")
    x, context, global_context = _dit_inputs()
    t = torch.tensor([0.4])
    expected = _diffusers_dit(again, x, t, context, global_context)
    assert _relative(ours(x, t, context, global_context), expected) <= 1e-5
    reloaded = load_component(tmp_path / "transformer")
    torch.testing.assert_close(reloaded(x, t, context, global_context), expected)


def test_dit_bad_input_is_one_line(dit_folder):
    ours = load_component(dit_folder[0])
    x, context, global_context = _dit_inputs()
    with pytest.raises(ValueError, match="x has 3 channels"):
        ours(x[:, :3], 0.5, context, global_context)
    with pytest.raises(ValueError, match="context must be"):
        ours(x, 0.5, context[..., :8], global_context)
    with pytest.raises(ValueError, match="timestep has 3 entries"):
        ours(x, torch.ones(3), context, global_context)
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        StableAudioDiTConfig.from_dict({**TINY_DIT, "num_key_value_attention_heads": 3})
    with pytest.raises(ValueError, match="multiple of 4"):
        StableAudioDiTConfig.from_dict({**TINY_DIT, "attention_head_dim": 6})


@pytest.mark.parametrize("text_encoder_dim", [16, 24])  # Identity, Linear
@torch.no_grad()
def test_projection_matches_diffusers(tmp_path, text_encoder_dim):
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel

    torch.manual_seed(2)
    config = dict(text_encoder_dim=text_encoder_dim, conditioning_dim=16, min_value=0, max_value=8)
    reference = tiny_sd.perturb(StableAudioProjectionModel(**config)).eval()
    reference.save_pretrained(tmp_path / "projection_model")
    ours = load_component(tmp_path / "projection_model")
    assert isinstance(ours, StableAudioProjection)
    assert ours.config.to_dict() == config
    text = torch.randn(2, 5, text_encoder_dim)
    start, end = torch.tensor([0.0, 1.5]), torch.tensor([3.25, 20.0])  # 20 s: clamped to 8
    expected = reference(text, start, end)
    got = ours(text, start, end)
    for name in ("text_hidden_states", "seconds_start_hidden_states", "seconds_end_hidden_states"):
        assert getattr(got, name).shape == getattr(expected, name).shape
        assert _relative(getattr(got, name), getattr(expected, name)) <= 1e-5
    assert ours(None, start, None).text_hidden_states is None
    clamped = ours(None, None, torch.tensor([8.0, 99.0])).seconds_end_hidden_states
    torch.testing.assert_close(clamped[0], clamped[1])
    again = _roundtrip(ours, tmp_path / "saved")
    saved = again(text, start, end)
    assert _relative(saved.seconds_end_hidden_states, got.seconds_end_hidden_states) <= 1e-5
    assert _relative(saved.text_hidden_states, got.text_hidden_states) <= 1e-5


def test_projection_config_errors(tmp_path):
    with pytest.raises(ValueError, match="must exceed min_value"):
        StableAudioProjectionConfig.from_dict(
            dict(text_encoder_dim=8, conditioning_dim=8, min_value=4, max_value=4)
        )
    folder = tmp_path / "projection_model"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"_class_name": "StableAudioProjectionModel", "text_encoder_dim": 8, '
        '"conditioning_dim": 8, "min_value": 0, "max_value": 10, "bogus": 1}'
    )
    with pytest.raises(CheckpointError, match="bogus"):
        load_component(folder)


# two levels (×2, ×4): hop 8; 8 encoder channels = mean and scale of 4 latent channels
TINY_OOBLECK = dict(
    encoder_hidden_size=8,
    downsampling_ratios=[2, 4],
    channel_multiples=[1, 2],
    decoder_channels=6,
    decoder_input_channels=4,
    audio_channels=2,
    sampling_rate=16000,
)


@pytest.fixture(scope="module")
def oobleck_folder(tmp_path_factory):
    torch.manual_seed(3)
    reference = tiny_sd.perturb(diffusers.AutoencoderOobleck(**TINY_OOBLECK), 0.2).eval()
    folder = tmp_path_factory.mktemp("oobleck") / "vae"
    reference.save_pretrained(folder)
    return folder, reference


@torch.no_grad()
def test_oobleck_matches_diffusers(oobleck_folder):
    folder, reference = oobleck_folder
    ours = load_component(folder)
    assert isinstance(ours, AutoencoderOobleck)
    assert ours.config.to_dict() == {k: reference.config[k] for k in TINY_OOBLECK}
    assert ours.hop_length == reference.hop_length == 8
    assert (ours.config.sampling_rate, ours.config.audio_channels) == (16000, 2)
    g = torch.Generator().manual_seed(4)
    audio = torch.rand(2, 2, 96, generator=g) * 2 - 1
    posterior = reference.encode(audio).latent_dist
    got = ours.encode(audio)
    assert got.mean.shape == (2, 4, 12)
    assert _relative(got.mean, posterior.mean) <= 1e-5
    assert _relative(got.std, posterior.std) <= 1e-5
    assert _relative(ours.latents_from_waveforms(audio), posterior.mean) <= 1e-5
    drawn = ours.latents_from_waveforms(audio, torch.Generator().manual_seed(5), sample=True)
    expected = posterior.sample(torch.Generator().manual_seed(5))
    assert _relative(drawn, expected) <= 1e-5
    z = torch.randn(2, 4, 12, generator=g)
    expected = reference.decode(z).sample
    waveforms = ours.waveforms_from_latents(z)
    assert waveforms.shape == (2, 2, 96) and waveforms.dtype == torch.float32
    assert _relative(waveforms, expected) <= 1e-5


@torch.no_grad()
def test_oobleck_saves_back_for_diffusers(oobleck_folder, tmp_path):
    ours = load_component(oobleck_folder[0])
    again = _roundtrip(ours, tmp_path / "vae")
    z = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(6))
    assert _relative(ours.decode(z), again.decode(z).sample) <= 1e-5
    reloaded = load_component(tmp_path / "vae")
    torch.testing.assert_close(reloaded.decode(z), ours.decode(z))


def test_oobleck_trains_through_weight_norm():
    """The gain and the direction are the parameters (as diffusers trains them)."""
    model = AutoencoderOobleck(OobleckConfig.from_dict(TINY_OOBLECK))
    audio = torch.rand(1, 2, 32) * 2 - 1
    posterior = model.encode(audio)
    loss = (model.decode(posterior.sample()) - audio).pow(2).mean() + posterior.kl().mean()
    loss.backward()
    conv = model.decoder.block[0].conv_t1
    assert conv.weight_g.grad.abs().sum() > 0 and conv.weight_v.grad.abs().sum() > 0
    assert posterior.kl().shape == (1,) and (posterior.kl() > 0).all()


def test_oobleck_bad_input_is_one_line(oobleck_folder):
    ours = load_component(oobleck_folder[0])
    with pytest.raises(ValueError, match=r"waveforms must be \(B, 2, samples\)"):
        ours.latents_from_waveforms(torch.zeros(1, 1, 64))
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, T\)"):
        ours.waveforms_from_latents(torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="twice decoder_input_channels"):
        OobleckConfig.from_dict({**TINY_OOBLECK, "encoder_hidden_size": 6})
    with pytest.raises(ValueError, match="one entry per downsampling ratio"):
        OobleckConfig.from_dict({**TINY_OOBLECK, "channel_multiples": [1, 2, 4]})
