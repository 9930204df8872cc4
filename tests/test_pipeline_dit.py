"""DiT folders: the class-conditional transformer (learned variance) against diffusers'
DiTTransformer2DModel, prompts as ImageNet class names or ids, and the same image as diffusers'
DiTPipeline with DDIM and DPM-Solver++ 2M; unknown classes and unsupported configs fail with one
line; ``save`` writes a DiTPipeline folder that destatic and diffusers both load back."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import destatic
from destatic.io import CheckpointError
from destatic.models.dit import DiT, DiTConfig
from destatic.models.registry import saved_as
from destatic.models.text import ClassLabelEncoder
from destatic.pipelines import Pipeline, save
from tests import tiny_sd
from tests.test_pipeline import SCHEDULERS, scheduler_sigmas

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

# DiT's schedule: linear β from 1e-4 to 0.02 (improved DDPM), ε-prediction
LINEAR = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
# a tiny DiT with learned variance (out = 2·in), as DiT-XL/2 has; 1000 classes + the null class
TINY_DIT = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
)
# a few ImageNet classes as the hub's model_index.json keeps them ("crane" names two classes)
ID2LABEL = {
    "0": "tench, Tinca tinca",
    "1": "goldfish, Carassius auratus",
    "134": "crane",
    "207": "golden retriever",
    "517": "crane",
}


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return build_dit(tmp_path_factory.mktemp("dit"))


def build_dit(tmp: Path):
    """A tiny random diffusers DiT pipeline, perturbed, saved as safetensors under ``tmp`` with
    ``id2label`` in model_index.json (where the hub's folders keep it; diffusers does not write
    it): (folder, diffusers pipeline)."""
    torch.manual_seed(0)
    transformer = tiny_sd.perturb(diffusers.DiTTransformer2DModel(**TINY_DIT)).eval()
    vae = tiny_sd.perturb(diffusers.AutoencoderKL(**dict(tiny_sd.VAE, sample_size=16))).eval()
    scheduler = diffusers.DDIMScheduler(**LINEAR, **SCHEDULERS["ddim"][1])
    pipe = diffusers.DiTPipeline(transformer, vae, scheduler, id2label=ID2LABEL)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp / "dit"
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": ID2LABEL}))
    return folder, pipe


def test_loads_as_dit_with_class_names(dit):
    folder, reference = dit
    pipe = destatic.load(folder)
    assert pipe.family.name == "dit" and pipe.sampling_defaults["guidance"] == 4.0
    assert isinstance(pipe.network, DiT) and pipe.network.config.learned_variance
    assert pipe.default_size == 16
    encoder = pipe.text_encoder
    assert isinstance(encoder, ClassLabelEncoder)
    names = ["golden retriever", "Golden Retriever", " 207 ", "goldfish", "Tinca tinca", "crane"]
    ids = encoder.encode(names).tokens[:, 0].tolist()
    assert ids == [207, 207, 207, 1, 0, 517]
    assert reference.get_label_ids(["golden retriever", "crane"]) == [207, 517]  # same rule
    assert encoder.encode([""]).tokens.item() == 1000  # the null class: unconditional
    cond = pipe.conditioning(["goldfish"])
    assert cond["class_labels"].dtype == torch.long and cond["class_labels"].tolist() == [1]
    built = Pipeline(pipe.network, pipe.autoencoder, encoder, pipe.process, pipe.target)
    assert built.family.name == "dit"  # put together in code: told by its encoder


@torch.no_grad()
def test_transformer_matches_diffusers(dit):
    reference = dit[1].transformer
    ours = DiT(DiTConfig.from_diffusers(dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([207, 1, 1000])
    t = torch.tensor([999, 500, 3])
    for side in (8, 12):  # the training size, and another (the sin-cos table recomputed)
        x = torch.randn(3, 4, side, side, generator=g)
        expected = reference(x, timestep=t, class_labels=labels).sample
        got = ours(x, t.float(), labels, variance=True)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x, t.float(), labels), expected[:, :4], rtol=0, atol=1e-5)
    other = ours(x, t.float(), labels.flip(0))
    assert (other - got[:, :4]).abs().max() > 1e-3  # the class matters
    wide = ours(torch.randn(1, 4, 8, 12, generator=g), t[:1], labels[:1])  # not square
    assert wide.shape == (1, 4, 8, 12)


def same_latents(scheduler, steps: int, seed: int, shape: tuple[int, ...]):
    """A VP-state diffusers scheduler's σ grid for ``steps``, the start latents z its pipeline
    is given (or draws from ``seed``) and destatic's unit noise for them: z is the VP state, so
    destatic's x = σ₀·noise is √(1+σ₀²)·z."""
    scheduler.set_timesteps(steps)
    sigmas = scheduler_sigmas(scheduler)
    start = float(sigmas[0])
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return sigmas, z, z * math.sqrt(1 + start**2) / start


