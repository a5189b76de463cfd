"""ModelConfig validation, presets and their parameter counts."""

from __future__ import annotations

import pytest

from moeut.model import PAPER_PRESETS, PRESETS, ConfigError, ModelConfig
from moeut.model.accounting import model_stats

# The paper's parameter counts (embedding and untied head included, vocabulary 8000), from the issue table.
PAPER_PARAMS = {
    "moeut-44m": 44.3e6, "moeut-126m": 125.7e6, "moeut-244m": 243.3e6, "moeut-318m": 318.1e6,
    "moeut-727m": 727.4e6, "moeut-1b": 1040.3e6,
    "dense-44m": 44.5e6, "dense-126m": 125.7e6, "dense-244m": 243.6e6, "dense-319m": 319.3e6,
    "dense-728m": 728.7e6, "dense-1b": 1044.3e6,
    # σ-MoE baselines (issue 7 table)
    "sigma-moe-44m": 44.1e6, "sigma-moe-126m": 126.1e6, "sigma-moe-244m": 243.8e6, "sigma-moe-319m": 319.7e6,
    "sigma-moe-728m": 731.2e6,
    # SUT and the ablations are parameter-matched to the MoEUT model of their size
    "sut-44m": 44.3e6, "sut-44m-noact": 44.3e6, "sut-244m": 243.3e6, "sut-244m-noact": 243.3e6,
    "moeut-44m-preln": 44.3e6, "moeut-44m-postln": 44.3e6, "moeut-244m-preln": 243.3e6,
    "moeut-244m-postln": 243.3e6, "moeut-244m-g1": 243.3e6, "moeut-244m-g3": 243.3e6, "moeut-244m-g6": 243.3e6,
    "moeut-244m-g9": 243.3e6, "moeut-244m-g18": 243.3e6, "moeut-244m-aabb": 243.3e6,
}


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_preset_parameter_count_within_one_percent(name):
    stats = model_stats(ModelConfig.from_name(name))
    assert stats["params_total"] == pytest.approx(PAPER_PARAMS[name], rel=0.01)


def test_every_paper_preset_has_a_reference_count():
    assert set(PAPER_PRESETS) == set(PAPER_PARAMS)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_small_dense_presets_match_their_moeut_twin(size):
    moe = model_stats(ModelConfig.from_name(f"moeut-{size}"))
    dense = model_stats(ModelConfig.from_name(f"dense-{size}"))
    assert dense["params_total"] == pytest.approx(moe["params_total"], rel=0.01)


def test_moeut_uses_fewer_macs_than_its_dense_twin():
    """Authors' accounting: MoEUT needs 0.6–0.88× the forward MACs of the parameter-matched dense model."""
    pairs = [("moeut-44m", "dense-44m"), ("moeut-244m", "dense-244m"), ("moeut-1b", "dense-1b")]
    for moe, dense in pairs:
        r = (model_stats(ModelConfig.from_name(moe))["macs_per_token_layers"]
             / model_stats(ModelConfig.from_name(dense))["macs_per_token_layers"])
        assert 0.55 < r < 0.9, (moe, r)


def test_odd_rope_width_rounds_down_to_even():
    assert ModelConfig.from_name("moeut-44m").n_rotate == 40  # int(0.5 · 82) = 41 → 40
    assert ModelConfig.from_name("moeut-244m").n_rotate == 64


@pytest.mark.parametrize("change, field", [
    (dict(group_size=3), "group_size"),  # 16 layers
    (dict(ff_k=200), "ff_k"),
    (dict(att_k=9), "att_k"),
    (dict(d_model=0), "d_model"),
    (dict(n_heads=-1), "n_heads"),
    (dict(ff_expert_size=0), "ff_expert_size"),
    (dict(rope_fraction=1.5), "rope_fraction"),
    (dict(arch="rnn"), "arch"),
])
def test_invalid_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field}="):
        ModelConfig.from_name("moeut-44m", **change)


def test_group_size_error_suggests_divisors():
    with pytest.raises(ConfigError, match=r"\[1, 2, 4, 8, 16\]"):
        ModelConfig.from_name("moeut-44m", group_size=3)


def test_unknown_preset_and_field_are_explained():
    with pytest.raises(ConfigError, match="available presets"):
        ModelConfig.from_name("moeut-7b")
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"d_modle": 3})


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_round_trips_through_dict_and_json(name):
    import json

    cfg = ModelConfig.from_name(name)
    assert ModelConfig.from_saved(cfg.to_json()) == cfg
