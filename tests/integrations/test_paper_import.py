"""The paper's released checkpoints (written by RobertCsordas/moeut_training_code): fixture A reproduced through
``moeut.from_paper_checkpoint`` and through the run directory ``moeut import-paper`` writes; the restricted
reader; the variants mapped from the training code's sources (export → import round trips)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moeut
from moeut.cli import main
from moeut.integrations.paper import (PaperCheckpointError, UnsafeCheckpointError, UnsupportedVariantError,
                                      read_paper_checkpoint, to_paper_checkpoint)
from moeut.integrations.paper.convert import name_map
from moeut.model import ModelConfig, build_model
from moeut.model.regularizer import entropy_of_mean_softmax
from tests.run_helpers import load_model
from tests.conftest import shared_file

TOL = 1e-5
FIXTURE = "fixtures/paper_checkpoint_a"


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(shared_file(f"{FIXTURE}/expected_outputs.pt"), weights_only=True)


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return shared_file(f"{FIXTURE}/checkpoints/C4_A.ckpt")


@pytest.fixture(scope="module")
def spm_model() -> Path:
    return shared_file(f"{FIXTURE}/cache/C4/C4-en-512/tokenizer.model.model")


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory, ckpt, spm_model) -> Path:
    run = tmp_path_factory.mktemp("paper") / "run"
    assert main(["import-paper", str(ckpt), "--tokenizer", str(spm_model), "--out", str(run)]) == 0
    return run


@pytest.fixture(params=["cpu_tagged", "cuda_tagged", "run_dir"])
def model(request, ckpt, imported_run):
    if request.param == "run_dir":
        return load_model(imported_run)
    name = "C4_A.ckpt" if request.param == "cpu_tagged" else "C4_A.cuda_tagged.ckpt"
    return moeut.from_paper_checkpoint(shared_file(f"{FIXTURE}/checkpoints/{name}"))


def _reg_terms(model, routing) -> dict[str, torch.Tensor]:
    """The three regulariser terms of the training code's logs, from moeut's per-application routing."""
    cfg = model.cfg
    per_layer = [[r for i, r in enumerate(routing) if cfg.layer_index(i) == g] for g in range(cfg.group_size)]
    terms = {}
    for name, field, weight in (("reg_ffn", "ffn", cfg.entropy_reg), ("reg_att_v", "att_v", cfg.att_entropy_reg),
                                ("reg_att_o", "att_o", cfg.att_entropy_reg)):
        terms[name] = weight * sum(entropy_of_mean_softmax([getattr(r, field).logits for r in rs]) for rs in per_layer)
    return terms


def test_eval_logits_ce_and_hidden_states(model, expected):
    assert not model.training
    tokens = expected["input_ids"]
    with torch.no_grad():
        out = model(tokens[:, :-1], output_hidden_states=True)
    assert out.logits.shape == (2, 32, 512)
    torch.testing.assert_close(out.logits, expected["logits"], atol=TOL, rtol=0)
    ce = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(ce.item() - expected["ce_loss"].item()) <= TOL
    hidden = torch.stack(out.hidden_states)
    torch.testing.assert_close(hidden, expected["hidden_states"], atol=TOL, rtol=0)
    torch.testing.assert_close(model.out_norm(out.hidden_states[-1]), expected["final_hidden"], atol=TOL, rtol=0)


def test_training_losses_regulariser_terms_and_every_gradient(model, expected):
    model.train()
    tokens = expected["input_ids"]
    out = model(tokens[:, :-1], output_routing=True)
    torch.testing.assert_close(out.logits, expected["logits_train"], atol=TOL, rtol=0)
    ce = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(ce.item() - expected["ce_loss_train"].item()) <= TOL
    for name, value in _reg_terms(model, out.routing).items():
        assert abs(value.item() - expected[name].item()) <= TOL, name
    assert abs(out.reg_loss.item() - expected["reg_loss"].item()) <= TOL
    total = ce + out.reg_loss
    assert abs(total.item() - expected["total_loss"].item()) <= TOL
    total.backward()
    theirs = name_map(model.cfg)
    params = dict(model.named_parameters())
    assert {theirs[k] for k in params} == set(expected["grads"])
    for ours, p in params.items():
        torch.testing.assert_close(p.grad, expected["grads"][theirs[ours]], atol=TOL, rtol=0,
                                   msg=lambda m: f"{theirs[ours]}: {m}")


def test_config_read_from_the_raw_arguments(ckpt):
    cfg = moeut.from_paper_checkpoint(ckpt).cfg
    fixture_cfg = json.loads(shared_file(f"{FIXTURE}/config.json").read_text())["model"]
    assert (cfg.arch, cfg.norm_placement, cfg.group_order) == ("moeut", "peri", "abab")
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.group_size, cfg.n_heads, cfg.d_head) == tuple(
        fixture_cfg[k] for k in ("vocab_size", "d_model", "n_layers", "group_size", "n_heads", "d_head"))
    assert (cfg.att_n_experts, cfg.att_k, cfg.ff_n_experts, cfg.ff_expert_size, cfg.ff_k, cfg.n_rotate) == tuple(
        fixture_cfg[k] for k in ("att_n_experts", "att_k", "ff_n_experts", "ff_expert_size", "ff_k", "rope_n_rotate"))
    assert (cfg.entropy_reg, cfg.att_entropy_reg, cfg.context_length) == (0.01, 0.001, 32)


def test_cuda_tagged_file_needs_and_gets_map_location(ckpt):
    cuda_file = shared_file(f"{FIXTURE}/checkpoints/C4_A.cuda_tagged.ckpt")
    a, b = read_paper_checkpoint(ckpt)["model"], read_paper_checkpoint(cuda_file)["model"]
    assert all(v.device.type == "cpu" and torch.equal(v, a[k]) for k, v in b.items())


# ------------------------------------------------------------------------------------------ the restricted reader
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state": {"iter": 1}, "run_invariants": {"args": {}}, "model": {"x": torch.zeros(1)},
                "scaler": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        moeut.from_paper_checkpoint(path)
    assert err.value.globals == ["builtins.exec"] and "builtins.exec" in str(err.value)
    assert main(["import-paper", str(path), "--tokenizer", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "builtins.exec" in capsys.readouterr().err
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a trusting load runs it
    assert marker.read_text() == "ran"


def test_other_globals_are_refused_by_name(tmp_path, ckpt):
    import argparse

    ck = read_paper_checkpoint(ckpt)
    ck["run_invariants"]["namespace"] = argparse.Namespace(a=1)
    torch.save(ck, tmp_path / "ns.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        read_paper_checkpoint(tmp_path / "ns.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    with pytest.raises(PaperCheckpointError, match="not a torch.save zip"):
        read_paper_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"model": {}}, tmp_path / "other.ckpt")
    with pytest.raises(PaperCheckpointError, match="run_invariants"):
        read_paper_checkpoint(tmp_path / "other.ckpt")


# ------------------------------------------------------------------------------------------- arguments, variants
def _with_args(ckpt: Path, tmp_path: Path, **changes) -> Path:
    ck = read_paper_checkpoint(ckpt)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            ck["run_invariants"]["args"].pop(key)
        else:
            ck["run_invariants"]["args"][key] = value
    path = tmp_path / "changed.ckpt"
    torch.save(ck, path)
    return path


def test_unknown_arguments_are_tolerated(tmp_path, ckpt, expected):
    path = _with_args(ckpt, tmp_path, moe__layer_encoding="none", some__future_option="7", details_log_interval=None)
    with torch.no_grad():
        logits = moeut.from_paper_checkpoint(path)(expected["input_ids"][:, :-1]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=TOL, rtol=0)


@pytest.mark.parametrize("arg,value", [
    ("transformer.variant", "preln_sut_universal"), ("transformer.variant", "rope"),
    ("lm.trafo.context_blocks", 1), ("moe.att.q_expert", 1), ("moe.att.same_sel", "1"),
    ("moe.selection_mode", "gate"), ("moe.att.selection_mode", "softmax"), ("transformer.activation", "gelu"),
    ("embedding_size", "128"), ("lm.trafo.norm_input", 1), ("moe.perplexity_reg_mode", "step"),
    ("transformer.embedding_scale", "8.0"), ("transformer.universal.group_type", "abba"),
])
def test_variants_moeut_cannot_represent_are_refused_naming_the_argument(tmp_path, ckpt, arg, value):
    path = _with_args(ckpt, tmp_path, **{arg.replace(".", "__"): value})
    with pytest.raises(UnsupportedVariantError) as err:
        moeut.from_paper_checkpoint(path)
    assert err.value.arg == arg and arg in str(err.value) and repr(value) in str(err.value)


def test_wrong_weights_for_the_arguments_are_an_error(tmp_path, ckpt):
    with pytest.raises(PaperCheckpointError, match="shape"):
        moeut.from_paper_checkpoint(_with_args(ckpt, tmp_path, moe__expert_size="32"))


# The variants below are mapped from the training code's sources; they are checked by round trips only.
_SMALL = dict(vocab_size=64, d_model=24, n_layers=4, n_heads=2, d_head=10, att_n_experts=3, att_k=2,
              ff_n_experts=6, ff_expert_size=8, ff_k=2, context_length=16)
VARIANTS = {
    "moeut-peri-aabb": ModelConfig(**_SMALL, group_size=2, group_order="aabb"),
    "sigma-moe": ModelConfig(**{**_SMALL, "att_n_experts": 1, "att_k": 1}, group_size=4),
    "moeut-pre": ModelConfig(**_SMALL, group_size=2, norm_placement="pre"),
    "moeut-post": ModelConfig(**_SMALL, group_size=2, norm_placement="post"),
    "dense": ModelConfig(arch="dense", vocab_size=64, d_model=24, n_layers=3, group_size=3, n_heads=2, d_head=10,
                         d_ff=48, context_length=16),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_import_round_trip(name, tmp_path):
    cfg = VARIANTS[name]
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    with torch.no_grad():  # LayerNorm parameters away from their init, so a swapped norm would show
        for n, p in model.named_parameters():
            if "ln" in n or "norm" in n or "lm_head.bias" in n:
                p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path / "export.ckpt"
    torch.save(to_paper_checkpoint(model, step=123), path)
    back = moeut.from_paper_checkpoint(path)
    assert back.cfg == cfg
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model(tokens).logits)


def test_exported_arguments_are_raw_like_the_training_code(tmp_path):
    ck = to_paper_checkpoint(build_model(VARIANTS["moeut-post"]))
    args = ck["run_invariants"]["args"]
    assert args["transformer.variant"] == "moe_universal" and args["lm.trafo.norm_input"] == 1
    assert args["transformer.head_projection_size"] == "10" and args["moe.att.perplexity_reg"] == "0.001"
    assert "unique_layers.0.norm1.weight" in ck["model"] and "out_norm.weight" not in ck["model"]
    dense = to_paper_checkpoint(build_model(VARIANTS["dense"]))["model"]
    assert dense["unique_layers.2.self_attn.data_to_kv.weight"].shape == (2 * 2 * 10, 24)
    assert "unique_layers.0.linear1.bias" in dense


# ---------------------------------------------------------------------------------------------------- the run
def test_import_paper_writes_a_normal_run(imported_run, spm_model):
    from moeut.data import Tokenizer
    from moeut.run import latest_checkpoint

    path, state = latest_checkpoint(imported_run)
    assert path.name == "ckpt_00000040.pt" and state["step"] == 40
    assert state["tokenizer_sha256"] == Tokenizer(spm_model).sha256 == Tokenizer.load(imported_run).sha256
    assert json.loads((imported_run / "model_config.json").read_text()) == json.loads(state["model_config"])


def test_import_finds_the_release_tokenizer_and_refuses_a_used_directory(tmp_path, ckpt, capsys):
    assert main(["import-paper", str(ckpt), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "tokenizer.model").is_file()
    assert main(["import-paper", str(ckpt), "--out", str(tmp_path / "run")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_eval_and_generate_run_on_the_imported_run(imported_run, tmp_path, capsys):
    text = shared_file("data/jane_austen/persuasion.txt").read_text()[:4000]
    data = tmp_path / "ppl.txt"
    data.write_text(text)
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(imported_run), "--tasks", "ppl", "--ppl-data", str(data),
                 "--json", str(out_json), "--device", "cpu"]) == 0
    result = json.loads(out_json.read_text())
    assert "ppl" in json.dumps(result)
    assert main(["generate", "--checkpoint", str(imported_run), "--prompt", "It is a truth universally",
                 "--max-new-tokens", "8", "--seed", "0"]) == 0
    assert "It is a truth universally" in capsys.readouterr().out


def test_analyze_and_export_hf_accept_the_imported_run(imported_run, tmp_path, capsys):
    from tests.integrations.conftest import need_hf

    text = tmp_path / "text.txt"
    text.write_text(shared_file("data/jane_austen/persuasion.txt").read_text()[:3000])
    assert main(["analyze", "expert-usage", "--checkpoint", str(imported_run), "--data", str(text), "--batches", "1",
                 "--batch-size", "2", "--out", str(tmp_path / "usage"), "--no-progress"]) == 0
    assert any((tmp_path / "usage").iterdir())
    need_hf()
    # the exporter verifies logits and the tokenizer (release normalisation, unknown pieces) itself
    assert main(["export-hf", "--checkpoint", str(imported_run), "--out", str(tmp_path / "hf")]) == 0
    assert "verified" in capsys.readouterr().out


def test_an_imported_run_is_fine_tuned_with_init_from_and_its_own_tokenizer(imported_run, tmp_path):
    """`moeut train --init-from RUN` without --preset takes the paper model's configuration and weights; the data
    is prepared with the release tokenizer (nmt_nfkc normalisation)."""
    from moeut.run import latest_checkpoint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shared_file("data/MANIFEST.md").read_text(encoding="utf-8") * 4, encoding="utf-8")
    data = tmp_path / "data"
    assert main(["prepare", "--input", str(corpus), "--out", str(data), "--tokenizer",
                 str(imported_run / "tokenizer.model"), "--doc-separator", "blank", "--val-fraction", "0.2",
                 "--quiet"]) == 0
    run = tmp_path / "ft"
    assert main(["train", "--init-from", str(imported_run), "--data", str(data), "--out", str(run), "--steps", "1",
                 "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--save-every", "1",
                 "--no-progress"]) == 0
    source = load_model(imported_run)
    tuned = load_model(run)
    assert tuned.cfg == source.cfg  # the whole model configuration came from the source
    state = latest_checkpoint(run)[1]
    assert state["step"] == 1 and all(s["step"] == 1 for s in state["optimizer"]["state"].values())
    lr = json.loads((run / "train_config.json").read_text())["lr"]
    step = max((v - source.state_dict()[k]).abs().max().item() for k, v in tuned.state_dict().items())
    assert 0 < step <= 1.01 * lr  # one AdamW step (|update| <= lr) away from the paper's weights
