"""TokenTransformer (destatic.models.token_transformer): KV cache = full forward (also after
select), causality, bidirectional attention, config checks, save/load through the registry."""

from __future__ import annotations

import pytest
import torch

from destatic.models.registry import COMPONENT_CLASSES, load_component, save_component
from destatic.models.token_transformer import (
    TokenTransformer,
    TokenTransformerConfig,
    swiglu_hidden,
)

TINY = {
    "num_codes": 13,
    "grid_size": 3,
    "context_dim": 6,
    "context_length": 4,
    "width": 32,
    "layers": 2,
    "heads": 4,
}


def tiny_model(seed: int = 0, **kw) -> TokenTransformer:
    """A tiny model with every parameter drawn at std 0.3, so the logits are far from uniform
    and every path carries signal."""
    model = TokenTransformer(TokenTransformerConfig(**{**TINY, **kw})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def tiny_inputs(model: TokenTransformer, b: int = 3, seed: int = 1):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.num_codes, (b, cfg.num_tokens), generator=g)
    context = torch.randn(b, cfg.context_length, cfg.context_dim, generator=g)
    return codes, context


@torch.no_grad()
def test_kv_cache_matches_full_forward_also_after_select():
    model = tiny_model()
    codes, context = tiny_inputs(model)
    full = model(codes, context)  # (B, N, V)
    logits, cache = model.start(context)
    torch.testing.assert_close(logits, full[:, 0], atol=1e-5, rtol=0)
    n = model.num_tokens
    for i in range(n // 2):
        logits = model.extend(codes[:, i], cache)
        torch.testing.assert_close(logits, full[:, i + 1], atol=1e-5, rtol=0)
    assert cache.length == model.config.context_length + n // 2
    index = torch.tensor([2, 0, 2, 1])  # reordered and repeated rows
    cache = cache.select(index)
    full = full[index]
    for i in range(n // 2, n - 1):
        logits = model.extend(codes[index, i], cache)
        torch.testing.assert_close(logits, full[:, i + 1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already holds all"):
        model.extend(codes[index, n - 1], cache)


@torch.no_grad()
def test_causal_logits_do_not_read_later_codes():
    model = tiny_model()
    codes, context = tiny_inputs(model)
    base = model(codes, context)
    n = model.num_tokens
    for i in range(n):
        other = codes.clone()
        other[:, i:] = (other[:, i:] + 1) % model.config.num_codes
        out = model(other, context)
        torch.testing.assert_close(out[:, : i + 1], base[:, : i + 1], atol=0, rtol=0)
        if i + 1 < n:  # the next position does read code i
            assert (out[:, i + 1] - base[:, i + 1]).abs().max() > 1e-3


@torch.no_grad()
def test_bidirectional_masked_position_reads_later_codes():
    model = tiny_model(causal=False)
    codes, context = tiny_inputs(model)
    codes[:, 0] = model.mask_id
    base = model(codes, context)
    assert base.shape == (3, model.num_tokens, model.config.num_codes)
    other = codes.clone()
    other[:, -1] = (other[:, -1] + 1) % model.config.num_codes
    assert (model(other, context)[:, 0] - base[:, 0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="causal model"):
        model.start(context)


@torch.no_grad()
def test_context_changes_the_logits_and_bad_shapes_are_one_line_errors():
    model = tiny_model()
    codes, context = tiny_inputs(model)
    assert (model(codes, context + 1) - model(codes, context)).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"context must be \[B, 4, 6\]"):
        model(codes, context[:, :3])
    with pytest.raises(ValueError, match=r"codes must be \[B, 9\]"):
        model(codes[:, :5], context)


def test_init_and_default_config():
    cfg = TokenTransformerConfig()
    assert (cfg.num_tokens, cfg.head_dim, cfg.hidden) == (64, 32, 704)
    assert swiglu_hidden(64) == 192 and TokenTransformerConfig(mlp_hidden=100).hidden == 100
    model = TokenTransformer(TokenTransformerConfig(**TINY))
    assert model.mask_id == 13 and model.tok_embeddings.num_embeddings == 14
    assert abs(model.output.weight.std().item() - 0.02) < 0.005
    assert model.layers[0].attention.wo.weight.std().item() < 0.012  # 0.02/√(2·layers)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_codes": 0}, "num_codes must be a positive integer"),
        ({"width": 30}, "must split into heads=4"),
        ({"width": 30, "heads": 6}, "must split into heads=6"),  # odd head width
        ({"mlp_hidden": -1}, "mlp_hidden must be a positive integer"),
        ({"causal": "yes"}, "causal must be true or false"),
        ({"rope_theta": 0.0}, "rope_theta must be a finite number > 0"),
        ({"norm_eps": float("nan")}, "norm_eps must be a finite number > 0"),
        ({"depth": 3}, "unknown TokenTransformerConfig field"),
    ],
)
def test_bad_config_is_one_line_error(change, message):
    with pytest.raises(ValueError, match=message) as info:
        TokenTransformerConfig.from_dict({**TINY, **change})
    assert "\n" not in str(info.value)


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    assert COMPONENT_CLASSES["TokenTransformer"][0] is TokenTransformer
    model = tiny_model(causal=False, mlp_hidden=48)
    save_component(
        model, tmp_path / "t", class_name="TokenTransformer", config=model.config.to_dict()
    )
    loaded = load_component(tmp_path / "t")
    assert isinstance(loaded, TokenTransformer) and loaded.config == model.config
    codes, context = tiny_inputs(model)
    torch.testing.assert_close(loaded(codes, context), model(codes, context), atol=0, rtol=0)


def test_training_step_reduces_the_loss():
    """Next-code cross-entropy on one batch falls under a few Adam steps (gradients reach
    every parameter)."""
    torch.manual_seed(0)
    model = TokenTransformer(TokenTransformerConfig(**TINY)).train()
    codes, context = tiny_inputs(model, b=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(
            model(codes, context).flatten(0, 1), codes.flatten()
        )
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    # tok_embeddings' mask row and the last code's embedding are not read by a causal forward
    grads = [p.grad for n, p in model.named_parameters() if n != "tok_embeddings.weight"]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert losses[-1] < 0.5 * losses[0]
