"""Eval mode computes no regulariser and no routing counts unless asked (output_routing=True); the logits do
not depend on it, and training mode is unchanged."""

from __future__ import annotations

import pytest
import torch

from moeut.model import build_model
from moeut.model.lm import LMOutput
from tests.model.helpers import sut_config, tiny_config

CONFIGS = {"moeut": lambda: tiny_config(), "dense": lambda: tiny_config("dense"), "sut": lambda: sut_config(),
           "sigma-moe": lambda: tiny_config(group_size=6, att_n_experts=1, att_k=1)}


def _pair(name):
    torch.manual_seed(0)
    return build_model(CONFIGS[name]()), torch.randint(0, 53, (2, 7))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_mode_skips_the_regulariser_and_counts(name, monkeypatch):
    model, tokens = _pair(name)
    model.eval()
    called = []
    import moeut.model.lm as lm_mod
    import moeut.model.sut as sut_mod

    for mod, fn in ((lm_mod, "entropy_of_mean_softmax"), (lm_mod, "expert_counts"),
                    (sut_mod, "mutual_information_loss"), (sut_mod, "expert_counts"), (sut_mod, "expected_depth")):
        orig = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _o=orig, _n=fn, **k: (called.append(_n), _o(*a, **k))[1])
    with torch.no_grad():
        out = model(tokens)
    assert out.reg_loss is None and out.expert_counts is None and out.routing is None
    assert called == []  # nothing of the regulariser or the statistics ran
    # asked for: computed in eval mode too, with identical logits
    with torch.no_grad():
        asked = model(tokens, output_routing=True)
    assert asked.reg_loss is not None and asked.routing is not None
    torch.testing.assert_close(out.logits, asked.logits, rtol=0, atol=0)
    if name != "dense":
        assert called and asked.expert_counts is not None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_mode_still_computes_everything(name):
    model, tokens = _pair(name)
    model.train()
    out = model(tokens)
    assert out.reg_loss is not None and out.reg_loss.shape == () and out.reg_loss.requires_grad == (name != "dense")
    assert (out.expert_counts is None) == (name == "dense")
    # the training-mode value equals the eval-mode value on request (no dropout, no sampling here)
    model.eval()
    asked = model(tokens, output_routing=True)
    assert asked.reg_loss.item() == pytest.approx(out.reg_loss.item(), abs=1e-7)
    torch.testing.assert_close(asked.logits, out.logits)


def test_loss_adds_the_regulariser_only_when_computed():
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert LMOutput(logits, None).loss(targets).item() == pytest.approx(ce.item())
    assert LMOutput(logits, torch.tensor(0.25)).loss(targets).item() == pytest.approx(ce.item() + 0.25)
