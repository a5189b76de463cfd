"""The SUT baseline's parts: ACT halting, the mutual-information loss, softmax top-k routing, the layer stack."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moeut.model import build_model
from moeut.model.config import ConfigError
from moeut.model.act import ACTState, expected_depth, halt_step, mix_state
from moeut.model.mutual_information import mutual_information_loss
from moeut.model.sut_routing import softmax_topk
from tests.model.helpers import sut_config




def sut_model(**kw):
    torch.manual_seed(2)
    return build_model(sut_config(**kw)).eval()


# ------------------------------------------------------------------------------------------------- ACT
def test_halting_step_expected_depth_and_state_on_a_hand_made_case():
    """Halting probability ½ before every step: p = ½, ¼, ⅛; q = ½, ¼, ⅛."""
    h = [torch.full((1, 1, 2), float(v)) for v in (1.0, 2.0, 4.0, 8.0)]  # layer outputs h₀ … h₃
    log_half = torch.full((1, 1, 2), math.log(0.5))
    state, mixed = ACTState.start(h[0]), h[0]
    for t in (1, 2, 3):
        state, q = halt_step(state, log_half, h[t - 1], threshold=0.999)
        mixed = mix_state(state, q, h[t], mixed, threshold=0.999)
    assert q.item() == pytest.approx(1 / 8)
    # acc = ½·h₀ + ¼·h₁ + ⅛·h₂; state = acc + ⅛·h₃
    assert mixed[0, 0, 0].item() == pytest.approx(0.5 * 1 + 0.25 * 2 + 0.125 * 4 + 0.125 * 8)
    # E[depth] = Σ (t−1)·p_t + q·3 = 0·½ + 1·¼ + 2·⅛ + 3·⅛
    assert expected_depth(state, q).item() == pytest.approx(0.25 + 0.25 + 0.375)


def test_act_loss_sums_the_expected_depth_over_every_halting_application():
    """The paper's training code adds act_reg · mean E[depth]_t at every application t ≥ 1 (ACTWrapper.add_reg,
    accumulated, unnormalised). At init the halting gates' last layer is zero: every step halts with
    probability ½, so with 4 applications (q_t = 2^-t, p_t = 2^-t):
    E₁ = 0 + ½·1 = ½,  E₂ = 1·¼ + ¼·2 = ¾,  E₃ = (¼ + 2·⅛) + ⅛·3 = ⅞."""
    model = sut_model(mi_reg=0.0, act_reg=0.5).train()
    assert model.cfg.n_layers == 4
    out = model(torch.randint(0, 53, (2, 6)))
    assert out.reg_loss.item() == pytest.approx(0.5 * (0.5 + 0.75 + 0.875), abs=1e-6)
    assert sut_model(mi_reg=0.0, act=False).train()(torch.randint(0, 53, (2, 6))).reg_loss.item() == 0


def test_halted_tokens_stop_changing_and_get_no_experts():
    """threshold 0.8: a token freezes once q < 0.2, i.e. at the 3rd gated step (q = ⅛)."""
    model = sut_model(n_layers=6, act_threshold=0.8)
    out = model(torch.randint(0, 53, (2, 7)), output_hidden_states=True, output_routing=True)
    hs = out.hidden_states  # state entering application i, plus the final one
    assert (hs[3] - hs[2]).abs().max() > 1e-3  # still running after application 2 (q = ¼)
    for i in (4, 5, 6):
        assert torch.equal(hs[i], hs[3])  # frozen from application 3 on
        assert (out.routing[i - 1].att.gates == 0).all() and (out.routing[i - 1].ffn.gates == 0).all()
    torch.testing.assert_close(model.lm_head(hs[-1]), out.logits)


def test_frozen_tokens_are_frozen_individually():
    """Random halting gates: each token's state stops changing from its own freezing step on, and the
    final state is the one attention read at its last running step."""
    model = sut_model(n_layers=8)
    with torch.no_grad():
        for layer in model.layers:
            torch.nn.init.normal_(layer.halting.out.weight, 0, 3.0)
    out = model(torch.randint(0, 53, (3, 9)), output_hidden_states=True, output_routing=True)
    hs = torch.stack(out.hidden_states)  # [n+1, B, T, d]
    frozen = torch.stack([torch.zeros_like(out.routing[1].weight, dtype=torch.bool)]
                         + [r.weight == 0 for r in out.routing[1:]])  # [n, B, T]
    assert frozen.any() and not frozen.all()  # the case is not trivial
    for i in range(1, model.cfg.n_layers):
        same = (hs[i + 1] == hs[i]).all(-1)
        assert same[frozen[i]].all()
        assert (frozen[i] | ~frozen[i - 1]).all()  # once frozen, always frozen


# ---------------------------------------------------------------------------------------- MI loss
def test_mutual_information_loss_on_designed_router_outputs():
    confident = torch.tensor([[30.0, -30.0], [-30.0, 30.0]])  # two tokens, each sure of another expert
    uniform = torch.zeros(2, 2)
    log2 = math.log(2)
    # H(E|X) = 0, H(E) = log 2
    assert mutual_information_loss([confident], [None], "code").item() == pytest.approx(log2, abs=1e-6)
    assert mutual_information_loss([confident], [None], "paper").item() == pytest.approx(-log2, abs=1e-6)
    # H(E|X) = log 2, H(E) = log 2
    assert mutual_information_loss([uniform], [None], "code").item() == pytest.approx(2 * log2, abs=1e-6)
    assert mutual_information_loss([uniform], [None], "paper").item() == pytest.approx(0, abs=1e-6)
    # p_x ∝ weights: only the first token counts → H(E|X) = H(E) = 0
    w = torch.tensor([1.0, 0.0])
    assert mutual_information_loss([confident], [w], "code").item() == pytest.approx(0, abs=1e-6)
    # a skewed case by hand: p(e|x) = (0.8, 0.2) and (0.5, 0.5), weights 3:1
    logits = torch.tensor([[math.log(0.8), math.log(0.2)], [0.0, 0.0]])
    p_x = [0.75, 0.25]
    h_cond = p_x[0] * -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)) + p_x[1] * log2
    p_e = [0.75 * 0.8 + 0.25 * 0.5, 0.75 * 0.2 + 0.25 * 0.5]
    h_e = -sum(p * math.log(p) for p in p_e)
    got = mutual_information_loss([logits], [torch.tensor([3.0, 1.0])], "code").item()
    assert got == pytest.approx(h_cond + h_e, abs=1e-6)


def test_mutual_information_loss_pools_the_applications_of_a_layer():
    a, b = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    pooled = mutual_information_loss([a, b], [None, None])
    assert pooled.item() == pytest.approx(mutual_information_loss([torch.cat([a, b])], [None]).item(), abs=1e-6)
    separate = mutual_information_loss([a], [None]) + mutual_information_loss([b], [None])
    assert pooled.item() != pytest.approx(separate.item())


def test_sut_reg_loss_is_mi_plus_act_loss():
    model = sut_model(mi_reg=0.1, act_reg=0.01)
    out = model(torch.randint(0, 53, (2, 6)), output_routing=True)
    mi = sum(mutual_information_loss([getattr(r, kind).logits for r in out.routing], [r.weight for r in out.routing])
             for kind in ("att", "ffn"))
    assert out.reg_loss.item() == pytest.approx(0.1 * mi.item() + 0.01 * (0.5 + 0.75 + 0.875), abs=1e-5)


# ------------------------------------------------------------------------------------------- routing
def test_softmax_topk_takes_the_top_k_and_renormalises_the_gates():
    logits = torch.randn(50, 9)
    r = softmax_topk(logits, 3)
    probs = logits.softmax(-1)
    assert torch.equal(r.indices.sort(-1).values, probs.topk(3, -1).indices.sort(-1).values)
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(50), atol=1e-5, rtol=0)
    want = probs.gather(-1, r.indices)
    torch.testing.assert_close(r.gates, want / (want.sum(-1, keepdim=True) + 1e-6))
    frozen = softmax_topk(logits, 3, active=torch.arange(50) % 2)
    assert (frozen.gates[::2] == 0).all() and torch.equal(frozen.gates[1::2], r.gates[1::2])


def test_sample_topk_keeps_the_best_and_samples_the_last_from_the_rest():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(6000, 4)
    g = torch.Generator().manual_seed(0)
    r = softmax_topk(logits, 2, sample_topk=1, training=True, generator=g)
    assert (r.indices[:, 0] == 0).all()
    freq = torch.bincount(r.indices[:, 1], minlength=4).float() / 6000
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.6, 0.3, 0.1]), atol=0.03, rtol=0)
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(6000), atol=1e-5, rtol=0)
    assert torch.equal(softmax_topk(logits, 2, sample_topk=1, training=False).indices[:, 1], torch.ones(6000).long())


def test_sample_topk_acts_only_in_training():
    model = sut_model(sample_topk=1)
    tokens = torch.randint(0, 53, (2, 9))
    assert torch.equal(model(tokens).logits, model(tokens).logits)
    model.train()
    assert not torch.equal(model(tokens).logits, model(tokens).logits)


def test_sample_topk_samples_only_the_attention_experts():
    """As the training code and shawntan/SUT: the MoA router samples, the feed-forward MoE stays greedy."""
    model = sut_model(sample_topk=1).train()
    tokens = torch.randint(0, 53, (2, 9))
    torch.manual_seed(0)
    out = model(tokens, output_routing=True)
    for r in out.routing:  # (no token is frozen after 4 applications at init: q ≥ 1/8)
        greedy_ffn = torch.softmax(r.ffn.logits, -1).topk(model.cfg.ff_k, -1).indices
        torch.testing.assert_close(r.ffn.indices.sort(-1).values, greedy_ffn.sort(-1).values)
    # the attention router does sample: over several draws some second choice is not the greedy one
    sampled_any = False
    for seed in range(5):
        torch.manual_seed(seed)
        r = model(tokens, output_routing=True).routing[0]
        greedy = torch.softmax(r.att.logits, -1).topk(model.cfg.att_k, -1).indices
        sampled_any |= not torch.equal(r.att.indices[..., 1], greedy[..., 1])
    assert sampled_any


def test_sample_topk_may_exceed_ff_k_but_not_att_k():
    sut_config(sample_topk=2, att_k=2, ff_k=1)
    with pytest.raises(ConfigError, match="sample_topk"):
        sut_config(sample_topk=3, att_k=2)


# -------------------------------------------------------------------------------------------- stack
def test_sut_is_post_ln_with_a_normalised_scaled_embedding_and_no_output_norm():
    model = sut_model(act=False)
    assert not any("out_norm" in n for n, _ in model.named_parameters())
    tokens = torch.randint(0, 53, (2, 5))
    out = model(tokens, output_hidden_states=True)
    d = model.cfg.d_model
    torch.testing.assert_close(out.hidden_states[0], F.layer_norm(model.embedding(tokens) * math.sqrt(d), (d,)))
    for h in out.hidden_states[1:]:  # each application ends in LN₂ (unit affine at init)
        torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(h.shape[:-1]), atol=1e-3, rtol=0)
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


def test_sut_shares_one_layer_and_counts_routing_per_application():
    model = sut_model()
    assert len(model.layers) == 1
    out = model(torch.randint(0, 53, (2, 5)), output_routing=True)
    assert out.expert_counts["ffn"].shape == (4, 7) and out.expert_counts["att"].shape == (4, 4)
    assert (out.expert_counts["ffn"].sum(-1) == 2 * 5 * 3).all()


def test_relative_position_table_gives_the_only_position_signal():
    """With the zero table of the init, attention cannot tell the order of earlier tokens; with a learned
    table it can (one layer application: deeper, the earlier states themselves depend on the order)."""
    model = sut_model(act=False, n_layers=1)
    a, b = torch.tensor([[3, 9, 20, 41]]), torch.tensor([[9, 3, 20, 41]])  # same prefix set, other order
    torch.testing.assert_close(model(a).logits[0, -1], model(b).logits[0, -1], atol=1e-5, rtol=0)
    with torch.no_grad():
        model.layers[0].attention.rel_pos.normal_()
    assert (model(a).logits[0, -1] - model(b).logits[0, -1]).abs().max() > 1e-3
