"""`moeut export-hf`: files, transformers loading (with and without moeut), logits, cache, generate, tokenizer."""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from moeut.integrations.hf.tokenizer import ROUND_TRIP_TEXTS
from tests.run_helpers import load_model
from tests.data.helpers import make_documents
from tests.integrations.conftest import unregister_moeut_auto, need_hf
from tests.integrations.helpers import STEP, TINY, left_padded, logits_tol, make_run, until_eos

PROMPTS = [[5, 17, 33, 40], [7], [11, 12, 13, 14, 15, 16, 17], [250, 251]]  # no special ids (pad would be masked)


def _texts() -> list[str]:
    rng = random.Random(1)
    alphabet = list("abcdefghij klmnop Document the and 0123456789\n\t.,!?éü東京🙂—") + ["  ", "the ", " and"]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    return ROUND_TRIP_TEXTS + make_documents(30, seed=11) + fuzz


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (3, 19), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, :7] = 0
    mask[2, :18] = 0  # a single real token
    return tokens, mask


def _hf_model(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


# ------------------------------------------------------------------------------------------------ files
def test_export_writes_a_transformers_directory(export_dir, run_dir, tokenizer):
    names = {p.name for p in export_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "configuration_moeut.py",
            "modeling_moeut.py", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= names
    cfg = json.loads((export_dir / "config.json").read_text())
    assert cfg["model_type"] == "moeut" and cfg["architectures"] == ["MoEUTForCausalLM"]
    assert cfg["auto_map"] == {"AutoConfig": "configuration_moeut.MoEUTConfig",
                               "AutoModel": "modeling_moeut.MoEUTModel",
                               "AutoModelForCausalLM": "modeling_moeut.MoEUTForCausalLM"}
    assert cfg["max_position_embeddings"] == TINY["moeut"]["context_length"]
    assert cfg["num_hidden_layers"] == 6 and cfg["group_size"] == 2 and cfg["tie_word_embeddings"] is False
    assert cfg["moeut_step"] == STEP and cfg["moeut_tokenizer_sha256"] == tokenizer.sha256
    assert cfg["eos_token_id"] == tokenizer.eos_id
    gen = json.loads((export_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tokenizer.eos_id and gen["pad_token_id"] == tokenizer.pad_id

    from safetensors.torch import load_file

    from moeut.integrations.hf import to_hf_state_dict

    saved = load_file(str(export_dir / "model.safetensors"))
    want = to_hf_state_dict(load_model(run_dir).state_dict())
    assert saved.keys() == want.keys()
    assert all(torch.equal(saved[k], want[k]) for k in want)


def test_exported_code_imports_only_torch_and_transformers(export_dir):
    for name in ("configuration_moeut.py", "modeling_moeut.py"):
        tree = ast.parse((export_dir / name).read_text())
        for node in tree.body:  # top level, outside try/except
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"<relative>"} if node.level else {node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"inspect", "math", "dataclasses", "typing", "torch", "transformers", "<relative>"}, (name, roots)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m == "moeut" or m.startswith("moeut.") for m in mods), name


# ------------------------------------------------------------------------------- transformers, in process
def test_logits_aux_loss_and_weights_match_moeut(export_dir, run_dir):
    ref = load_model(run_dir)
    hf = _hf_model(export_dir, trust_remote_code=True)
    assert type(hf).__module__.startswith("transformers_modules")
    # loading must not re-initialise anything (experts, routers): every tensor is the trained one
    from moeut.integrations.hf import from_hf_state_dict

    got = from_hf_state_dict(hf.state_dict())
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())

    tokens, mask = _batch(ref.cfg.vocab_size)
    with torch.no_grad():
        want = ref(tokens, attention_mask=mask, output_routing=True)
        out = hf(input_ids=tokens, attention_mask=mask, output_router_logits=True)
        plain_ref, plain = ref(tokens, output_routing=True), hf(input_ids=tokens, labels=tokens, output_hidden_states=True)
        trained = hf(input_ids=tokens, labels=tokens, output_router_logits=True)
    assert (out.logits - want.logits).abs().max().item() <= logits_tol(want.logits)
    assert (plain.logits - plain_ref.logits).abs().max().item() <= logits_tol(plain_ref.logits)
    assert out.aux_loss.item() == pytest.approx(want.reg_loss.item(), abs=1e-6)
    assert plain.aux_loss is None  # eval mode without output_router_logits: no regulariser computed
    ce = torch.nn.functional.cross_entropy(plain_ref.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert plain.loss.item() == pytest.approx(ce.item(), rel=1e-5)
    assert trained.loss.item() == pytest.approx(ce.item() + plain_ref.reg_loss.item(), rel=1e-5)
    assert len(plain.hidden_states) == ref.cfg.n_layers + 1
    assert len(trained.router_logits) == ref.cfg.n_layers


def test_gradients_match_moeut(export_dir, run_dir):
    """Fine-tuning through transformers: loss (CE + aux with output_router_logits) and its gradients."""
    from moeut.integrations.hf import from_hf_state_dict

    ref = load_model(run_dir).train()
    hf = _hf_model(export_dir, trust_remote_code=True).train()
    tokens, _ = _batch(ref.cfg.vocab_size)
    out = ref(tokens)
    loss_ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()) + out.reg_loss
    loss_ref.backward()
    loss = hf(input_ids=tokens, labels=tokens, output_router_logits=True).loss
    loss.backward()
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    grads = from_hf_state_dict({k: p.grad for k, p in hf.named_parameters()})
    for k, p in ref.named_parameters():
        assert torch.allclose(grads[k], p.grad, rtol=1e-4, atol=1e-6), k


def test_cache_is_indexed_by_layer_application_and_matches_full_forward(export_dir):
    from transformers import DynamicCache

    hf = _hf_model(export_dir, trust_remote_code=True)
    tokens, mask = _batch(hf.config.vocab_size)
    with torch.no_grad():
        full = hf(input_ids=tokens, attention_mask=mask, use_cache=False).logits
        cache = DynamicCache()
        first = hf(input_ids=tokens[:, :11], attention_mask=mask[:, :11], cache=cache, use_cache=True)
        steps = [first.logits]
        for t in range(11, tokens.shape[1]):
            steps.append(hf(input_ids=tokens[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache,
                            use_cache=True).logits)
    assert len(cache) == hf.config.num_hidden_layers == 6  # one entry per application r·G + g
    assert cache.get_seq_length() == tokens.shape[1]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_greedy_generate_equals_moeut(export_dir, run_dir, tokenizer):
    ref = load_model(run_dir)
    hf = _hf_model(export_dir, trust_remote_code=True)
    want = ref.generate(PROMPTS, 14, temperature=0, eos_id=tokenizer.eos_id)
    tokens, mask = left_padded(PROMPTS, tokenizer.pad_id)
    out = hf.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=14, do_sample=False)
    got = until_eos(out[:, tokens.shape[1]:].tolist(), tokenizer.eos_id)
    assert got == want
    # each prompt alone, no padding (transformers drops the all-ones mask)
    for p, w in zip(PROMPTS, want):
        alone = hf.generate(input_ids=torch.tensor([p]), max_new_tokens=14, do_sample=False)
        assert until_eos(alone[:, len(p):].tolist(), tokenizer.eos_id)[0] == w


def test_tokenizer_round_trips_like_sentencepiece(export_dir, tokenizer):
    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(str(export_dir), trust_remote_code=True)
    for text in _texts():
        ids = tokenizer.encode(text)
        assert at(text)["input_ids"] == ids, text
        assert at.decode(ids) == tokenizer.decode(ids) == text, text
    assert at.eos_token_id == tokenizer.eos_id and at.pad_token_id == tokenizer.pad_id
    assert at.decode([tokenizer.eos_id] + tokenizer.encode("hi"), skip_special_tokens=True) == "hi"


@pytest.fixture
def registered():
    from moeut.integrations import hf as moeut_hf

    moeut_hf.register()
    moeut_hf.register()  # idempotent
    yield
    unregister_moeut_auto()  # so that other tests load the remote code


def test_register_makes_it_load_without_remote_code(registered, export_dir, run_dir, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from moeut.integrations.hf import MoEUTConfig, MoEUTForCausalLM

    assert isinstance(AutoConfig.from_pretrained(str(export_dir)), MoEUTConfig)
    hf = AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()
    assert type(hf) is MoEUTForCausalLM
    assert AutoTokenizer.from_pretrained(str(export_dir))("the cat")["input_ids"] == tokenizer.encode("the cat")
    tokens, mask = _batch(hf.config.vocab_size)
    with torch.no_grad():
        want = load_model(run_dir)(tokens, attention_mask=mask).logits
        err = (hf(input_ids=tokens, attention_mask=mask).logits - want).abs().max().item()
    assert err <= logits_tol(want)
    # a fresh model (no checkpoint) gets moeut's initialisation: finite, of the right scale
    fresh = MoEUTForCausalLM(hf.config)
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    assert fresh.model.layers[0].ffn.keys.std().item() == pytest.approx((2 / 6) ** 0.5 / 24 ** 0.5, rel=0.15)


# ------------------------------------------------------------------------- transformers, without moeut
def _paths_without_moeut() -> tuple[list[str], bool]:
    """This interpreter's import path minus the repository and moeut's source folder (an editable install);
    and whether moeut must be blocked in the child (installed into the same site-packages as torch)."""
    repo = Path(__file__).resolve().parents[2]
    paths, block = [], False
    for p in [*sys.path, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]:
        if not p or not Path(p).is_dir() or Path(p).resolve() == repo or p in paths:
            continue
        if (Path(p) / "moeut" / "__init__.py").exists():
            if not (Path(p) / "torch").is_dir():
                continue  # moeut's own source folder
            block = True
        paths.append(p)
    return paths, block


@pytest.mark.slow
def test_loads_where_moeut_is_not_installed(export_dir, run_dir, tokenizer, tmp_path):
    """A fresh interpreter (-I -S) with only the venv's site-packages: `import moeut` fails there."""
    ref = load_model(run_dir)
    tokens, mask = _batch(ref.cfg.vocab_size)
    prompt_tokens, prompt_mask = left_padded(PROMPTS, tokenizer.pad_id)
    with torch.no_grad():
        out = ref(tokens, attention_mask=mask, output_routing=True)
    greedy = ref.generate(PROMPTS, 12, temperature=0, eos_id=tokenizer.eos_id)
    torch.save({"tokens": tokens, "mask": mask, "logits": out.logits, "reg_loss": out.reg_loss,
                "prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask, "max_new_tokens": torch.tensor(12),
                "eos_id": torch.tensor(tokenizer.eos_id)}, tmp_path / "inputs.pt")
    texts = _texts()[:60]
    paths, block = _paths_without_moeut()
    job = {"paths": paths, "export": str(export_dir), "inputs": str(tmp_path / "inputs.pt"),
           "result": str(tmp_path / "result.json"), "texts": texts,
           "sp_ids": [tokenizer.encode(t) for t in texts], "block_moeut": block}
    (tmp_path / "job.json").write_text(json.dumps(job))
    child = tmp_path / "child" / "hf_child.py"
    child.parent.mkdir()
    shutil.copyfile(Path(__file__).with_name("hf_child.py"), child)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([sys.executable, "-I", "-S", str(child), str(tmp_path / "job.json")], cwd=tmp_path,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())

    import transformers

    assert res["transformers"] == transformers.__version__  # the child runs the same transformers
    assert res["moeut_importable"] is False and res["modules_with_moeut"] == []
    assert res["model_class"].startswith("transformers_modules.") and res["dtype"] == "torch.float32"
    assert res["logits_max_abs_err"] <= logits_tol(out.logits)
    assert res["aux_loss_err"] <= 1e-6
    assert res["greedy"] == greedy
    assert res["encoded"] == job["sp_ids"]
    assert res["decoded"] == [tokenizer.decode(ids) for ids in job["sp_ids"]] == texts


# ------------------------------------------------------------------------------------ back into moeut
def test_import_back_into_moeut(export_dir, run_dir, tmp_path, capsys):
    from moeut.cli.generate import add_arguments as add_generate_arguments, run as run_generate
    from moeut.integrations.hf import import_hf, import_hf_run

    ref = load_model(run_dir)
    back = import_hf(export_dir)
    assert back.cfg == ref.cfg
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())

    ckpt = import_hf_run(export_dir, tmp_path / "run")
    assert ckpt.name == f"ckpt_{STEP:08d}.pt"
    again = load_model(tmp_path / "run")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ref.state_dict().items())

    import argparse

    for source in (export_dir, tmp_path / "run"):  # `moeut generate` reads both
        p = argparse.ArgumentParser()
        add_generate_arguments(p)
        assert run_generate(p.parse_args(["--checkpoint", str(source), "--prompt", "the cat", "--temperature", "0",
                                          "--max-new-tokens", "6", "--json"])) == 0
    a, b = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert a["new_ids"] == b["new_ids"] == ref.generate([a["prompt_ids"]], 6, temperature=0, eos_id=2)[0]


