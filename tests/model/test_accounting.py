"""MAC accounting: the authors' formulas (paper/moe_universal/common.py of moeut_training_code) on hand-computed
configs and on the paper's own 44M runs (args copied from their sweep files), and moeut's own count."""

from __future__ import annotations

import pytest

from moeut.model import ModelConfig
from moeut.model.accounting import (model_stats, paper_attention_flops, paper_ff_flops, paper_flops,
                                    paper_macs_per_token, paper_train_flops)

SMALL_MOEUT = dict(arch="moeut", vocab_size=50, d_model=8, n_layers=4, group_size=2, n_heads=2, d_head=4,
                   att_n_experts=3, att_k=2, ff_n_experts=5, ff_expert_size=6, ff_k=2)


def test_paper_formulas_on_a_hand_computed_moeut():
    cfg = ModelConfig(**SMALL_MOEUT)
    T = 10
    # attention: 2·H·d_h·T² = 1600; (2·K_A + 2)·d·H·d_h·T = 6·8·2·4·10 = 3840; 2·H·K_A·d_h·T = 320;
    # 2·N_A·d·T = 480
    assert paper_attention_flops(cfg, T) == 1600 + 3840 + 320 + 480
    # feed-forward: 2·T·d·d_e·K = 1920; T·d·N_E = 400
    assert paper_ff_flops(cfg, T) == 1920 + 400
    assert paper_flops(cfg, T) == 4 * (6240 + 2320)
    assert paper_macs_per_token(cfg, T) == pytest.approx(4 * (6240 + 2320) / 10)
    assert paper_train_flops(cfg, steps=7, batch_size=3, context=T) == 4 * (6240 + 2320) * 7 * 3


def test_paper_formulas_on_a_hand_computed_dense():
    cfg = ModelConfig(arch="dense", vocab_size=50, d_model=8, n_layers=3, group_size=3, n_heads=2, d_head=4,
                      d_ff=16)
    # attention 2·H·d_h·T² + 4·d·H·d_h·T = 1600 + 2560; MLP 2·d·d_ff·T = 2560
    assert paper_attention_flops(cfg, 10) == 4160
    assert paper_ff_flops(cfg, 10) == 2560
    assert paper_flops(cfg, 10) == 3 * (4160 + 2560)


def test_paper_44m_runs_from_their_sweep_args():
    """c4_moeut_small_matched_rope_noln_long (state_size 412, 16 layers, 4 heads × 82, moe.att.n_experts 8,
    moe.att.k 2, moe.n_experts 155 × 128, pkm.n_heads 12, unroll 1024, batch 64, stop_after 100000) and
    c4_baseline_small_rope_long_nodrop (10 heads × 41, ff_multiplier 4.985 → d_ff int(412·4.985) = 2053)."""
    T = 1024
    att = 4 * 82 * T ** 2 * 2 + (2 * 2 + 2) * 412 * 4 * 82 * T + 2 * 4 * 2 * T * 82 + 2 * 8 * 412 * T
    ff = 2 * T * 412 * 128 * 12 + T * 412 * 155
    moeut = ModelConfig.from_name("moeut-44m")
    assert paper_flops(moeut, T) == (att + ff) * 16
    assert paper_train_flops(moeut, 100_000, 64, T) == (att + ff) * 16 * 100_000 * 64
    dense = ModelConfig.from_name("dense-44m")
    assert dense.d_ff == int(412 * 4.985)
    d_att = 10 * 41 * T ** 2 * 2 + 4 * 412 * 10 * 41 * T
    assert paper_flops(dense, T) == (d_att + 2 * 412 * 2053 * T) * 16


def test_sigma_moe_uses_the_moeut_formula_with_one_expert_per_head():
    cfg = ModelConfig.from_name("sigma-moe-44m")
    T = 1024
    att = 4 * 82 * T ** 2 * 2 + (2 * 1 + 2) * 412 * 4 * 82 * T + 2 * 4 * 1 * T * 82 + 2 * 1 * 412 * T
    assert paper_attention_flops(cfg, T) == att


def test_sut_has_no_paper_formula():
    cfg = ModelConfig.from_name("sut-tiny")
    with pytest.raises(ValueError, match="SUT"):
        paper_flops(cfg, 256)
    stats = model_stats(cfg)
    assert stats["paper_macs_per_token"] is None and stats["macs_per_token"] > 0


def test_model_stats_reports_both_counts_labelled():
    cfg = ModelConfig(**SMALL_MOEUT)
    s = model_stats(cfg, context=10)
    assert s["paper_macs_per_sequence"] == paper_flops(cfg, 10)
    assert s["paper_macs_per_token"] == pytest.approx(paper_flops(cfg, 10) / 10)
    # moeut's own count: per-head routers (2·d·H·N_A), O gate mixing over d, and the output head
    d, H, dh, T = 8, 2, 4, 10
    att = 2 * d * H * dh + 2 * 2 * d * H * dh + 2 * H * dh * T + 2 * d * H * 3 + 2 * H * (dh + d)
    mlp = 2 * d * 6 * 2 + d * 5
    assert s["macs_per_token"] == 4 * (att + mlp) + d * 50


def test_bad_context_is_refused():
    with pytest.raises(ValueError, match="context"):
        paper_flops(ModelConfig(**SMALL_MOEUT), 0)


def test_executed_macs_of_an_adaptive_model():
    """At full depth the executed count is `moeut info`'s; every token at 2 of 4 group applications runs the
    layers' half plus its gates and its keys and values at each distinct layer — under 0.55 of the full layers."""
    import torch

    from moeut.model.accounting import executed_macs_per_token, halted_kv_macs, layer_macs

    cfg = ModelConfig.from_name("moeut-tiny-adaptive")
    full = model_stats(cfg, 256)
    at4 = executed_macs_per_token(cfg, torch.full((5,), 4.0), 256)
    assert at4 == {"layer_macs_per_token": full["macs_per_token_layers"], "macs_per_token": full["macs_per_token"]}
    at2 = executed_macs_per_token(cfg, torch.full((5,), 2.0), 256)
    per_group = 2 * sum(layer_macs(cfg, 256).values())
    gate = cfg.d_model ** 2 + 2 * cfg.d_model
    assert at2["layer_macs_per_token"] == 2 * per_group + 2 * gate + 2 * halted_kv_macs(cfg)
    assert at2["layer_macs_per_token"] / at4["layer_macs_per_token"] < 0.55
    mixed = executed_macs_per_token(cfg, torch.tensor([1.0, 4.0]), 256)  # the mean over tokens
    one = executed_macs_per_token(cfg, torch.tensor([1.0]), 256)
    assert mixed["macs_per_token"] == (one["macs_per_token"] + at4["macs_per_token"]) / 2
