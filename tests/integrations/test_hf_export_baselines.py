"""`moeut export-hf` of the baselines and ablations: σ-MoE, pre-/post-LN, A A B B grouping and SUT round-trip
through transformers (logits, aux loss, greedy generate, import back)."""

from __future__ import annotations

import pytest
import torch

from moeut.model import ModelConfig, build_model
from tests.run_helpers import load_model
from moeut.run.checkpoint import save_checkpoint
from tests.integrations.conftest import need_hf
from tests.integrations.helpers import STEP, TINY, make_run

PROMPTS = [[5, 17, 33, 40], [7], [11, 12, 13, 14, 15, 16, 17]]
VARIANTS = {
    "preln": dict(norm_placement="pre"),
    "postln": dict(norm_placement="post"),
    "aabb": dict(group_order="aabb", group_size=3),
    "sigma-moe": dict(group_size=6, att_n_experts=1, att_k=1),
}


def _run(root, tokenizer, cfg: ModelConfig, seed: int = 0):
    return make_run(root, tokenizer, seed=seed, cfg=cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_exports_and_round_trips(variant, tokenizer, tmp_path):
    need_hf()
    from transformers import AutoModelForCausalLM

    from moeut.integrations.hf import export_hf, import_hf

    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, **{**TINY["moeut"], **VARIANTS[variant]})
    run = _run(tmp_path / "run", tokenizer, cfg)
    out = export_hf(run, tmp_path / "out")  # verify=True: logits ≤ 1e-4 and tokenizer checked by the exporter
    ref = load_model(run)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert hf.config.norm_placement == cfg.norm_placement and hf.config.group_order == cfg.group_order
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0
    with torch.no_grad():
        want, got = ref(tokens, attention_mask=mask, output_routing=True), hf(input_ids=tokens, attention_mask=mask,
                                                                              output_router_logits=True)
    assert (got.logits - want.logits).abs().max().item() <= 1e-5
    assert got.aux_loss.item() == pytest.approx(want.reg_loss.item(), abs=1e-6)
    # router logits in application order: application i runs layer cfg.layer_index(i)
    layer_of = [cfg.layer_index(i) for i in range(cfg.n_layers)]
    first = [i for i, g_ in enumerate(layer_of) if g_ == layer_of[0]]
    assert len(got.router_logits) == cfg.n_layers and len(first) == cfg.n_repeats
    greedy = ref.generate(PROMPTS, 10, temperature=0)
    for p, w in zip(PROMPTS, greedy):
        alone = hf.generate(input_ids=torch.tensor([p]), max_new_tokens=10, do_sample=False)
        assert alone[0, len(p):].tolist()[:len(w)] == w
    assert import_hf(out).cfg == ref.cfg


@pytest.mark.parametrize("act", [True, False])
def test_sut_exports_and_round_trips(act, tokenizer, tmp_path):
    """SUT (ACT halting with non-trivial gates, so tokens freeze): logits, aux loss, cached greedy generate."""
    need_hf()
    from transformers import AutoModelForCausalLM

    from moeut.integrations.hf import export_hf, import_hf

    cfg = ModelConfig(arch="sut", vocab_size=tokenizer.vocab_size, d_model=24, n_layers=5, group_size=1, n_heads=2,
                      d_head=6, att_n_experts=3, att_k=2, ff_n_experts=5, ff_expert_size=8, ff_k=2, rel_pos_max=4,
                      act=act, mi_reg=0.01, context_length=64)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for layer in model.layers:
            if layer.halting is not None:
                torch.nn.init.normal_(layer.halting.out.weight, 0, 3.0)
            torch.nn.init.normal_(layer.attention.rel_pos)
    tokenizer.save(tmp_path / "run")
    save_checkpoint(tmp_path / "run", STEP, {"model": model.state_dict(), "model_config": cfg.to_json(),
                                             "train_config": "{}", "tokenizer_sha256": tokenizer.sha256})
    out = export_hf(tmp_path / "run", tmp_path / "out")
    ref = load_model(tmp_path / "run")
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0
    with torch.no_grad():
        want, got = ref(tokens, attention_mask=mask, output_routing=True), hf(input_ids=tokens, attention_mask=mask,
                                                                              output_router_logits=True)
        plain = hf(input_ids=tokens, attention_mask=mask)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)  # logits up to ±20 here
    assert got.aux_loss.item() == pytest.approx(want.reg_loss.item(), abs=1e-6)
    assert plain.aux_loss is None  # eval mode: no regulariser unless asked
    torch.testing.assert_close(plain.logits, got.logits, atol=0, rtol=0)
    greedy = ref.generate(PROMPTS, 10, temperature=0)
    for p, w in zip(PROMPTS, greedy):
        alone = hf.generate(input_ids=torch.tensor([p]), max_new_tokens=10, do_sample=False)
        assert alone[0, len(p):].tolist()[:len(w)] == w
    assert import_hf(out).cfg == ref.cfg
