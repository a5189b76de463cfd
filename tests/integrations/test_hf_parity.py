"""The exported model equals moeut's, architecture family by architecture family.

``modeling_moeut.py`` is a second implementation of the model (it must load where moeut is not installed), so
this file is what keeps the two equal: every family moeut can export goes through ``export_hf`` and is loaded
back with ``trust_remote_code`` (the exported files, not the package's copy), and the logits, the auxiliary
loss, ACT's per-token depth and cached greedy generation of a left-padded batch are compared with moeut's, at
the trained depth and, for shared-layer models, at another ``repeats``. A family added to moeut belongs in
FAMILIES; the export refuses an architecture it has no code for.
"""

from __future__ import annotations

import pytest
import torch

from moeut.model import ModelConfig, build_model
from moeut.run.checkpoint import save_checkpoint
from tests.integrations.conftest import need_hf, unregister_moeut_auto
from tests.integrations.helpers import STEP, left_padded, logits_tol, until_eos



@pytest.fixture(autouse=True)
def _remote_code_not_the_package():
    """Earlier tests may have loaded an export through moeut, which registers the package's classes: this file
    tests the export's own files."""
    unregister_moeut_auto()


PROMPTS = [[5, 17, 33, 40], [7], [11, 12, 13, 14, 15, 16, 17]]  # left-padded into one batch
NEW_TOKENS = 8

_MOEUT = dict(arch="moeut", d_model=32, n_layers=4, group_size=2, n_heads=2, d_head=8, att_n_experts=3, att_k=2,
              ff_n_experts=5, ff_expert_size=8, ff_k=2, context_length=64)
_SUT = dict(arch="sut", d_model=32, n_layers=4, group_size=1, n_heads=2, d_head=8, att_n_experts=3, att_k=2,
            ff_n_experts=5, ff_expert_size=8, ff_k=2, rel_pos_max=4, mi_reg=0.01, context_length=64)
# name -> ModelConfig fields (vocab_size comes from the tokenizer)
FAMILIES: dict[str, dict] = {
    "moeut-abab": _MOEUT,
    "moeut-aabb": {**_MOEUT, "group_order": "aabb"},
    "moeut-pre-ln": {**_MOEUT, "norm_placement": "pre"},
    "moeut-post-ln": {**_MOEUT, "norm_placement": "post"},
    "sigma-moe": {**_MOEUT, "group_size": 4, "att_n_experts": 1, "att_k": 1},  # dense attention, no sharing
    "dense": dict(arch="dense", d_model=32, n_layers=3, group_size=3, n_heads=2, d_head=8, d_ff=48,
                  context_length=64),
    "moeut-act": {**_MOEUT, "act": True, "act_halt_bias_init": -1.0, "act_threshold": 0.6},
    # halted tokens skip their work: the export applies the same semantics with masks
    "moeut-act-skip": {**_MOEUT, "n_layers": 6, "act": True, "act_halt_bias_init": -1.0, "act_threshold": 0.6,
                       "act_halting": "skip"},
    "moeut-act-budget": {**_MOEUT, "n_layers": 6, "act": True, "act_halt_bias_init": -1.0, "act_threshold": 0.6,
                         "act_halting": "skip", "act_target_depth": 2.0, "act_depth_entropy": 0.05},
    # loss-free balancing: family_model gives the selection biases non-zero values, so they change the routing
    "moeut-loss-free": {**_MOEUT, "balancing": "loss_free"},
    "sut": {**_SUT, "act": False},
    "sut-act": {**_SUT, "act": True},
}
# (family, repeats): every family at its trained depth (None), shared-layer ones also deeper or shallower
CASES = [(name, None) for name in FAMILIES] + [("moeut-abab", 3), ("moeut-aabb", 1), ("moeut-post-ln", 3),
                                               ("moeut-act", 3), ("moeut-act-skip", 4), ("sut-act", 6),
                                               ("moeut-loss-free", 3)]