# destatic sampler ↔ diffusers scheduler; both VP-state schedulers (init_noise_sigma 1)
PAIRS = [("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler")]


@pytest.mark.parametrize(("sampler", "name"), PAIRS)
def test_same_image_as_diffusers_dit_pipeline(dit, sampler, name):
    """Class "golden retriever", guidance 4 (the family default, DiTPipeline's), 8 steps, from
    the noise DiTPipeline draws: its VP-state latents z are x/√(1+σ₀²) with destatic's
    x = σ₀·noise."""
    folder, reference = dit
    scheduler = getattr(diffusers, name)(**LINEAR, **SCHEDULERS[sampler][1])
    pipe = diffusers.DiTPipeline(reference.transformer, reference.vae, scheduler, ID2LABEL)
    pipe.set_progress_bar_config(disable=True)
    steps = 8
    expected = pipe(
        pipe.get_label_ids(["golden retriever"]),
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images
    sigmas, _, noise = same_latents(scheduler, steps, seed=3, shape=(1, 4, 8, 8))
    ours = destatic.load(folder)
    got = ours.generate("golden retriever", sampler=sampler, sigmas=sigmas, noise=noise)
    got = got.permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    plain = ours.generate(
        "golden retriever", sampler=sampler, sigmas=sigmas, noise=noise, guidance=1
    )
    assert np.abs(plain.permute(0, 2, 3, 1).numpy() - expected).max() > 1e-3  # guidance matters


def test_unknown_class_is_one_line(dit):
    pipe = destatic.load(dit[0])
    kwargs = {"steps": 1, "seed": 0}
    with pytest.raises(ValueError, match="closest: golden retriever") as error:
        pipe.generate("golden retreiver", **kwargs)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"beyond this model's classes 0 … 999"):
        pipe.generate("1000", **kwargs)


def test_hub_names_and_unsupported_configs(dit, tmp_path):
    """facebook/DiT-XL-2-* call the transformer ``Transformer2DModel``; it loads the same. A
    ``Transformer2DModel`` of another kind (``norm_type="ada_norm"``) is refused in one line."""
    folder = tmp_path / "hub"
    shutil.copytree(dit[0], folder)
    config = folder / "transformer" / "config.json"
    cfg = json.loads(config.read_text())
    hub = {**cfg, "_class_name": "Transformer2DModel", "cross_attention_dim": None}
    config.write_text(json.dumps(hub))
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "Transformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = destatic.load(folder)
    assert pipe.family.name == "dit" and isinstance(pipe.network, DiT)
    config.write_text(json.dumps({**hub, "norm_type": "ada_norm"}))
    with pytest.raises(CheckpointError, match="DiT option norm_type='ada_norm'") as error:
        destatic.load(folder)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="out_channels=6"):
        DiTConfig.from_diffusers({**cfg, "out_channels": 6})


def _diffusers_image(pipe, steps: int, seed: int) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    labels = pipe.get_label_ids(["golden retriever"])
    return pipe(labels, num_inference_steps=steps, generator=generator, output_type="np").images


def test_save_loads_back_in_destatic_and_diffusers(dit, tmp_path):
    """``save(load(folder))`` is a DiTPipeline folder with ``id2label``: destatic draws the same
    image from it, and diffusers' DiTPipeline loads it (the same class names) and, with the
    scheduler saved (DPM-Solver++ on the same β schedule), draws destatic's ``dpmpp_2m``
    image."""
    folder, reference = dit
    pipe = destatic.load(folder)
    save(pipe, tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and "text_encoder" not in index
    again = destatic.load(tmp_path / "saved")
    assert again.family.name == "dit" and again.text_encoder.labels == pipe.text_encoder.labels
    kwargs = {"steps": 3, "seed": 1}
    assert torch.equal(again.generate("goldfish", **kwargs), pipe.generate("goldfish", **kwargs))
    loaded = diffusers.DiTPipeline.from_pretrained(tmp_path / "saved")
    assert loaded.labels == reference.labels
    assert torch.equal(loaded.scheduler.alphas_cumprod, reference.scheduler.alphas_cumprod)
    expected = _diffusers_image(loaded, 5, seed=3)
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"
    sigmas, _, noise = same_latents(loaded.scheduler, 5, seed=3, shape=(1, 4, 8, 8))
    got = again.generate("golden retriever", sampler="dpmpp_2m", sigmas=sigmas, noise=noise)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5, rtol=0)


def test_unsavable_network_is_one_line():
    with pytest.raises(ValueError, match="saving a Linear is not supported; savable networks: "):
        saved_as(torch.nn.Linear(2, 2))
