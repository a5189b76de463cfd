"""Properties of the language model: causality, KV-cache decoding, padding, regulariser, init."""

from __future__ import annotations

import math

import pytest
import torch

from moeut.model import KVCache, MoEUTLM
from tests.model.helpers import tiny_config

ARCHS = ["moeut", "dense"]


def _model(arch: str = "moeut", **kw) -> MoEUTLM:
    torch.manual_seed(1)
    return MoEUTLM(tiny_config(arch, **kw)).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes_and_finite(arch):
    model = _model(arch)
    tokens = torch.randint(0, 53, (2, 9))
    out = model(tokens, output_routing=True)
    assert out.logits.shape == (2, 9, 53) and torch.isfinite(out.logits).all()
    assert out.reg_loss.shape == () and out.reg_loss.dtype == torch.float32
    if arch == "dense":
        assert out.reg_loss.item() == 0 and out.expert_counts is None


@pytest.mark.parametrize("arch", ARCHS)
def test_changing_token_t_never_changes_logits_before_t(arch):
    model = _model(arch)
    tokens = torch.randint(0, 53, (2, 12))
    base = model(tokens).logits
    for t in (0, 5, 11):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 7) % 53
        logits = model(changed).logits
        # equal up to float reordering (expert rows are grouped differently), unlike the changed part
        torch.testing.assert_close(logits[:, :t], base[:, :t], atol=1e-5, rtol=0)
        assert (logits[:, t] - base[:, t]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunks", [[1] * 10, [4, 1, 3, 2], [7, 3]])
def test_decoding_with_kv_cache_gives_full_sequence_logits(arch, chunks):
    model = _model(arch)
    tokens = torch.randint(0, 53, (3, sum(chunks)))
    full = model(tokens).logits
    cache, parts, start = KVCache(), [], 0
    for n in chunks:
        out = model(tokens[:, start:start + n], cache=cache)
        cache, start = out.cache, start + n
        parts.append(out.logits)
    assert cache.length == tokens.shape[1]
    assert set(cache.layers) == set(range(model.cfg.n_layers))  # one entry per layer application
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_matches_rows_run_alone(arch):
    model = _model(arch)
    lengths = [7, 4, 1]
    rows = [torch.randint(0, 53, (n,)) for n in lengths]
    T = max(lengths)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, T - len(r):], mask[i, T - len(r):] = r, 1
    batched = model(tokens, attention_mask=mask).logits
    for i, r in enumerate(rows):
        alone = model(r[None]).logits[0]
        torch.testing.assert_close(batched[i, T - len(r):], alone, atol=1e-5, rtol=1e-5)
    # and continuing the padded batch with the cache keeps matching
    out = model(tokens, attention_mask=mask, cache=KVCache())
    nxt = torch.randint(0, 53, (len(rows), 1))
    step = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), cache=out.cache).logits
    for i, r in enumerate(rows):
        alone = model(torch.cat([r, nxt[i]])[None]).logits[0, -1]
        torch.testing.assert_close(step[i, 0], alone, atol=1e-5, rtol=1e-5)


def test_attention_mask_of_wrong_shape_is_rejected():
    model = _model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_regulariser_equals_brute_force_entropy():
    """Recompute every router's logits with hooks and the regulariser with explicit loops."""
    model = _model().train()
    cfg = model.cfg
    tokens = torch.randint(0, 53, (3, 8))
    normed: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for g, layer in enumerate(model.layers):
        for name in ("ln1", "ln2"):
            hooks.append(getattr(layer, name).register_forward_hook(
                lambda m, i, o, g=g, name=name: normed.setdefault((g, name), []).append(o.detach())))
    out = model(tokens, output_routing=True)
    for h in hooks:
        h.remove()

    def neg_entropy_of_mean(prob_lists: list[torch.Tensor]) -> float:  # each [T, E]
        p = torch.cat(prob_lists, 0).detach().double().mean(0)
        return sum(float(pi) * math.log(float(pi)) for pi in p)

    ffn = att = 0.0
    for g, layer in enumerate(model.layers):
        xs1, xs2 = normed[(g, "ln1")], normed[(g, "ln2")]
        assert len(xs1) == cfg.n_repeats
        for b in range(tokens.shape[0]):
            probs = [torch.softmax(x[b] @ layer.ffn.expert_sel.T, -1) for x in xs2]
            ffn += neg_entropy_of_mean(probs) / tokens.shape[0]
            for router in (layer.attention.sel_v, layer.attention.sel_o):
                for h in range(cfg.n_heads):
                    w = router[h * cfg.att_n_experts:(h + 1) * cfg.att_n_experts]
                    probs = [torch.softmax(x[b] @ w.T, -1) for x in xs1]
                    att += neg_entropy_of_mean(probs) / (tokens.shape[0] * cfg.n_heads)
    expected = cfg.entropy_reg * ffn + cfg.att_entropy_reg * att
    assert out.reg_loss.item() == pytest.approx(expected, abs=1e-6)


