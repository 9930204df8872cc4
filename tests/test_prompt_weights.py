"""A1111's prompt syntax on CLIP: its parser's documented results, 75-token chunks (with its
comma backtrack) against hand-counted tokens, the weighted states against the formula, and
plain prompts unchanged."""

from __future__ import annotations

import pytest
import torch

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
