from __future__ import annotations

from moeut.model import ModelConfig


def tiny_config(arch: str = "moeut", **kw) -> ModelConfig:
    """A few-thousand-parameter model for fast tests (odd sizes on purpose)."""
    if arch == "dense":
        base = dict(arch="dense", vocab_size=53, d_model=24, n_layers=3, group_size=3, n_heads=3, d_head=10,
                    d_ff=40)
    else:
        base = dict(arch="moeut", vocab_size=53, d_model=24, n_layers=6, group_size=2, n_heads=3, d_head=10,
                    att_n_experts=3, att_k=2, ff_n_experts=7, ff_expert_size=8, ff_k=3)
    return ModelConfig(**{**base, **kw})


def sut_config(**kw) -> ModelConfig:
    """A tiny SUT (4 applications of one layer) for fast tests."""
    base = dict(arch="sut", vocab_size=53, d_model=24, n_layers=4, group_size=1, n_heads=2, d_head=6,
                att_n_experts=4, att_k=2, ff_n_experts=7, ff_expert_size=8, ff_k=3, rel_pos_max=5)
    return ModelConfig(**{**base, **kw})
