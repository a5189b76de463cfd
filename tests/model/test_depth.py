"""Depth at inference (``repeats``): the KV cache and left padding stay exact for R below and above the trained
value, ``set_repeats`` equals the forward argument, and what R means for each group order."""

from __future__ import annotations

import pytest
import torch

from moeut.model import ConfigError, KVCache, MoEUTLM, build_model
from moeut.model.perplexity import window_nll
from tests.model.helpers import sut_config, tiny_config

# tiny_config: n_layers 6, G = 2 (trained R = 3); sut_config: n_layers 4, G = 1 (trained R = 4)
CASES = {
    "moeut-abab": (lambda: tiny_config(), (1, 2, 3, 5)),
    "moeut-aabb": (lambda: tiny_config(group_order="aabb"), (1, 2, 5)),
    "sut-act": (lambda: sut_config(), (1, 3, 6)),
}


@pytest.fixture(params=list(CASES))
def case(request):
    make_cfg, repeats = CASES[request.param]
    torch.manual_seed(4)
    m = build_model(make_cfg()).eval()
    with torch.no_grad():  # sharpen the distribution so greedy paths are not near ties
        m.lm_head.weight.mul_(20)
    return m, repeats


def _tokens(vocab: int, shape=(3, 13), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_cached_decoding_equals_the_full_pass_at_every_depth(case):
    model, repeats = case
    tokens = _tokens(model.cfg.vocab_size)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    for r in repeats:
        with torch.no_grad():
            full = model(tokens, attention_mask=mask, repeats=r).logits
            out = model(tokens[:, :6], attention_mask=mask[:, :6], cache=KVCache(), repeats=r)
            steps, cache = [out.logits], out.cache
            for t in range(6, tokens.shape[1]):
                out = model(tokens[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, repeats=r)
                steps.append(out.logits)
                cache = out.cache
        assert len(cache.layers) == r * model.cfg.group_size
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5, msg=f"repeats={r}")


@pytest.mark.slow
def test_generate_with_cache_and_batched_equals_one_by_one(case):
    model, repeats = case
    prompts = [[5, 7, 9, 11], [3], [1, 2, 3, 4, 5, 6, 7]]
    for r in repeats:
        cached = model.generate(prompts, 8, temperature=0, repeats=r)
        assert cached == model.generate(prompts, 8, temperature=0, repeats=r, use_cache=False), r
        assert cached == [model.generate([p], 8, temperature=0, repeats=r)[0] for p in prompts], r


def test_repeats_changes_the_depth_and_the_trained_value_changes_nothing(case):
    model, repeats = case
    cfg = model.cfg
    tokens = _tokens(cfg.vocab_size)
    with torch.no_grad():
        base = model(tokens, output_hidden_states=True)
        same = model(tokens, repeats=cfg.n_repeats, output_hidden_states=True)
        deeper = model(tokens, repeats=cfg.n_repeats + 1, output_hidden_states=True)
    torch.testing.assert_close(same.logits, base.logits, rtol=0, atol=0)
    assert len(base.hidden_states) == cfg.n_layers + 1
    assert len(deeper.hidden_states) == cfg.n_layers + cfg.group_size + 1
    assert (deeper.logits - base.logits).abs().max() > 1e-3


def test_set_repeats_equals_the_forward_argument_and_keeps_the_weights(case):
    model, repeats = case
    tokens = _tokens(model.cfg.vocab_size)
    r = repeats[-1]
    with torch.no_grad():
        want = model(tokens, repeats=r).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.set_repeats(r)
        got = model(tokens).logits
    assert model.cfg.n_repeats == r and model.cfg.n_layers == r * model.cfg.group_size
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_training_mode_regulariser_pools_every_application():
    torch.manual_seed(0)
    model = MoEUTLM(tiny_config()).train()
    tokens = _tokens(53)
    out = model(tokens, repeats=5)
    assert out.expert_counts["ffn"].shape[0] == 10
    out.loss(tokens).backward()
    assert all(p.grad is not None for p in model.layers.parameters())


def test_group_orders_say_what_r_means():
    abab, aabb = tiny_config(), tiny_config(group_order="aabb")
    assert [abab.layer_index(i, 4) for i in range(8)] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert [aabb.layer_index(i, 4) for i in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]  # each layer R times in a row
    assert [aabb.layer_index(i, 1) for i in range(2)] == [0, 1]
    assert [aabb.layer_index(i) for i in range(6)] == [0, 0, 0, 1, 1, 1]  # trained R = 3
    assert aabb.with_repeats(4).n_layers == 8


def test_bad_repeats_are_refused_with_the_fix():
    model = MoEUTLM(tiny_config()).eval()
    tokens = _tokens(53, (1, 5))
    for bad in (0, -1, 1.5):
        with pytest.raises(ConfigError, match="positive integer"):
            model(tokens, repeats=bad)
    dense = MoEUTLM(tiny_config("dense")).eval()
    assert dense(tokens, repeats=1).logits.shape == (1, 5, 53)
    with pytest.raises(ConfigError, match="dense baseline shares no layers"):
        dense(tokens, repeats=2)
    with pytest.raises(ConfigError, match="dense baseline shares no layers"):
        dense.set_repeats(2)
    with torch.no_grad():
        cache = model(tokens, cache=KVCache(), repeats=2).cache
        with pytest.raises(ValueError, match="same repeats"):
            model(tokens[:, :1], cache=cache, repeats=3)


def test_window_nll_at_another_depth():
    torch.manual_seed(1)
    model = MoEUTLM(tiny_config()).eval()
    batches = [_tokens(53, (2, 9), seed=s) for s in range(2)]
    trained = window_nll(model, batches)
    assert window_nll(model, batches, repeats=3).nll == pytest.approx(trained.nll, rel=1e-6)
    other = window_nll(model, batches, repeats=1)
    assert other.tokens == trained.tokens and other.nll != pytest.approx(trained.nll, rel=1e-3)