# --------------------------------------------------------------------------------- variants and errors
@pytest.mark.parametrize("arch,dtype", [("dense", "float32"), ("moeut", "bfloat16")])
def test_export_variants(arch, dtype, tokenizer, tmp_path):
    need_hf()
    from moeut.integrations.hf import export_hf, import_hf

    run = make_run(tmp_path / "run", tokenizer, arch=arch, seed=1)
    out = export_hf(run, tmp_path / "out", dtype=dtype)  # verify=True: logits and tokenizer checked
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == arch and cfg["torch_dtype"] == dtype
    import transformers

    auto = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": "auto"}  # 4.x loads fp32 by default
    hf = _hf_model(out, trust_remote_code=True, **auto)
    assert hf.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    if arch == "dense":
        ref = load_model(run)
        tokens, mask = _batch(ref.cfg.vocab_size)
        with torch.no_grad():
            want = ref(tokens, attention_mask=mask).logits
            err = (hf(input_ids=tokens, attention_mask=mask).logits - want).abs().max().item()
        assert err <= logits_tol(want)
        assert import_hf(out).cfg == ref.cfg


def test_export_cli_and_errors(run_dir, tmp_path, capsys, monkeypatch):
    need_hf()
    import argparse

    from moeut.integrations.hf import ExportError, export_hf
    from moeut.cli.export_hf import add_arguments as add_export_arguments, run as run_export

    p = argparse.ArgumentParser()
    add_export_arguments(p)
    out = tmp_path / "out"
    assert run_export(p.parse_args(["--checkpoint", str(run_dir), "--out", str(out), "--no-verify"])) == 0
    assert "wrote the Hugging Face model directory" in capsys.readouterr().out
    with pytest.raises(ExportError, match="not empty"):
        export_hf(run_dir, out)
    assert run_export(p.parse_args(["--checkpoint", str(out), "--out", str(tmp_path / "back"), "--to-run"])) == 0
    assert load_model(tmp_path / "back").cfg == load_model(run_dir).cfg
    with pytest.raises(FileNotFoundError):
        export_hf(tmp_path / "missing", tmp_path / "x")
    from moeut.data.errors import DependencyError

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if the hf extra were not installed
    with pytest.raises(DependencyError, match=r"pip install 'moeut\[hf\]'"):
        export_hf(run_dir, tmp_path / "y")