def test_expert_counts_cover_every_selection():
    model = _model()
    cfg = model.cfg
    out = model(torch.randint(0, 53, (2, 5)), output_routing=True)
    c = out.expert_counts
    assert c["ffn"].shape == (cfg.n_layers, cfg.ff_n_experts)
    assert (c["ffn"].sum(1) == 2 * 5 * cfg.ff_k).all()
    assert c["att_v"].shape == (cfg.n_layers, cfg.n_heads * cfg.att_n_experts)
    per_head = c["att_o"].view(cfg.n_layers, cfg.n_heads, cfg.att_n_experts).sum(-1)
    assert (per_head == 2 * 5 * cfg.att_k).all()


def test_layers_are_applied_in_group_order_abab():
    """n_layers/G repeats of the group: each distinct layer runs n_repeats times, interleaved."""
    model = _model()
    order: list[int] = []
    hooks = [layer.register_forward_hook(lambda m, i, o, g=g: order.append(g)) for g, layer in
             enumerate(model.layers)]
    model(torch.randint(0, 53, (1, 3)))
    for h in hooks:
        h.remove()
    assert order == [0, 1] * 3


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_same_model(arch):
    def build(seed):
        torch.manual_seed(seed)
        return MoEUTLM(tiny_config(arch)).state_dict()

    a, b, c = build(3), build(3), build(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_init_follows_the_paper():
    torch.manual_seed(0)
    cfg = tiny_config(d_model=256, n_layers=8, group_size=2, ff_n_experts=64, ff_expert_size=32,
                      n_heads=4, d_head=32, att_n_experts=4)
    model = MoEUTLM(cfg)
    s = math.sqrt(2 / cfg.n_layers)
    d = cfg.d_model
    assert model.embedding.weight.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.05)
    layer = model.layers[0]
    assert layer.ffn.keys.std().item() == pytest.approx(s / math.sqrt(d), rel=0.05)
    assert layer.ffn.values.std().item() == pytest.approx(s / math.sqrt(64 * 32), rel=0.05)
    assert layer.attention.o.std().item() == pytest.approx(s / math.sqrt(4 * 32), rel=0.05)
    # σ-MoE router: plain N(0, s/√d) as the paper's training code (rows not renormalised: unequal norms)
    norms = layer.ffn.expert_sel.norm(dim=1)
    assert not torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-2)
    assert layer.ffn.expert_sel.std().item() == pytest.approx(s / math.sqrt(d), rel=0.05)
    for ln in (layer.ln1, layer.ln2, model.out_norm):
        assert torch.equal(ln.weight, torch.ones(d)) and torch.equal(ln.bias, torch.zeros(d))


def test_gradients_reach_every_parameter():
    model = _model().train()
    tokens = torch.randint(0, 53, (2, 10))
    out = model(tokens[:, :-1])
    out.loss(tokens[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_hidden_states_and_routing_per_application() -> None:
    from moeut.model.config import ModelConfig
    from moeut.model.lm import MoEUTLM

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("moeut-tiny", vocab_size=50, n_layers=4, group_size=2)
    model = MoEUTLM(cfg).eval()
    tokens = torch.randint(0, 50, (2, 7))
    out = model(tokens, output_hidden_states=True, output_routing=True)
    assert len(out.hidden_states) == cfg.n_layers + 1 and len(out.routing) == cfg.n_layers
    assert torch.equal(out.hidden_states[0], model.embedding(tokens))
    torch.testing.assert_close(model.lm_head(model.out_norm(out.hidden_states[-1])), out.logits)
    # application i·G + g uses layer g: counts from the returned routings equal the logged counts
    for i, routing in enumerate(out.routing):
        counts = torch.bincount(routing.ffn.indices.flatten(), minlength=cfg.ff_n_experts)
        assert torch.equal(counts, out.expert_counts["ffn"][i])
    plain = model(tokens)
    assert plain.hidden_states is None and plain.routing is None
    torch.testing.assert_close(plain.logits, out.logits)
