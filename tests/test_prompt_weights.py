"""A1111's prompt syntax on CLIP: its parser's documented results, 75-token chunks (with its
comma backtrack) against hand-counted tokens, the weighted states against the formula, and
plain prompts unchanged; on SDXL's and SD3's two CLIPs: the weights against A1111's rule per
tower, long prompts against compel's SDXL mode, and the chunks of a guided batch."""

from __future__ import annotations

import pytest
import torch

import destatic
from destatic.models.prompt_weights import chunk_prompt, is_plain, parse_prompt_attention
from destatic.models.text import CLIPTextEncoder
from tests import tiny_sd

# The examples of A1111's parse_prompt_attention docstring (modules/prompt_parser.py).
PARSED = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ["a ", 1.0],
            ["house", 1.5730000000000004],
            [" ", 1.1],
            ["on", 1.0],
            [" a ", 1.1],
            ["hill", 0.55],
            [", sun, ", 1.1],
            ["sky", 1.4641000000000006],
            [".", 1.1],
        ],
    ),
    ("a (very beautiful:1.3) girl", [["a ", 1.0], ["very beautiful", 1.3], [" girl", 1.0]]),
    ("[dim]", [["dim", 1 / 1.1]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("", [["", 1.0]]),
]


@pytest.mark.parametrize(("text", "expected"), PARSED)
def test_parse_matches_a1111(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_plain_prompts():
    assert is_plain("a red cat, 4k") and is_plain("ratio 16:9")
    assert not is_plain("a (red) cat") and not is_plain("a \\(red") and not is_plain("a BREAK b")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    _, _, text, tokenizer = tiny_sd.components(tmp_path_factory.mktemp("clip"))
    inner = getattr(text, "text_model", text)
    with torch.no_grad():  # a trained CLIP's states have a clear nonzero mean; a fresh one's ≈ 0
        inner.final_layer_norm.bias.add_(0.5)
    return CLIPTextEncoder(text.eval(), tokenizer)


def words(n: int, word: str = "ab") -> str:
    """``n`` words of two characters: 2n tokens of the character-level tokenizer."""
    return " ".join([word] * n)


def test_chunks_hand_counted(encoder):
    tok = encoder.tokenizer
    bos, eos, comma = tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids(",</w>")
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b</w>")
    # 40 words = 80 tokens: 75 in the first chunk, 5 in the second, each BOS … EOS + padding
    first, second = chunk_prompt(words(40), tok)
    assert first.ids == [bos, *[a, b] * 37, a, eos]
    assert second.ids[:7] == [bos, b, a, b, a, b, eos] and len(second.ids) == 77
    assert second.mask == [True] * 7 + [False] * 70
    # 70 tokens, a comma, 20 tokens: full at 75, the comma 5 back → break after the comma
    text = words(35) + ", " + words(10, "cd")
    one, two = chunk_prompt(text, tok)
    assert one.ids[70:73] == [b, comma, eos] and one.mask.count(True) == 73
    assert two.mask.count(True) == 22  # BOS + 4 moved + 16 + EOS
    plain_split = chunk_prompt(text, tok, comma_backtrack=0)
    assert [c.mask.count(True) for c in plain_split] == [77, 18]  # 75 + 16 tokens
    # weights follow their tokens; BREAK starts a new chunk
    w = chunk_prompt("(ab:1.5) cd BREAK ab", tok)
    assert len(w) == 2 and w[0].weights[:6] == [1.0, 1.5, 1.5, 1.0, 1.0, 1.0]


def test_plain_prompts_encode_as_before(encoder):
    plain = CLIPTextEncoder(encoder.model, encoder.tokenizer, prompt_weighting=False)
    prompts = ["a red cat", "dog"]
    new, old = encoder.encode(prompts), plain.encode(prompts)
    assert torch.equal(new.tokens, old.tokens) and torch.equal(new.pooled, old.pooled)
    assert torch.equal(new.mask, old.mask)


def test_weights_scale_states_and_keep_the_mean(encoder):
    got = encoder.encode(["a (red:1.5) cat"])
    base = encoder.encode(["a red cat"])  # same tokens: the fragments tokenize alike
    weights = torch.ones(77)
    weights[2:5] = 1.5  # BOS, "a</w>", then r, e, d</w>
    z = base.tokens[0]
    expected = z * weights[:, None] * (z.mean() / (z * weights[:, None]).mean())
    torch.testing.assert_close(got.tokens[0], expected)
    torch.testing.assert_close(got.pooled, base.pooled)
    assert got.tokens.mean().item() == pytest.approx(base.tokens.mean().item(), rel=1e-5)


def test_long_prompts_encode_chunk_by_chunk(encoder):
    long = words(40)
    got = encoder.encode([long, "cd"])
    assert got.tokens.shape[:2] == (2, 154) and got.mask.shape == (2, 154)
    tok = encoder.tokenizer
    for i, chunk in enumerate(chunk_prompt(long, tok)):
        ids = torch.tensor([chunk.ids])
        alone = encoder.model(ids).last_hidden_state[0]
        torch.testing.assert_close(got.tokens[0, 77 * i : 77 * (i + 1)], alone)
    # the short prompt: its own chunk, then the empty prompt's (A1111's batch padding)
    torch.testing.assert_close(got.tokens[1, :77], encoder.encode(["cd"]).tokens[0])
    torch.testing.assert_close(got.tokens[1, 77:], encoder.encode([""]).tokens[0])


def test_long_prompt_with_short_negative_generates(tmp_path):
    """A 2-chunk prompt against a 1-chunk negative prompt: the shorter branch is padded with
    the empty prompt's chunk, so guidance batches them (and the reverse)."""
    pytest.importorskip("diffusers")
    import destatic
    from tests.test_devices import save_tiny_sd

    pipe = destatic.load(save_tiny_sd(tmp_path))
    common = {"steps": 2, "width": 16, "height": 16, "guidance": 5.0}
    one = pipe.generate(words(40), negative_prompt="blurry", **common)
    two = pipe.generate("(cat:1.2)", negative_prompt=words(40), **common)
    assert torch.isfinite(one).all() and torch.isfinite(two).all()


# -- SDXL and SD3: every CLIP tower gets the same parsed, chunked, weighted prompt -------------


def a1111_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis written out for one chunk ``z`` [T, D]: the states times
    their token's weight, then rescaled to the unweighted mean."""
    weighted = z * weights[:, None]
    return weighted * (z.mean() / weighted.mean())


def red_weights(value: float) -> torch.Tensor:
    """Per-token weights of ``"a (red:value) cat"``: BOS, "a</w>", then r, e, d</w>."""
    weights = torch.ones(77)
    weights[2:5] = value
    return weights


def test_sdxl_weighted_prompt_follows_a1111_per_tower(sdxl):
    """Each tower's penultimate states (diffusers' encoding of the plain words) weighted and
    mean-restored on its own, then side by side; pooled: CLIP-G's, unweighted."""
    folder, reference = sdxl
    encoder = destatic.load(folder).text_encoder
    plain, _, pooled, _ = reference.encode_prompt("a red cat", do_classifier_free_guidance=False)
    got = encoder.encode(["a (red:1.5) cat", "a red cat"])
    w = red_weights(1.5)
    towers = [plain[0, :, :32], plain[0, :, 32:]]  # CLIP-L's, CLIP-G's
    expected = torch.cat([a1111_emphasis(z, w) for z in towers], dim=-1)
    torch.testing.assert_close(got.tokens[0], expected)
    assert torch.equal(got.tokens[1], plain[0])  # a plain prompt: diffusers' bits
    torch.testing.assert_close(got.pooled, pooled.repeat(2, 1))
    assert (got.tokens[0] - plain[0]).abs().max() > 1e-2  # the weight did something


def test_sdxl_break_encodes_chunk_by_chunk(sdxl):
    """``BREAK``: each chunk is diffusers' encoding of its words; pooled is the first chunk's."""
    folder, reference = sdxl
    encoder = destatic.load(folder).text_encoder
    got = encoder.encode(["a red cat BREAK dog"])
    assert got.tokens.shape == (1, 154, 64) and got.mask.shape == (1, 154)
    for i, words in enumerate(["a red cat", "dog"]):
        plain, _, pooled, _ = reference.encode_prompt(words, do_classifier_free_guidance=False)
        torch.testing.assert_close(got.tokens[:, 77 * i : 77 * (i + 1)], plain)
        if i == 0:
            torch.testing.assert_close(got.pooled, pooled)


def test_sdxl_long_prompt_matches_compel(sdxl):
    """90 tokens in two chunks, cut on a word boundary (compel moves a word that straddles the
    cut to the next chunk; A1111 cuts at 75 tokens): compel's SDXL mode gives the same states
    and, for a plain prompt, the same pooled vector."""
    compel = pytest.importorskip("compel")
    folder, reference = sdxl
    prompt = words(30, "abc")  # 90 tokens: 25 words fill the first chunk exactly
    maker = compel.Compel(
        tokenizer=[reference.tokenizer, reference.tokenizer_2],
        text_encoder=[reference.text_encoder, reference.text_encoder_2],
        returned_embeddings_type=compel.ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        requires_pooled=[False, True],
        truncate_long_prompts=False,
    )
    with torch.no_grad():
        expected, pooled = maker(prompt)
    got = destatic.load(folder).text_encoder.encode([prompt])
    assert got.tokens.shape == expected.shape == (1, 154, 64)
    torch.testing.assert_close(got.tokens, expected)
    torch.testing.assert_close(got.pooled, pooled)


def test_sdxl_long_prompt_generates_with_zero_negative(sdxl):
    """A 2-chunk prompt without a negative: the all-zero negative (force_zeros_for_empty_prompt)
    is padded with zeros, and the guided batch draws a finite image."""
    from destatic.pipelines import GenerationRequest
    from destatic.pipelines.prompt_chunks import same_token_count
    from destatic.pipelines.stages import encode_conditioning

    pipe = destatic.load(sdxl[0])
    request = GenerationRequest(prompt=words(40), guidance=5.0, width=16, height=16)
    c = encode_conditioning(pipe, request.resolved(pipe))
    padded = same_token_count(pipe, c, 16, 16)
    assert padded.uncond["context"].shape == (1, 154, 64) and not padded.uncond["context"].any()
    image = pipe.generate("(red:1.3) " + words(40), steps=2, width=16, height=16, guidance=5.0)
    assert torch.isfinite(image).all()


def test_sd3_weighted_prompt_follows_a1111_per_tower(sd3):
    folder, reference = sd3
    encoder = destatic.load(folder).text_encoder
    plain, _, pooled, _ = reference.encode_prompt(
        "a red cat", None, None, do_classifier_free_guidance=False
    )
    got = encoder.encode(["a (red:0.7) cat"])
    w = red_weights(0.7)
    clip = plain[0, :77]  # [CLIP-L 32 | CLIP-G 32 | zero padding to T5's width]
    expected = torch.cat(
        [a1111_emphasis(clip[:, :32], w), a1111_emphasis(clip[:, 32:64], w), clip[:, 64:]], -1
    )
    torch.testing.assert_close(got.tokens[0, :77], expected)
    torch.testing.assert_close(got.tokens[0, 77:], plain[0, 77:], rtol=0, atol=0)  # T5's zeros
    torch.testing.assert_close(got.pooled, pooled)  # both CLIPs', unweighted


def test_sd3_long_prompt_chunks_before_t5(sd3):
    """A 2-chunk prompt: CLIP chunks (154 tokens), then T5's 256; a 1-chunk negative prompt
    gets the empty prompt's CLIP chunk between its own and T5's; T5 reads the words alone."""
    from destatic.models.text import SD3TextEncoder
    from destatic.pipelines.prompt_chunks import same_token_count
    from destatic.pipelines.stages import Conditioning

    pipe = destatic.load(sd3[0])
    encoder = pipe.text_encoder
    got = encoder.encode([words(40)])
    assert got.tokens.shape == (1, 154 + 256, 64) and encoder.trailing_tokens == 256
    c = Conditioning(pipe.conditioning([words(40)]), pipe.conditioning(["blurry"]), 4.0)
    padded = same_token_count(pipe, c, 16, 16).uncond["context"]
    short, empty = c.uncond["context"], pipe.conditioning([""])["context"]
    torch.testing.assert_close(padded, torch.cat([short[:, :77], empty[:, :77], short[:, 77:]], 1))
    image = pipe.generate(words(40), negative_prompt="blurry", steps=2, width=16, height=16)
    assert torch.isfinite(image).all()
    t5, t5_tokenizer = tiny_sd.t5_encoder_and_tokenizer(d_model=64)
    with_t5 = SD3TextEncoder(encoder.clip_l, encoder.clip_g, t5.eval(), t5_tokenizer)
    weighted, plain = (
        with_t5.encode(["a (red:1.5) cat BREAK dog"]),
        with_t5.encode(["a red cat dog"]),
    )
    assert torch.equal(weighted.tokens[:, -256:], plain.tokens[:, -256:])


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tests.test_pipeline_sdxl import _build

    return _build(tmp_path_factory.mktemp("sdxl_weights"), refiner=False)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    pytest.importorskip("diffusers")
    tmp = tmp_path_factory.mktemp("sd3_weights")
    reference = tiny_sd.sd3_pipeline(tmp)
    reference.save_pretrained(tmp / "pipeline", safe_serialization=True)
    return tmp / "pipeline", reference
