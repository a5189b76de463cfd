"""MoEUT with ACT (``act=True``): stick-breaking halting over applications of the whole group of G layers.

The KV cache and left padding stay exact while tokens halt and freeze, the deep-start bias sets the initial
depth, the ACT loss is the one of the SUT code (added at every halting application), and configs written before
MoEUT had ACT keep loading as the models they are."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeut.model import ConfigError, ModelConfig, build_model
from moeut.model.config import SCHEMA_VERSION
from tests.model.helpers import decode_in_steps, tiny_config

# tiny_config: n_layers 6, G = 2: at most 3 group applications (2 halting decisions)


def act_model(seed: int = 0, **kw) -> torch.nn.Module:
    """A MoEUT ACT model whose halting gate is random (token-dependent halting; the init one is uniform) and
    whose threshold freezes tokens within the few group applications of the tests."""
    torch.manual_seed(seed)
    m = build_model(tiny_config(act=True, **{"act_threshold": 0.6, **kw})).eval()
    with torch.no_grad():
        m.halting.out.weight.normal_(0, 1.0)
        m.lm_head.weight.mul_(20)  # sharpen the distribution so greedy paths are not near ties
    return m


def _tokens(vocab: int, shape=(3, 13), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _analytic_depths(g_halt: float, n_groups: int) -> list[float]:
    """E[depth]_r (applications beyond the first) after each halting step r = 1 … n−1 for a constant gate."""
    out = []
    for r in range(1, n_groups):
        p = [(1 - g_halt) ** (s - 1) * g_halt for s in range(1, r + 1)]
        out.append(sum((s - 1) * ps for s, ps in zip(range(1, r + 1), p)) + (1 - g_halt) ** r * r)
    return out


def test_some_tokens_freeze_and_others_do_not():
    model = act_model()
    with torch.no_grad():
        depth = model(_tokens(53)).depth
    assert depth.shape == (3, 13)
    assert depth.min() >= 1 and depth.max() <= 3
    assert depth.std() > 0.05  # token-dependent halting


@pytest.mark.parametrize("repeats", [None, 2, 5])
def test_cached_decoding_equals_the_full_pass_with_left_padding(repeats):
    model = act_model()
    tokens = _tokens(53)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = model(tokens, attention_mask=mask, repeats=repeats)
        steps, depths = decode_in_steps(model, tokens, mask, 6, repeats)
    torch.testing.assert_close(steps, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(depths, ref.depth, rtol=1e-5, atol=1e-6)
    never_frozen = build_model(model.cfg.replace(act_threshold=1 - 1e-9)).eval()
    never_frozen.load_state_dict(model.state_dict())
    with torch.no_grad():
        unfrozen = never_frozen(tokens, attention_mask=mask, repeats=repeats).logits
    assert (unfrozen - ref.logits).abs().max() > 1e-3, "no token froze: the test would not test freezing"


@pytest.mark.slow
def test_generate_cached_and_batched_equal_uncached_and_one_by_one():
    model = act_model()
    prompts = [[5, 7, 9, 11], [3], [1, 2, 3, 4, 5, 6, 7]]
    for r in (None, 4):
        cached = model.generate(prompts, 8, temperature=0, repeats=r)
        assert cached == model.generate(prompts, 8, temperature=0, repeats=r, use_cache=False), r
        assert cached == [model.generate([p], 8, temperature=0, repeats=r)[0] for p in prompts], r


def test_tokens_that_halt_at_once_keep_the_first_groups_state_exactly():
    torch.manual_seed(1)
    model = build_model(tiny_config(act=True, act_halt_bias_init=12.0)).eval()  # g_halt ≈ 1: freeze at r = 1
    tokens = _tokens(53)
    with torch.no_grad():
        one = model(tokens, repeats=1)
        three = model(tokens, repeats=3)
    torch.testing.assert_close(three.logits, one.logits, rtol=0, atol=0)
    torch.testing.assert_close(one.depth, torch.ones(3, 13), rtol=0, atol=0)
    assert (three.depth - 1).abs().max() < 1e-4


@pytest.mark.parametrize("bias", [0.0, -3.0])
def test_initial_depth_and_act_loss_follow_the_halt_bias(bias):
    """At init the gate's weight is zero, so g_halt = σ(bias) for every token: the expected depth and the ACT
    loss (act_reg · Σ_r mean E[depth]_r, the SUT code's) have closed forms."""
    cfg = tiny_config(act=True, act_halt_bias_init=bias)
    torch.manual_seed(2)
    model = build_model(cfg).train()
    tokens = _tokens(53, (2, 9))
    g = 1 / (1 + math.exp(-bias))
    expected = _analytic_depths(g, 3)
    torch.manual_seed(3)
    out = model(tokens)
    torch.testing.assert_close(out.depth, torch.full((2, 9), 1 + expected[-1]), rtol=1e-5, atol=1e-5)
    no_act_loss = build_model(cfg.replace(act_reg=0.0))
    no_act_loss.load_state_dict(model.state_dict())
    torch.manual_seed(3)
    base = no_act_loss.train()(tokens).reg_loss
    torch.testing.assert_close(out.reg_loss - base, torch.tensor(cfg.act_reg * sum(expected)), rtol=1e-5, atol=1e-7)
    if bias < 0:
        assert out.depth.mean() > 2.8  # deep start: tokens initially use (almost) every group application


def test_the_halting_gate_learns_from_the_loss():
    model = act_model().train()
    tokens = _tokens(53, (2, 9))
    out = model(tokens)
    out.loss(tokens.roll(-1, 1)).backward()
    for name, p in model.halting.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_depth_is_none_without_act_and_the_model_has_no_gate():
    model = build_model(tiny_config())
    assert model.halting is None and model.cfg.act is False
    assert model(_tokens(53)).depth is None
    assert not any("halting" in k for k in model.state_dict())


def test_configs_written_before_moeut_had_act_keep_act_off():
    """Every config saved before the schema version (version 1) carried ``act: true`` (it meant something for
    SUT only); one without ``act_halt_bias_init`` predates MoEUT's ACT and loads with act off. Saved configs now
    carry ``schema_version``; a dict of fields as given (a preset with overrides) is never upgraded."""
    old = tiny_config().to_dict()
    del old["act_halt_bias_init"]
    old["act"] = True
    assert ModelConfig.from_saved(old).act is False
    assert ModelConfig.from_saved({**old, "act_halt_bias_init": 0.0}).act is True
    assert ModelConfig.from_dict(old).act is True  # fields as given mean what they say
    assert ModelConfig.from_name("moeut-tiny", act=True).act is True
    sut = ModelConfig.from_name("sut-tiny").to_dict()
    del sut["act_halt_bias_init"]
    assert ModelConfig.from_saved(sut).act is True
    assert ModelConfig.from_name("moeut-tiny").act is False and ModelConfig.from_name("sut-tiny").act is True
    saved = json.loads(ModelConfig.from_name("moeut-tiny-act").to_json())
    assert saved["schema_version"] == SCHEMA_VERSION and ModelConfig.from_saved(saved).act is True


def test_a_config_from_a_newer_moeut_is_refused_with_the_fix():
    saved = {**tiny_config().to_dict(), "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(ConfigError, match="model_config.json has schema_version .* upgrade moeut"):
        ModelConfig.from_saved(saved, source="model_config.json")


@pytest.mark.parametrize("kw, field", [
    (dict(arch="dense", act=True), "act"),
    (dict(act=True, group_order="aabb"), "group_order"),
    (dict(act_halt_bias_init=-3.0), "act_halt_bias_init"),
    (dict(act=True, act_threshold=1.0), "act_threshold"),
])
def test_bad_act_settings_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}="):
        tiny_config(**kw) if kw.get("arch") != "dense" else tiny_config("dense", act=True)


def test_presets_exist_and_build():
    for name, max_groups in (("moeut-tiny-act", 4), ("moeut-44m-act", 8)):
        cfg = ModelConfig.from_name(name)
        assert cfg.act and cfg.act_halt_bias_init < 0 and cfg.n_repeats == max_groups
    tiny = build_model(ModelConfig.from_name("moeut-tiny-act"))
    assert tiny.halting is not None


def test_depth_metrics_mean_quantiles_and_histogram():
    from moeut.train.metrics import depth_metrics  # the training stage's logging of LMOutput.depth

    m = depth_metrics(torch.tensor([1.0, 1.2, 2.6, 3.0, 3.0]), max_depth=3)
    assert m["act/mean_depth"] == pytest.approx(2.16)
    assert m["act/depth_p50"] == pytest.approx(2.6)
    assert [m[f"act/depth_frac/{k}"] for k in (1, 2, 3)] == pytest.approx([0.4, 0.0, 0.6])