@pytest.mark.parametrize("repeats", [1, 5])  # the export has 6 applications of G = 2 layers: trained R = 3
def test_repeats_at_load_and_forward_time_match_moeut_with_the_cache(export_dir, run_dir, tokenizer, repeats):
    from transformers import DynamicCache

    ref = load_model(run_dir)
    hf = _hf_model(export_dir, trust_remote_code=True)
    tokens, mask = _batch(hf.config.vocab_size)
    with torch.no_grad():
        want = ref(tokens, attention_mask=mask, repeats=repeats).logits
        full = hf(input_ids=tokens, attention_mask=mask, use_cache=False, repeats=repeats).logits
        cache = DynamicCache()
        steps = [hf(input_ids=tokens[:, :11], attention_mask=mask[:, :11], cache=cache, repeats=repeats).logits]
        for t in range(11, tokens.shape[1]):
            steps.append(hf(input_ids=tokens[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache,
                            repeats=repeats).logits)
        with pytest.raises(ValueError, match="repeats that filled the cache"):
            hf(input_ids=tokens[:, :1], attention_mask=mask, cache=cache, repeats=repeats + 1)
    assert (full - want).abs().max().item() <= 1e-4
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4
    assert (full - hf(input_ids=tokens, attention_mask=mask, use_cache=False).logits).abs().max() > 1e-3

    at_load = _hf_model(export_dir, trust_remote_code=True, repeats=repeats)
    assert at_load.config.repeats == repeats
    with torch.no_grad():
        assert (at_load(input_ids=tokens, attention_mask=mask, use_cache=False).logits - full).abs().max() <= 1e-5
    prompts = PROMPTS
    expected = ref.generate(prompts, 10, temperature=0, eos_id=tokenizer.eos_id, repeats=repeats)
    padded, pmask = left_padded(prompts, tokenizer.pad_id)
    for model, kw in ((hf, {"repeats": repeats}), (at_load, {})):
        out = model.generate(input_ids=padded, attention_mask=pmask, max_new_tokens=10, do_sample=False, **kw)
        assert until_eos(out[:, padded.shape[1]:].tolist(), tokenizer.eos_id) == expected


def test_load_run_repeats_on_an_export_and_its_config_field(export_dir, run_dir, tmp_path):
    from moeut.run import load_run

    ref = load_model(run_dir)
    tokens, mask = _batch(ref.cfg.vocab_size)
    loaded = load_run(export_dir, device="cpu", require_tokenizer=False, repeats=4)
    assert loaded.trained_repeats == 3 and loaded.config.n_repeats == 4 and loaded.config.n_layers == 8
    with torch.no_grad():
        want = ref(tokens, attention_mask=mask, repeats=4).logits
        assert (loaded.model(tokens, attention_mask=mask).logits - want).abs().max() <= 1e-5
    deeper = tmp_path / "deeper"
    shutil.copytree(export_dir, deeper)
    cfg = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**cfg, "repeats": 4}))
    assert load_model(deeper).cfg.n_repeats == 4
