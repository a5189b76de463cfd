"""`moeut export-hf` of MoEUT with ACT beyond what every family gets in test_hf_parity (logits, aux loss, depth,
cached generation, import back): gradients through the halting gate, its fresh init, configs from before ACT."""

from __future__ import annotations

import pytest
import torch

from moeut.model import ModelConfig, build_model
from tests.run_helpers import load_model
from moeut.run.checkpoint import save_checkpoint
from tests.integrations.conftest import need_hf
from tests.integrations.helpers import STEP, TINY

PROMPTS = [[5, 17, 33, 40], [7], [11, 12, 13, 14, 15, 16, 17]]


def test_moeut_act_exports_and_round_trips(tokenizer, tmp_path):
    """moeut-tiny-act at the tests' tiny size, with a random halting gate and a threshold at which tokens freeze:
    logits, aux loss (ACT loss included), per-token depth, gradients, the cache, left-padded batches, repeats."""
    need_hf()

    from moeut.integrations.hf import import_hf

    cfg = ModelConfig.from_name("moeut-tiny-act", vocab_size=tokenizer.vocab_size,
                                **{**TINY["moeut"], "act_threshold": 0.6})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        torch.nn.init.normal_(model.halting.out.weight, 0, 1.0)
    out, ref, hf = _export(model, cfg, tokenizer, tmp_path)
    assert hf.config.act is True and hf.config.act_halt_bias_init == cfg.act_halt_bias_init
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0
    for r in (None, 5):
        with torch.no_grad():
            want = ref(tokens, attention_mask=mask, output_routing=True, repeats=r)
            got = hf(input_ids=tokens, attention_mask=mask, output_router_logits=True, repeats=r)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.depth, want.depth, atol=1e-6, rtol=1e-6)
        assert got.aux_loss.item() == pytest.approx(want.reg_loss.item(), abs=1e-6)
    assert want.depth.std() > 0.05  # token-dependent halting
    # gradients, the halting gate's included
    ref.train(), hf.train()
    mine = ref(tokens)
    (torch.nn.functional.cross_entropy(mine.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
     + mine.reg_loss).backward()
    hf(input_ids=tokens, labels=tokens, output_router_logits=True).loss.backward()  # HF shifts the labels inside
    for name in ("out.weight", "out.bias", "hidden.weight", "norm.weight"):
        a, b = dict(ref.halting.named_parameters())[name].grad, dict(hf.model.halting.named_parameters())[name].grad
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
    ref.eval(), hf.eval()
    # cached greedy decoding of a left-padded batch equals moeut's, which equals each prompt alone
    greedy = ref.generate(PROMPTS, 10, temperature=0)
    assert greedy == [ref.generate([p], 10, temperature=0)[0] for p in PROMPTS]
    for p, w in zip(PROMPTS, greedy):
        alone = hf.generate(input_ids=torch.tensor([p]), max_new_tokens=10, do_sample=False)
        assert alone[0, len(p):].tolist()[:len(w)] == w
    assert import_hf(out).cfg == ref.cfg


def test_moeut_act_fresh_hf_init_and_configs_from_before_act(tokenizer):
    need_hf()
    from moeut.integrations.hf import MoEUTConfig, MoEUTForCausalLM

    kw = dict(arch="moeut", vocab_size=64, hidden_size=24, num_hidden_layers=6, group_size=2, num_attention_heads=3,
              head_dim=10, att_n_experts=3, ff_n_experts=7, ff_expert_size=8, ff_k=3)
    fresh = MoEUTForCausalLM(MoEUTConfig(**kw, act=True, act_halt_bias_init=-3.0))
    assert torch.equal(fresh.model.halting.out.bias.detach(), torch.tensor([0.0, -3.0]))
    assert not fresh.model.halting.out.weight.detach().any()
    # an export written before MoEUT had ACT says act: true without act_halt_bias_init: no halting gate
    assert MoEUTConfig(**kw, act=True).act is False and MoEUTConfig(**kw).act is False
    assert MoEUTConfig(**{**kw, "arch": "sut", "group_size": 1}).act is True


def _export(model, cfg, tokenizer, tmp_path):
    """Save ``model`` as a run, export it, and load both sides: (export dir, moeut model, transformers model)."""
    from transformers import AutoModelForCausalLM

    from moeut.integrations.hf import export_hf

    tokenizer.save(tmp_path / "run")
    save_checkpoint(tmp_path / "run", STEP, {"model": model.state_dict(), "model_config": cfg.to_json(),
                                             "train_config": "{}", "tokenizer_sha256": tokenizer.sha256})
    out = export_hf(tmp_path / "run", tmp_path / "out")
    return out, load_model(tmp_path / "run"), AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