def family_model(name: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A moeut model of family ``name`` with weights that exercise it: a sharper head (greedy paths far from
    ties), random halting gates (tokens halt at different depths, some freeze), SUT relative positions and random
    loss-free balancing selection biases (other experts chosen than without them)."""
    cfg = ModelConfig(vocab_size=vocab_size, **FAMILIES[name])
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        gates = [model.halting] if getattr(model, "halting", None) is not None else []
        gates += [layer.halting for layer in model.layers if getattr(layer, "halting", None) is not None]
        for gate in gates:
            torch.nn.init.normal_(gate.out.weight, 0, 3.0)
        for layer in model.layers:
            if hasattr(getattr(layer, "attention", None), "rel_pos"):
                torch.nn.init.normal_(layer.attention.rel_pos)
        if getattr(getattr(model, "halting", None), "halt_shift", None) is not None:  # the budget's shift, moved
            model.halting.halt_shift.fill_(0.7)
            model.act_lambda.fill_(0.3)
        for biases in getattr(model, "selection_biases", dict)().values():
            for bias in biases:
                torch.nn.init.normal_(bias, 0, 0.3)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """``exported(name)``: (moeut model, the export of it loaded by transformers from its remote code, the
    exported directory), built once per family for this module."""
    need_hf()
    done: dict[str, tuple] = {}

    def get(name: str):
        if name not in done:
            model = family_model(name, tokenizer.vocab_size)
            done[name] = model, *_load_export(model, tokenizer, tmp_path_factory.mktemp(name))
        return done[name]

    return get


def _load_export(model, tokenizer, root):
    """Save ``model`` as a run, ``export_hf`` it (the comparisons here are the verification) and load the
    export with ``trust_remote_code``: the exported files run, not the package's copy of them."""
    from transformers import AutoModelForCausalLM

    from moeut.integrations.hf import export_hf

    tokenizer.save(root / "run")
    save_checkpoint(root / "run", STEP, {"model": model.state_dict(), "model_config": model.cfg.to_json(),
                                         "train_config": "{}", "tokenizer_sha256": tokenizer.sha256})
    out = export_hf(root / "run", root / "export", verify=False)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(hf).__module__.startswith("transformers_modules."), type(hf).__module__
    return hf, out


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 13 tokens, the second left-padded by 5."""
    tokens = torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0
    return tokens, mask


@pytest.mark.parametrize("name,repeats", CASES, ids=[f"{n}-R{r or 'trained'}" for n, r in CASES])
def test_export_equals_moeut(exported, tokenizer, name, repeats):
    ref, hf, _ = exported(name)
    tokens, mask = _batch(ref.cfg.vocab_size)
    with torch.no_grad():
        want = ref(tokens, attention_mask=mask, output_routing=True, repeats=repeats)
        got = hf(input_ids=tokens, attention_mask=mask, output_router_logits=True, repeats=repeats)
    err = (got.logits - want.logits).abs().max().item()
    assert err <= logits_tol(want.logits), f"logits differ by {err:.3g}"
    assert got.aux_loss.item() == pytest.approx(want.reg_loss.item(), abs=1e-6)
    if ref.cfg.arch != "dense":  # the MLP router logits, one entry per layer application
        assert len(got.router_logits) == ref.cfg.applications(repeats)
    assert (got.depth is None) == (want.depth is None)
    if want.depth is not None:
        torch.testing.assert_close(got.depth, want.depth, atol=1e-6, rtol=1e-6)
        assert want.depth.std() > 0.05, "halting should depend on the token here"
    # cached greedy decoding of one left-padded batch
    expected = ref.generate(PROMPTS, NEW_TOKENS, temperature=0, eos_id=tokenizer.eos_id, repeats=repeats)
    padded, pmask = left_padded(PROMPTS, tokenizer.pad_id)
    out = hf.generate(input_ids=padded, attention_mask=pmask, max_new_tokens=NEW_TOKENS, do_sample=False,
                      repeats=repeats)
    assert until_eos(out[:, padded.shape[1]:].tolist(), tokenizer.eos_id) == expected


def test_every_exportable_architecture_is_covered():
    from moeut.integrations.hf.export import EXPORTABLE_ARCHS

    assert {kw["arch"] for kw in FAMILIES.values()} == set(EXPORTABLE_ARCHS)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_imports_back_with_the_same_config(exported, name):
    from moeut.integrations.hf import import_hf

    ref, _, out = exported(name)
    back = import_hf(out)
    assert back.cfg == ref.cfg
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())


# ------------------------------------------------------------------------------------------ initialisation
# wider than FAMILIES, so that each tensor's statistics are estimated well enough to compare
_WIDE = dict(d_model=128, d_head=32, ff_expert_size=32, d_ff=256)


def _pooled_init(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor kind (its name without the layer index) with every layer's values pooled, flattened."""
    pooled: dict[str, list[torch.Tensor]] = {}
    for key, t in state.items():
        parts = key.split(".")
        kind = ".".join(p for i, p in enumerate(parts) if not (p.isdigit() and parts[i - 1] == "layers"))
        pooled.setdefault(kind, []).append(t.detach().float().flatten())
    return {k: torch.cat(v) for k, v in pooled.items()}


def _kurtosis(x: torch.Tensor) -> float:
    z = (x - x.mean()) / x.std()
    return z.pow(4).mean().item()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fresh_init_is_moeuts(exported, name):
    """A model the exported code creates (no checkpoint: fine-tuning from scratch, a resized head) is initialised
    as moeut initialises one: deterministic tensors (LayerNorms, zero biases, the halting gates) equal,
    random ones of the same mean, std and shape of distribution (normal or uniform)."""
    from moeut.integrations.hf import hf_config_dict, to_hf_state_dict

    _, hf, _ = exported(name)
    cfg = ModelConfig(vocab_size=256, **{**FAMILIES[name], **_WIDE})
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(to_hf_state_dict(build_model(cfg).state_dict()))
    fixed = {k for k in states[0] if torch.equal(states[0][k], states[1][k])}  # the same for every seed
    config = type(hf.config)(**hf_config_dict(cfg, bos_id=1, eos_id=2, pad_id=3))
    torch.manual_seed(2)
    fresh = type(hf)(config).state_dict()  # the exported (remote) class, as from_config builds it
    assert fresh.keys() == states[0].keys()
    for key in fixed:
        assert torch.equal(fresh[key], states[0][key]), key
    want, got = _pooled_init({k: v for k, v in states[0].items() if k not in fixed}), _pooled_init(fresh)
    for kind, a in want.items():
        b, n = got[kind], a.numel()
        assert b.std().item() == pytest.approx(a.std().item(), rel=5 / (2 * n) ** 0.5), kind
        assert abs(b.mean().item() - a.mean().item()) <= 5 * a.std().item() * (2 / n) ** 0.5, kind
        if n >= 4096:  # normal (kurtosis 3) or uniform (1.8)
            assert _kurtosis(b) == pytest.approx(_kurtosis(a), abs=0.5), kind


def test_loss_free_export_reproduces_the_biased_selection(exported, tokenizer):
    """The export chooses experts with the trained selection bias: its logits are moeut's with the bias, and far
    from moeut's with the bias zeroed (so the parity above would catch an export that dropped it)."""
    ref, hf, _ = exported("moeut-loss-free")
    assert any(b.abs().sum() > 0 for b in hf.buffers())
    tokens, mask = _batch(ref.cfg.vocab_size)
    unbiased = family_model("moeut-loss-free", tokenizer.vocab_size)
    with torch.no_grad():
        for bias in unbiased.buffers():
            bias.zero_()
        want = ref(tokens, attention_mask=mask, output_routing=True)
        got = hf(input_ids=tokens, attention_mask=mask, output_router_logits=True)
        other = unbiased(tokens, attention_mask=mask, output_routing=True)
    assert (got.logits - want.logits).abs().max().item() <= logits_tol(want.logits)
    assert (other.logits - want.logits).abs().max().item() > 100 * logits_tol(want.logits)
    assert not torch.equal(other.expert_counts["ffn"], want.expert_counts["ffn"])
    assert got.aux_loss.item() == 0.0  # no entropy regulariser under loss_free
