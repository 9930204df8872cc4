"""AudioLDM (issue 17): diffusers' AudioLDMPipeline folders load and draw the same waveform as
diffusers from the same noise, on tiny random weights; its U-Net (class-embedded, no context)
matches diffusers' UNet2DConditionModel."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import destatic
from destatic.models import UNet2DCondition, UNetConfig, fuse_projections
from tests import tiny_sd

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
# diffusers 0.42.1's schedulers call np.array on tensors in a way numpy 2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

# AudioLDM's U-Net in small: a plain first block, per-block key/value widths equal to the
# blocks' channels, CLAP's vector (8 wide here) concatenated to the time embedding.
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=(16, 32),
    attention_head_dim=4,
    norm_num_groups=8,
    class_embed_type="simple_projection",
    projection_class_embeddings_input_dim=8,
    class_embeddings_concat=True,
)
VAE = dict(
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
# 8 mel bins, 4 samples per mel frame at 16 kHz: 0.25 ms per frame, 0.5 ms per latent frame
VOCODER = dict(
    model_in_dim=8,
    sampling_rate=16000,
    upsample_initial_channel=16,
    upsample_rates=[2, 2],
    upsample_kernel_sizes=[4, 4],
    resblock_kernel_sizes=[3, 7],
    resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
    normalize_before=False,
)
# DDIM on leading timesteps, ending at x̂0 (set_alpha_to_one): destatic's ddim on the same grid
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=True,
    timestep_spacing="leading",
    steps_offset=1,
)
STEPS = 4


def roberta_tokenizer(folder):
    """A byte-level RoBERTa BPE tokenizer with no merges (one token per byte), written to
    ``folder``."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = specials + sorted(set(bytes_to_unicode().values())) + ["<mask>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.RobertaTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )


def audible(vocoder: torch.nn.Module) -> None:
    """Weights of unit gain (std 1/√fan-in) and small biases: transformers' init (std 0.01)
    makes a waveform of ~1e-6 whose biases, once perturbed, swamp it with a constant."""
    with torch.no_grad():
        for p in vocoder.parameters():
            if p.ndim > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.normal_(0, 0.01)


@pytest.fixture(scope="module")
def audioldm(tmp_path_factory):
    """A tiny AudioLDMPipeline with random weights, saved by diffusers, and the pipeline."""
    return build_audioldm(tmp_path_factory.mktemp("audioldm"))


def build_audioldm(tmp: Path):
    """:func:`audioldm` under ``tmp`` (also what benchmarks/audio.py times)."""
    torch.manual_seed(0)
    tokenizer = roberta_tokenizer(tmp / "tokenizer_src")
    text = transformers.ClapTextModelWithProjection(
        transformers.ClapTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=8,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    vocoder = transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(**VOCODER))
    unet = diffusers.UNet2DConditionModel(**UNET)
    vae = diffusers.AutoencoderKL(**VAE)
    for module in (unet, vae):
        tiny_sd.perturb(module)  # no identity branch
    audible(vocoder)
    reference = diffusers.AudioLDMPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=diffusers.DDIMScheduler(**SCHEDULER),
        vocoder=vocoder.eval(),
    )
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(tmp / "pipeline", safe_serialization=True)
    return tmp / "pipeline", reference


def relative_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())


def test_unet_matches_diffusers() -> None:
    """Same keys; same output for a class vector and no context; the vector reaches it."""
    torch.manual_seed(0)
    ref = tiny_sd.perturb(diffusers.UNet2DConditionModel(**UNET)).eval()
    ours = UNet2DCondition(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(2, 4, 12, 4, generator=g), torch.randn(2, 8, generator=g)
    t = torch.tensor([999.0, 17.25])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=None, class_labels=labels).sample
        got = ours(x, t, None, class_labels=labels)
        other = ours(x, t, None, class_labels=labels.flip(0))
    assert got.shape == want.shape == x.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (other - got).abs().max() > 1e-3 * got.abs().max()
    with pytest.raises(ValueError, match="class_labels"):
        ours(x, t, None)
    with torch.no_grad():  # fused projections: the context-free second attention still works
        fused = fuse_projections(ours)(x, t, None, class_labels=labels)
    assert (fused - want).abs().max() <= 1e-5 * want.abs().max()


