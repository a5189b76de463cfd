"""Fixture A: outputs of the authors' reference implementation must be reproduced to 1e-5 (fp32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moeut.model import config_from_reference, from_reference, to_reference
from tests.conftest import shared_file

TOL = 1e-5


@pytest.fixture(scope="module")
def fixture_a() -> dict:
    return torch.load(shared_file("fixtures/reference_parity_a.pt"), weights_only=True)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_logits_ce_reg_and_every_gradient_match_reference(fixture_a, backend):
    model = from_reference(fixture_a["state_dict"], json.loads(fixture_a["config"]), backend=backend).train()
    tokens = fixture_a["tokens"]
    out = model(tokens[:, :-1])
    ce = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(out.logits, fixture_a["logits"], atol=TOL, rtol=0)
    assert abs(ce.item() - fixture_a["ce_loss"].item()) <= TOL
    assert abs(out.reg_loss.item() - fixture_a["reg_loss"].item()) <= TOL
    (ce + out.reg_loss).backward()
    grads = {k: p.grad for k, p in zip(to_reference(model), model.parameters())}
    params = dict(model.named_parameters())
    for ref_key, ref_grad in fixture_a["grads"].items():
        our_key = ref_key.replace("transformer.layers.", "layers.")
        torch.testing.assert_close(params[our_key].grad, ref_grad, atol=TOL, rtol=0, msg=lambda m: f"{ref_key}: {m}")
    assert set(grads) == set(fixture_a["grads"])


def test_eval_mode_logits_match_reference(fixture_a):
    model = from_reference(fixture_a["state_dict"], json.loads(fixture_a["config"])).eval()
    with torch.no_grad():
        out = model(fixture_a["tokens"][:, :-1])
    torch.testing.assert_close(out.logits, fixture_a["logits_eval"], atol=TOL, rtol=0)


def test_to_reference_inverts_from_reference(fixture_a):
    model = from_reference(fixture_a["state_dict"], json.loads(fixture_a["config"]))
    back = to_reference(model)
    assert set(back) == set(fixture_a["state_dict"])
    for k, v in fixture_a["state_dict"].items():
        assert torch.equal(back[k], v), k


def test_reference_config_names_map_to_model_config():
    cfg = config_from_reference(dict(n_tokens=100, d_model=64, n_layers=4, n_heads=2, ff_n_experts=8,
                                     att_n_experts=3, d_head=16, ff_k=2))
    assert (cfg.vocab_size, cfg.att_k, cfg.ff_expert_size, cfg.group_size) == (100, 2, 128, 2)


def test_from_reference_rejects_mismatching_config(fixture_a):
    cfg = json.loads(fixture_a["config"])
    cfg["ff_n_experts"] += 1
    with pytest.raises(ValueError, match="ffn"):
        from_reference(fixture_a["state_dict"], cfg)


@pytest.mark.gpu
def test_reference_parity_on_cuda(fixture_a):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = from_reference(fixture_a["state_dict"], json.loads(fixture_a["config"])).cuda().train()
    tokens = fixture_a["tokens"].cuda()
    out = model(tokens[:, :-1])
    torch.testing.assert_close(out.logits.cpu(), fixture_a["logits"], atol=1e-4, rtol=0)
    assert abs(out.reg_loss.item() - fixture_a["reg_loss"].item()) <= 1e-5


@pytest.mark.gpu
def test_bf16_autocast_training_step_on_cuda(fixture_a):
    model = from_reference(fixture_a["state_dict"], json.loads(fixture_a["config"])).cuda().train()
    tokens = fixture_a["tokens"].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(tokens[:, :-1])
    assert out.reg_loss.dtype == torch.float32
    loss = out.loss(tokens[:, 1:])
    assert abs(loss.item() - (fixture_a["ce_loss"] + fixture_a["reg_loss"]).item()) < 0.05
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
