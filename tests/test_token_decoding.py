"""Token decoders (destatic.sampling.tokens): logit filters, guidance, autoregressive sampling
with a KV cache, beam search, MaskGIT; per-row seeds; argument checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from destatic.sampling import generators
from destatic.sampling.tokens import (
    DECODERS,
    autoregressive,
    beam_search,
    filter_logits,
    guide,
    maskgit,
)
from tests.test_token_transformer import tiny_inputs, tiny_model


class Counting:
    """Wraps a model and records the batch size of each call (duck-typed like the model)."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.num_tokens, self.mask_id = model.num_tokens, model.mask_id

    def forward(self, codes, context):
        self.calls.append(("forward", context.shape[0]))
        return self.model(codes, context)

    def start(self, context):
        self.calls.append(("start", context.shape[0]))
        return self.model.start(context)

    def extend(self, codes, cache):
        self.calls.append(("extend", codes.shape[0]))
        return self.model.extend(codes, cache)


def log_likelihood(model, codes, context) -> torch.Tensor:
    """Σ_i log p(c_i | context, c_<i) per row, from the full forward."""
    logp = model(codes, context).log_softmax(-1)
    return logp.gather(-1, codes[..., None])[..., 0].sum(-1)


def test_filter_logits_top_k_and_top_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda out: (out > -math.inf)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_k=0)) == [True] * 4
    assert kept(filter_logits(logits, top_k=9)) == [True] * 4
    # nucleus: 0.5 < 0.8 → keep 0.3; 0.8 ≥ 0.8 → drop the rest
    assert kept(filter_logits(logits, top_p=0.8)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.81)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.01)) == [False, True, False, False]
    # top-k first, then top-p on the renormalised rest: 0.5/0.8 = 0.625 < 0.7 keeps 0.3 too
    assert kept(filter_logits(logits, top_k=2, top_p=0.7)) == [False, True, False, True]
    out = filter_logits(logits, top_k=3, top_p=0.9)
    torch.testing.assert_close(out[0, 1:], logits[0, 1:])  # kept logits unchanged
    batch = torch.randn(2, 5, 7)
    assert (filter_logits(batch, top_k=3) > -math.inf).sum(-1).eq(3).all()
    for bad in ({"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": 2.5}):
        with pytest.raises(ValueError, match="top_"):
            filter_logits(logits, **bad)


def test_guide():
    cond, uncond = torch.randn(2, 5), torch.randn(2, 5)
    assert guide(cond, uncond, 1.0) is cond
    torch.testing.assert_close(guide(cond, uncond, 3.0), uncond + 3 * (cond - uncond))
    torch.testing.assert_close(guide(cond, uncond, 0.0), uncond)
    assert DECODERS == ("autoregressive", "beam", "maskgit")


@torch.no_grad()
def test_greedy_follows_the_full_forward_and_beam_1_equals_greedy():
    model = tiny_model()
    _, context = tiny_inputs(model)
    uncond = torch.zeros_like(context)
    for guidance in (1.0, 3.0):
        greedy = autoregressive(
            model, context, uncond, guidance=guidance, temperature=0, generators=generators([0] * 3)
        )
        beam = beam_search(model, context, uncond, guidance=guidance, beams=1)
        assert torch.equal(beam, greedy)
    greedy = autoregressive(model, context, None, temperature=0, generators=generators([0] * 3))
    assert torch.equal(model(greedy, context).argmax(-1), greedy)


@torch.no_grad()
def test_guidance_1_runs_the_conditional_model_alone():
    model = tiny_model()
    _, context = tiny_inputs(model)
    uncond = torch.randn_like(context)
    spy = Counting(model)
    with_uncond = autoregressive(
        spy, context, uncond, guidance=1.0, generators=generators([4, 5, 6])
    )
    assert {rows for _, rows in spy.calls} == {3}  # no unconditional pass
    alone = autoregressive(model, context, None, generators=generators([4, 5, 6]))
    assert torch.equal(with_uncond, alone)
    spy.calls.clear()
    guided = autoregressive(spy, context, uncond, guidance=4.0, generators=generators([4, 5, 6]))
    assert {rows for _, rows in spy.calls} == {6}  # cond and uncond as one batch of 2B
    assert not torch.equal(guided, alone)
    spy.calls.clear()
    masked = maskgit(spy, context, uncond, guidance=1.0, steps=3, generators=generators([1] * 3))
    assert spy.calls == [("forward", 3)] * 3
    model_bi = tiny_model(causal=False)
    a = maskgit(model_bi, context, uncond, guidance=1.0, steps=3, generators=generators([1] * 3))
    b = maskgit(model_bi, context, None, steps=3, generators=generators([1] * 3))
    assert torch.equal(a, b) and masked.shape == a.shape


@torch.no_grad()
def test_beam_search_scores_at_least_greedy():
    """Beam search is not guaranteed to beat greedy, but on this model it must not lose: its
    sequences' log-likelihood (by the full forward) is ≥ greedy's on every row, and higher on
    some."""
    model = tiny_model(seed=3)
    _, context = tiny_inputs(model, b=6, seed=5)
    greedy = autoregressive(model, context, None, temperature=0, generators=generators([0] * 6))
    beam = beam_search(model, context, None, beams=4)
    g, b = log_likelihood(model, greedy, context), log_likelihood(model, beam, context)
    assert (b >= g - 1e-5).all() and (b > g + 1e-3).any()


