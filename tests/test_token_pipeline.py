"""Token models through the pipeline: the decoder a request resolves to, seeds per image, the
decoding fields recorded and checked, save → load, a hybrid's diffusion refiner, and the HTTP
API and web UI of a served token model."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

import destatic
from destatic.io import CheckpointError
from destatic.pipelines import GenerationRequest, RequestError, TokenPipeline, load, save
from destatic.pipelines.families import TOKENS
from tests.token_fixtures import SIDE, tiny_token_folder, tiny_token_pipeline


@pytest.fixture(scope="module")
def pipe() -> TokenPipeline:
    return tiny_token_pipeline()


@pytest.fixture(scope="module")
def maskgit_pipe() -> TokenPipeline:
    return tiny_token_pipeline(causal=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_token_folder(tmp_path_factory.mktemp("tokens") / "model")


def test_call_returns_pil_images_of_the_models_size(pipe):
    images = pipe("red heart", num_images=2, seed=5)
    assert [im.size for im in images] == [(SIDE, SIDE)] * 2
    assert images[0].tobytes() != images[1].tobytes()  # seeds 5 and 6


def test_each_image_comes_from_its_own_seed(pipe, maskgit_pipe):
    for model in (pipe, maskgit_pipe):
        batch = model.generate(["red heart", "blue car"], seed=[3, 4], guidance=2.0)
        alone = model.generate("blue car", seed=4, guidance=2.0)
        torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)


def test_requests_resolve_to_the_decoder_and_record_decoding(pipe, maskgit_pipe):
    r = GenerationRequest("x").resolved(pipe)
    assert (r.sampler, r.steps, r.grid, r.guidance) == ("autoregressive", 64, None, 3.0)
    assert (r.temperature, r.top_k, r.top_p, r.beams) == (1.0, 0, 1.0, 1)
    assert GenerationRequest("x", beams=3).resolved(pipe).sampler == "beam"
    assert GenerationRequest("x", sampler="beam").resolved(pipe).beams == 4
    m = GenerationRequest("x", steps=4).resolved(maskgit_pipe)
    assert (m.sampler, m.steps) == ("maskgit", 4)
    stored = GenerationRequest("x", temperature=0.5, top_k=7, top_p=0.9, beams=2)
    again = GenerationRequest.from_json(stored.to_json())
    assert (again.temperature, again.top_k, again.top_p, again.beams) == (0.5, 7, 0.9, 2)
    assert "Temperature: 0.5, Top-k: 7, Top-p: 0.9, Beams: 2" in stored.a1111()
    with pytest.raises(RequestError, match="top_k must be an integer"):
        GenerationRequest.from_dict({"prompt": "x", "top_k": "5"})


def test_greedy_sampling_is_one_beam(pipe):
    """temperature 0 (argmax every code) and beam search with one beam are both greedy: the
    two decoders the request picks must agree exactly."""
    greedy = pipe.generate("red heart", temperature=0)
    one_beam = pipe.generate("red heart", sampler="beam", beams=1)
    torch.testing.assert_close(greedy, one_beam, atol=0, rtol=0)
    wide = pipe.generate("red heart", beams=4)
    assert wide.shape == greedy.shape


def test_decoding_and_guidance_change_the_image(pipe):
    base = pipe.generate("red heart", seed=1)
    for change in ({"temperature": 0.3}, {"top_k": 2}, {"top_p": 0.2}, {"guidance": 1.0}):
        assert not torch.equal(pipe.generate("red heart", seed=1, **change), base), change
    negative = pipe.generate("red heart", seed=1, negative_prompt="blue")
    assert not torch.equal(negative, base)  # the unconditional stream reads the negative


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_p": 0.0}, "top_p = 0.0: must be in (0, 1]"),
        ({"top_p": 2.0}, "top_p = 2.0: must be in (0, 1]"),
        ({"beams": 0}, "beams = 0: must be an integer ≥ 1"),
        ({"temperature": -1.0}, "temperature = -1.0: must be ≥ 0"),
        ({"top_k": 999}, "top_k = 999 is more than the model's 32 codes"),
        ({"width": 32}, "draws 16×16 images only"),
        ({"image": torch.zeros(1, 3, 16, 16)}, "image is for diffusion models; token models take"),
        ({"hires_scale": 2.0}, "hires_scale is for diffusion models"),
        ({"grid": "karras"}, "grid is for diffusion models"),
        ({"steps": 3}, "steps = 3: an autoregressive model draws its 64 codes one by one"),
        ({"sampler": "maskgit"}, "sampler 'maskgit': this is a causal token model"),
        ({"sampler": "euler"}, "sampler 'euler': this is a causal token model"),
    ],
)
def test_bad_requests_are_one_line(pipe, fields, message):
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        pipe.generate("x", **fields)
    assert "\n" not in str(caught.value)


def test_maskgit_refuses_beams(maskgit_pipe):
    with pytest.raises(ValueError, match="this is a bidirectional"):
        maskgit_pipe.generate("x", beams=2)


def test_diffusion_models_refuse_decoding_fields():
    with pytest.raises(RequestError, match="temperature is for token models"):
        GenerationRequest("x", temperature=0.5).resolved(destatic.load())


def test_save_load_round_trip_draws_the_same_images(pipe, folder, tmp_path):
    loaded = load(folder)
    assert isinstance(loaded, TokenPipeline) and loaded.family is TOKENS
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DestaticTokenPipeline"
    assert index["destatic_text_max_length"] == 8
    for fields in ({"seed": 2}, {"beams": 2}, {"temperature": 0.5, "top_k": 4}):
        torch.testing.assert_close(loaded.generate("cat", **fields), pipe.generate("cat", **fields))
    maskgit = tiny_token_pipeline(causal=False, defaults={"steps": 3, "temperature": 0.8})
    save(maskgit, tmp_path / "maskgit")
    again = load(tmp_path / "maskgit")
    assert again.sampling_defaults["steps"] == 3 and again.decoding_defaults["temperature"] == 0.8
    torch.testing.assert_close(again.generate("cat"), maskgit.generate("cat"))


def test_bad_folders_and_sources_are_one_line(folder, tmp_path):
    with pytest.raises(ValueError, match="--vae swaps a part of a diffusion model"):
        load(folder, vae=folder)
    for defaults, message in (
        ({"sampler": "euler"}, "destatic_defaults.sampler must be one of"),
        ({"top_p": 0}, "destatic_defaults: top_p = 0: must be in"),
        ({"sampler": "maskgit"}, "destatic_defaults.sampler must be one of"),
        ({"colour": 1}, "unknown key"),
    ):
        bad = tmp_path / "bad"
        if not bad.exists():
            bad = tiny_token_folder(bad)
        index = json.loads((folder / "model_index.json").read_text())
        (bad / "model_index.json").write_text(json.dumps({**index, "destatic_defaults": defaults}))
        with pytest.raises(CheckpointError, match=re.escape(message)):
            load(bad)


def test_a_hybrid_refines_the_decoded_images_with_diffusion(pipe, folder, tmp_path):
    refine = {"model": "emoji", "strength": 0.5, "steps": 2, "sampler": "euler", "guidance": 2.0}
    hybrid_folder = tmp_path / "hybrid"
    save(dataclasses.replace(pipe, refine=refine, refiner=destatic.load()), hybrid_folder)
    hybrid = load(hybrid_folder)
    assert hybrid.refine == refine and hybrid.refiner.media == "image"
    drawn = hybrid.generate("red heart", seed=3, num_images=2)
    plain = pipe.generate("red heart", seed=3, num_images=2)
    assert drawn.shape == plain.shape and not torch.equal(drawn, plain)
    r = GenerationRequest("red heart", seed=3, num_images=2).resolved(hybrid)
    expected = hybrid.refiner.run(hybrid.refine_request(r, plain))
    torch.testing.assert_close(drawn, expected)


def test_callback_sees_every_step_of_the_decoder(pipe, maskgit_pipe):
    seen: list[tuple[int, int]] = []

    def callback(i, codes):
        seen.append((i, int((codes == pipe.transformer.mask_id).sum())))

    pipe.generate("x", callback=callback)
    assert [i for i, _ in seen] == list(range(64)) and seen[-1][1] == 0
    seen.clear()
    maskgit_pipe.generate("x", steps=3, callback=callback)
    assert [i for i, _ in seen] == [0, 1, 2] and seen[-1][1] == 0
