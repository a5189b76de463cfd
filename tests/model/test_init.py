"""Initialisation as the paper's training code (RobertCsordas/moeut_training_code): σ-MoE router rows not
renormalised; SwitchHead V/O experts renormalised across the expert axis (moe.att.norm_init) in the presets of
the ≥126M paper runs. Init only: the forward pass is unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from moeut.model import ModelConfig, MoEUTLM
from moeut.model.attention import SwitchHead, renorm_over_experts_keep_std
from moeut.model.config import ConfigError
from moeut.model.moe import SigmaMoE
from moeut.model.presets import ATT_NORM_INIT_PRESETS, PRESETS
from tests.model.helpers import tiny_config

MOEUT_PRESETS = [n for n, p in PRESETS.items() if p["arch"] == "moeut"]


def _std_scale(cfg: ModelConfig) -> float:
    return 1.0 if cfg.norm_placement == "post" else math.sqrt(2 / cfg.n_layers)


@pytest.mark.parametrize("name", MOEUT_PRESETS)
def test_norm_init_is_set_exactly_for_the_126m_and_larger_paper_runs(name):
    cfg = ModelConfig.from_name(name)
    big = cfg.d_model >= 768  # 126M and up; the 44M (d 412) and CPU presets are smaller
    assert cfg.att_norm_init is big
    assert (name in ATT_NORM_INIT_PRESETS) is big


@pytest.mark.parametrize("name", MOEUT_PRESETS)
def test_switchhead_init_statistics_per_preset(name):
    """V/O experts keep the training code's std; with norm_init every (input, output) position has the same
    norm across the H·N_A experts, without it the norms spread like a χ variable."""
    cfg = ModelConfig.from_name(name)
    torch.manual_seed(0)
    att = SwitchHead(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.att_n_experts, cfg.att_k,
                     norm_init=cfg.att_norm_init)
    s = _std_scale(cfg)
    att.reset_parameters(s)
    assert att.v.std().item() == pytest.approx(s / math.sqrt(cfg.d_model), rel=0.02)
    assert att.o.std().item() == pytest.approx(s / math.sqrt(cfg.n_heads * cfg.d_head), rel=0.02)
    for w in (att.v, att.o):
        norms = w.norm(dim=0)
        spread = (norms.std() / norms.mean()).item()
        if cfg.att_norm_init:
            assert spread < 1e-5
        else:
            assert spread > 0.05


@pytest.mark.parametrize("name", ["moeut-tiny", "moeut-small", "moeut-44m", "sigma-moe-44m", "moeut-126m"])
def test_sigma_moe_router_is_plain_normal(name):
    cfg = ModelConfig.from_name(name)
    torch.manual_seed(0)
    ffn = SigmaMoE(cfg.d_model, cfg.ff_n_experts, cfg.ff_expert_size, cfg.ff_k)
    s = _std_scale(cfg)
    ffn.reset_parameters(s)
    d = cfg.d_model
    assert ffn.expert_sel.std().item() == pytest.approx(s / math.sqrt(d), rel=0.05)
    assert ffn.keys.std().item() == pytest.approx(s / math.sqrt(d), rel=0.02)
    assert ffn.values.std().item() == pytest.approx(s / math.sqrt(cfg.ff_n_experts * cfg.ff_expert_size), rel=0.02)
    # no row renormalisation: the row norms scatter as those of N(0, σ²) vectors (relative std ≈ 1/√(2d))
    rel = (ffn.expert_sel.norm(dim=1).std() / ffn.expert_sel.norm(dim=1).mean()).item()
    assert 0.4 / math.sqrt(2 * d) < rel < 2.0 / math.sqrt(2 * d)


def test_sigma_moe_init_is_exactly_the_normal_draw():
    """Same seed, same draws as the training code's order-free statement: expert_sel is N(0, s/√d) untouched."""
    cfg = tiny_config()
    ffn = SigmaMoE(cfg.d_model, cfg.ff_n_experts, cfg.ff_expert_size, cfg.ff_k)
    torch.manual_seed(5)
    ffn.reset_parameters(0.5)
    torch.manual_seed(5)
    want = torch.randn(cfg.ff_n_experts, cfg.d_model) * (0.5 / math.sqrt(cfg.d_model))
    torch.testing.assert_close(ffn.expert_sel.detach(), want)


def test_renorm_over_experts_on_a_hand_made_tensor():
    w = torch.tensor([[[3.0, 1.0]], [[4.0, 0.0]]])  # [experts=2, in=1, out=2]
    std = w.std()
    renorm_over_experts_keep_std(w)
    # column (0,0): (3,4)/5; column (0,1): (1,0)/1; then rescaled to the original std
    unit = torch.tensor([[[0.6, 1.0]], [[0.8, 0.0]]])
    torch.testing.assert_close(w, unit * (std / unit.std()))
    assert w.std().item() == pytest.approx(std.item())


def test_norm_init_changes_only_the_init():
    cfg = tiny_config()
    torch.manual_seed(0)
    plain = MoEUTLM(cfg).eval()
    torch.manual_seed(0)
    normed = MoEUTLM(cfg.replace(att_norm_init=True)).eval()
    diff = [k for k in plain.state_dict() if not torch.equal(plain.state_dict()[k], normed.state_dict()[k])]
    assert sorted(diff) == sorted(f"layers.{g}.attention.{p}" for g in range(cfg.group_size) for p in ("v", "o"))
    normed.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    torch.testing.assert_close(normed(tokens).logits, plain(tokens).logits, rtol=0, atol=0)


def test_norm_init_needs_switchhead():
    with pytest.raises(ConfigError, match="att_norm_init"):
        tiny_config("dense", att_norm_init=True)