@torch.no_grad()
def test_sampling_frequencies_follow_the_softmax():
    """Gumbel-max draws from softmax(ℓ/T): empirical frequencies over 4000 seeds."""

    class Fixed:
        num_tokens, mask_id = 1, 3
        logits = torch.tensor([0.5, 0.3, 0.2]).log()

        def start(self, context):
            return self.logits.expand(context.shape[0], -1), None

    ctx = torch.zeros(4000, 1, 1)
    gens = generators(range(4000))
    codes = autoregressive(Fixed(), ctx, None, generators=gens)[:, 0]
    freq = torch.bincount(codes, minlength=3) / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)
    gens = generators(range(4000))
    codes = autoregressive(Fixed(), ctx, None, temperature=0.5, generators=gens)[:, 0]
    p = torch.tensor([0.25, 0.09, 0.04])
    torch.testing.assert_close(torch.bincount(codes) / 4000, p / p.sum(), atol=0.03, rtol=0)
    codes = autoregressive(Fixed(), ctx, None, top_k=1, generators=gens)[:, 0]
    assert (codes == 0).all()


@torch.no_grad()
@pytest.mark.parametrize("decoder", ["autoregressive", "maskgit"])
def test_a_seed_gives_the_same_codes_alone_or_in_a_batch(decoder):
    model = tiny_model(causal=decoder == "autoregressive")
    _, context = tiny_inputs(model)
    uncond = torch.zeros_like(context)
    run = autoregressive if decoder == "autoregressive" else maskgit
    kw = {"guidance": 2.0, "top_k": 8, "top_p": 0.95}
    batch = run(model, context, uncond, generators=generators([7, 8, 9]), **kw)
    again = run(model, context, uncond, generators=generators([7, 8, 9]), **kw)
    alone = run(model, context[1:2], uncond[1:2], generators=generators([8]), **kw)
    assert torch.equal(batch, again) and torch.equal(alone[0], batch[1])
    other = run(model, context, uncond, generators=generators([1, 2, 3]), **kw)
    assert not torch.equal(other, batch)
    assert ((batch >= 0) & (batch < model.config.num_codes)).all()


@torch.no_grad()
def test_maskgit_schedule_keeps_known_codes_and_fills_everything():
    model = tiny_model(causal=False)
    _, context = tiny_inputs(model)
    n, seen = model.num_tokens, []
    codes = maskgit(
        model, context, None, steps=4, generators=generators([0, 1, 2]),
        callback=lambda i, c: seen.append((i, c)),
    )  # fmt: skip
    masked = [int((c == model.mask_id).sum(-1).max()) for _, c in seen]
    # n_t = ⌊cos(π/2 · t/4) · 9⌋ for t = 1, 2, 3, 4
    assert [i for i, _ in seen] == [0, 1, 2, 3] and masked == [8, 6, 3, 0]
    for (_, before), (_, after) in itertools.pairwise(seen):
        known = before != model.mask_id
        assert torch.equal(after[known], before[known])
    assert torch.equal(seen[-1][1], codes)
    assert ((codes >= 0) & (codes < model.config.num_codes)).all()
    for steps in (1, n, 3 * n):  # one pass fills all; ≥ N passes fix one code or more each
        spy = Counting(model)
        out = maskgit(spy, context, None, steps=steps, generators=generators([0, 1, 2]))
        assert ((out >= 0) & (out < model.config.num_codes)).all()
        assert len(spy.calls) == min(steps, n)


@torch.no_grad()
def test_callbacks_see_each_step():
    model = tiny_model()
    _, context = tiny_inputs(model)
    seen = []
    codes = autoregressive(
        model, context, None, generators=generators([0, 1, 2]), callback=lambda i, c: seen.append(c)
    )
    assert len(seen) == model.num_tokens and torch.equal(seen[-1], codes)
    assert (seen[0][:, 1:] == model.mask_id).all() and (seen[0][:, 0] == codes[:, 0]).all()
    seen.clear()
    best = beam_search(model, context, None, beams=3, callback=lambda i, c: seen.append(c))
    assert len(seen) == model.num_tokens and torch.equal(seen[-1], best)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, c, g: autoregressive(m, c, None, temperature=-1, generators=g), "temperature"),
        (lambda m, c, g: autoregressive(m, c, None, top_p=0, generators=g), "top_p"),
        (lambda m, c, g: autoregressive(m, c, None, generators=g[:1]), "1 generators"),
        (lambda m, c, g: autoregressive(m, c, c[:, :2], guidance=2, generators=g), "uncond"),
        (lambda m, c, g: beam_search(m, c, None, beams=0), "beams"),
        (lambda m, c, g: maskgit(m, c, None, steps=0, generators=g), "steps"),
        (lambda m, c, g: maskgit(m, c, None, choice_temperature=-1, generators=g), "choice_"),
        (lambda m, c, g: maskgit(m, c, None, guidance=math.nan, generators=g), "guidance"),
    ],
)
def test_bad_arguments_are_one_line_errors(call, message):
    model = tiny_model()
    _, context = tiny_inputs(model)
    with pytest.raises(ValueError, match=message) as info:
        call(model, context, generators([0, 1, 2]))
    assert "\n" not in str(info.value)