def test_unet_class_options_are_checked() -> None:
    """The config round-trips through JSON; other class embeddings, a missing input width, a
    cross_attention_dim per block of the wrong length and a ControlNet for it are one line."""
    from destatic.models.controlnet import ControlNetConfig

    config = UNetConfig.from_diffusers(UNET)
    assert UNetConfig.from_json(config.to_json()) == config
    assert config.per_block("cross_attention_dim") == (16, 32)
    with pytest.raises(ValueError, match="class embedding"):
        ControlNetConfig.from_unet(config)
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers(dict(UNET, class_embed_type="projection"))
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        UNetConfig.from_diffusers(dict(UNET, projection_class_embeddings_input_dim=None))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        UNetConfig.from_diffusers(dict(UNET, cross_attention_dim=(16, 32, 64)))


def _ddim_sigmas(scheduler) -> torch.Tensor:
    """σ = √((1-ᾱ)/ᾱ) at the scheduler's timesteps, then 0 (tests/test_pipeline.py)."""
    scheduler.set_timesteps(STEPS)
    alpha = scheduler.alphas_cumprod[scheduler.timesteps].to(torch.float64)
    return torch.cat([((1 - alpha) / alpha).sqrt(), torch.zeros(1, dtype=torch.float64)])


# A negative prompt of at most projection_dim - 2 = 6 byte tokens: diffusers truncates the
# negative prompt to projection_dim tokens (module docstring of families/audioldm.py).
@pytest.mark.parametrize("negative", [None, "hiss"])
def test_same_waveform_as_diffusers(audioldm, negative) -> None:
    """The loaded folder draws diffusers' waveform from the same noise, with guidance (the
    negative branch: CLAP's encoding of "" or of the negative prompt), for a duration that is
    not a whole number of latent frames (so both round up, then cut); another prompt draws
    another waveform, so the comparison can fail."""
    folder, reference = audioldm
    pipe = destatic.load(folder)
    assert pipe.family.name == "audioldm" and pipe.sample_rate == 16000
    sigmas = _ddim_sigmas(reference.scheduler)
    start = float(sigmas[0])
    seconds = 0.0109  # 43.6 mel frames → 43 → 44 (22 latent frames); cut to 174 samples
    z = torch.randn(1, 4, 22, 4, generator=torch.Generator().manual_seed(0))
    want = reference(
        "a dog barking",
        audio_length_in_s=seconds,
        num_inference_steps=STEPS,
        guidance_scale=2.5,
        negative_prompt=negative,
        latents=z * start / math.sqrt(1 + start**2),  # DDIM's state is x/√(1+σ²)
        output_type="pt",
    ).audios
    got = pipe.generate(
        "a dog barking",
        seconds=seconds,
        sampler="ddim",
        sigmas=sigmas,
        guidance=2.5,
        negative_prompt=negative,
        noise=z,
    )
    assert want.shape == (1, int(seconds * 16000)) and got.shape == (1, 1, want.shape[1])
    assert relative_rms(got[:, 0], want) <= 1e-5
    other = pipe.generate("a cat", seconds=seconds, sampler="ddim", sigmas=sigmas, noise=z)
    assert relative_rms(other[:, 0], want) > 1e-3


def test_defaults_and_default_duration(audioldm) -> None:
    """AudioLDMPipeline's defaults (10 steps, guidance 2.5, DDIM); no duration: the U-Net's
    sample_size latent frames (8 · 2 · 4 samples); a list of (1, samples) arrays."""
    folder, _ = audioldm
    pipe = destatic.load(folder)
    assert pipe.sampling_defaults == {
        "steps": 10,
        "sampler": "ddim",
        "grid": "leading",
        "guidance": 2.5,
    }
    (waveform,) = pipe("a dog barking", steps=2, seed=3)
    assert waveform.shape == (1, 64) and abs(waveform).max() <= 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seconds": 0.0001}, r"seconds=0.0001: this AudioLDM model makes 0.0005 … "),
        ({"seconds": 1e3}, "seconds=1000"),
        ({"seconds": 0.01, "seconds_start": 1.0}, "seconds_start=1: AudioLDM always starts"),
    ],
)
def test_duration_it_cannot_make_is_one_line(audioldm, fields, message) -> None:
    folder, _ = audioldm
    pipe = destatic.load(folder)
    with pytest.raises(ValueError, match=message) as error:
        pipe.generate("a dog barking", steps=1, **fields)
    assert "\n" not in str(error.value)
