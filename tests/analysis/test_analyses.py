"""Each analysis on hand-set routers and designed routings gives the known counts, IoUs and ratios."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from moeut.analysis.common import (AnalysisError, applications_of_layer, layer_of_application, repeat_of_application,
                                   routing_indices)
from moeut.analysis.expert_usage import ExpertUsageResult, UsageAccumulator, expert_usage
from moeut.analysis.layer_similarity import SimilarityAccumulator, layer_similarity, random_iou
from moeut.analysis.residual_norm import residual_norms
from moeut.train.metrics import residual_norm_metrics
from moeut.analysis.token_diversity import DiversityAccumulator, token_diversity
from moeut.model import ModelConfig, build_model
from moeut.model.layer import LayerRouting
from moeut.model.routing import Routing
from tests.analysis.conftest import TINY_DENSE, TINY_MOEUT, hand_expected_experts, hand_set_model

TOKENS = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 1, 1, 2, 9, 10]])


# ------------------------------------------------------------------ which layer an application uses
def test_layer_of_application_abab_cycles_and_aabb_blocks():
    abab = SimpleNamespace(n_layers=6, group_size=2)
    aabb = SimpleNamespace(n_layers=6, group_size=2, group_order="aabb")
    assert [layer_of_application(abab, i) for i in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [repeat_of_application(abab, i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [layer_of_application(aabb, i) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert [repeat_of_application(aabb, i) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert applications_of_layer(aabb, 1) == [3, 4, 5]
    with pytest.raises(IndexError):
        layer_of_application(abab, 6)


def test_attention_indices_are_offset_by_head():
    idx = torch.tensor([[[[0], [2]]]])  # [B=1, T=1, H=2, k=1], 3 experts per head
    r = LayerRouting(att_v=Routing(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 1), idx), att_o=None, ffn=None)
    assert routing_indices(r, "att_v").tolist() == [[0], [5]]


# ------------------------------------------------------------------ residual norms
def test_residual_norms_equal_norms_of_each_layer_call_captured_by_hooks():
    torch.manual_seed(1)
    model = build_model(ModelConfig(**TINY_MOEUT, vocab_size=50)).eval()
    tokens = torch.randint(50, (3, 10))
    calls = []
    hooks = [layer.register_forward_hook(lambda m, args, out: calls.append((args[0].detach(), out[0].detach())))
             for layer in model.layers]
    res = residual_norms(model, [tokens])
    for h in hooks:
        h.remove()
    assert len(calls) == 4 and res.tokens == 30
    for i, (x_in, x_out) in enumerate(calls):
        assert math.isclose(res.residual_norm[i], x_in.norm(dim=-1).mean().item(), rel_tol=1e-5)
        assert math.isclose(res.update_norm[i], (x_out - x_in).norm(dim=-1).mean().item(), rel_tol=1e-5)
        assert math.isclose(res.relative_update[i], ((x_out - x_in).norm(dim=-1) / x_in.norm(dim=-1)).mean().item(),
                            rel_tol=1e-5)
    assert math.isclose(res.residual_norm[4], calls[-1][1].norm(dim=-1).mean().item(), rel_tol=1e-5)
    assert res.shared_layer == [0, 1, 0, 1]


def test_residual_norms_of_zero_updates_are_zero_and_the_residual_is_the_embedding():
    model = hand_set_model()
    res = residual_norms(model, [TOKENS])
    assert res.update_norm == [0.0] * 4
    for v in res.residual_norm:  # every embedding row is e_c − e_{c+4}: norm √2
        assert math.isclose(v, math.sqrt(2), rel_tol=1e-6)


def test_residual_norms_work_for_the_dense_baseline_and_average_over_batches():
    torch.manual_seed(2)
    model = build_model(ModelConfig(arch="dense", vocab_size=50, **TINY_DENSE)).eval()
    a, b = torch.randint(50, (2, 8)), torch.randint(50, (2, 8))
    both = residual_norms(model, [a, b])
    joint = residual_norms(model, [torch.cat([a, b])])
    assert both.tokens == 32 and both.arch == "dense"
    for x, y in zip(both.update_norm, joint.update_norm):
        assert math.isclose(x, y, rel_tol=1e-5)


def test_training_log_metrics_name_every_application():
    hs = [torch.ones(1, 2, 4) * i for i in range(3)]  # norms 0, 2, 4; updates 2, 2
    m = residual_norm_metrics(hs)
    assert m == {"resnorm/L0/residual": 0.0, "resnorm/L0/update": 2.0, "resnorm/L1/residual": 2.0,
                 "resnorm/L1/update": 2.0, "resnorm/final": 4.0}


# ------------------------------------------------------------------ expert usage
def test_expert_usage_counts_of_hand_set_routers():
    model = hand_set_model()
    res = expert_usage(model, [TOKENS])
    # classes of the 16 tokens: c0 = {0,3,6,0,0,0,9} 7×, c1 = {1,4,7,1,1,10} 6×, c2 = {2,5,2} 3×
    n = {0: 7, 1: 6, 2: 3}
    for g in range(2):
        for r in range(2):
            want = [0] * 6
            for c, cnt in n.items():
                for e in hand_expected_experts(c, g):
                    want[e] += cnt
            assert res.counts[g][r] == want
    assert res.tokens == 16 and all(s["selections"] == 32 for s in res.summary)
    assert res.share[0][0] == [0.5] * 6  # every expert is used equally in both repeats
    assert res.specialisation == [0.5, 0.5]


def test_expert_usage_share_and_order_from_designed_counts():
    counts = torch.tensor([[[4, 0, 1, 0], [0, 2, 3, 0]]])  # G=1, R=2, E=4; expert 3 never used
    res = ExpertUsageResult.from_counts("x", "ffn", counts, tokens=5)
    assert res.share[0] == [[1.0, 0.0, 0.25, 0.0], [0.0, 1.0, 0.75, 0.0]]
    assert res.expert_order[0] == [0, 2, 1, 3]  # mean repeats 0, 0.75, 1, unused last
    assert [s["used_experts"] for s in res.summary] == [2, 2]
    assert [s["majority_experts"] for s in res.summary] == [1, 2]
    assert math.isclose(res.specialisation[0], (1 + 1 + 0.75) / 3)


def test_expert_analyses_refuse_a_dense_model():
    model = build_model(ModelConfig(arch="dense", vocab_size=50, **TINY_DENSE)).eval()
    with pytest.raises(AnalysisError, match="dense"):
        expert_usage(model, [torch.randint(50, (1, 4))])


# ------------------------------------------------------------------ layer similarity
def _routing(sets_per_app: list[list[list[int]]]) -> list[LayerRouting]:
    """One LayerRouting per application from per-token ffn expert lists (attention unused)."""
    out = []
    for sets in sets_per_app:
        idx = torch.tensor(sets).unsqueeze(0)  # [1, T, k]
        ffn = Routing(torch.zeros(*idx.shape[:-1], 6), torch.zeros(idx.shape), idx)
        out.append(LayerRouting(att_v=ffn, att_o=ffn, ffn=ffn))
    return out


def test_iou_of_hand_set_routers_is_one_between_repeats():
    res = layer_similarity(hand_set_model(), [TOKENS])
    assert res.iou == [[[1.0, 1.0], [1.0, 1.0]]] * 2 and res.rows == 16


def test_iou_of_designed_selections():
    cfg = SimpleNamespace(n_layers=3, group_size=1, n_repeats=3, ff_n_experts=6)
    acc = SimilarityAccumulator(cfg, "ffn")
    # token 0: {0,1} {1,2} {0,1} → IoU 1/3, 1, 1/3; token 1: {2,3} {4,5} {2,3} → 0, 1, 0
    acc.update(_routing([[[0, 1], [2, 3]], [[1, 2], [4, 5]], [[0, 1], [2, 3]]]))
    res = acc.result("x")
    iou = res.iou[0]
    assert math.isclose(iou[0][1], (1 / 3 + 0) / 2) and math.isclose(iou[0][2], 1.0)
    assert math.isclose(iou[1][2], 1 / 6) and iou[1][1] == 1.0
    assert math.isclose(res.mean_offdiag_iou[0], (1 / 6 + 1 + 1 / 6) / 3)


def test_random_iou_is_the_hypergeometric_expectation():
    assert random_iou(4, 4) == 1.0
    # k=1 of 4: same expert with probability 1/4
    assert math.isclose(random_iou(4, 1), 0.25)
    # k=2 of 4: overlap 0 (p 1/6), 1 (p 4/6, IoU 1/3), 2 (p 1/6, IoU 1)
    assert math.isclose(random_iou(4, 2), 4 / 6 / 3 + 1 / 6)


# ------------------------------------------------------------------ token diversity
def test_token_diversity_of_hand_set_routers():
    res = token_diversity(hand_set_model(), [TOKENS], top_n=3)
    assert res.tokens == 16 and res.vocab_seen == 10
    assert res.token_ids[:3] == [0, 1, 2]  # frequencies 4, 3, 2
    assert res.token_freq[:3] == [4, 3, 2]
    assert all(d == [2, 2, 2, 2] for d in res.distinct)  # k experts, always the same ones
    assert all(r == [1.0] * 4 for r in res.ratio)
    assert res.top_n == 3 and res.min_freq_top == 2


def test_token_diversity_ratio_of_designed_selections():
    cfg = SimpleNamespace(n_layers=2, group_size=1, n_repeats=2, ff_n_experts=6, vocab_size=4)
    acc = DiversityAccumulator(cfg, "ffn")
    tokens = torch.tensor([[1, 1, 2]])
    # token 1: repeat 0 uses {0,1} then {0,2} → 3 distinct; repeat 1 uses {3,4} twice → 2; union 5
    # token 2: {0,1} in both repeats → 2 distinct each, union 2
    acc.update(tokens, _routing([[[0, 1], [0, 2], [0, 1]], [[3, 4], [3, 4], [0, 1]]]))
    res = acc.result("x", top_n=10)
    assert res.token_ids == [1, 2]
    assert res.distinct == [[3, 2], [2, 2]]
    assert res.ratio == [[3 / 5, 2 / 5], [1.0, 1.0]]
    assert math.isclose(res.summary[0]["ratio_top"], (3 / 5 + 1) / 2)


def test_usage_accumulator_counts_attention_experts_per_head():
    model = hand_set_model()
    acc = UsageAccumulator(model.cfg, "att_v")
    with torch.no_grad():
        acc.update(model(TOKENS, output_routing=True).routing)
    # K_A = 1 per head, 2 heads: every application makes 2 selections per token, head h in [3h, 3h+3)
    c = acc.counts
    assert c.shape == (2, 2, 6) and c.sum().item() == 4 * 16 * 2
    assert c[..., :3].sum().item() == c[..., 3:].sum().item() == 4 * 16


def test_plots_without_matplotlib_name_the_extra(monkeypatch):
    import sys

    from moeut.report import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"moeut\[analysis\]"):
        pyplot()
