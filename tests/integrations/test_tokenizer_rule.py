"""One tokenizer rule for every verb that loads a run: a --tokenizer other than the one the run recorded stops
eval, generate, analyze and export-hf with the same named error (exit 2, no traceback), and
--allow-tokenizer-mismatch lets each of them go on with a warning."""

from __future__ import annotations

import pytest

from moeut.cli import main
from moeut.data.tokenizer import TokenizerConfig, train_tokenizer
from moeut.run import OVERRIDE_FLAG, RunTokenizerMismatch, load_run
from tests.data.helpers import make_documents
from tests.integrations.conftest import need_hf


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, tokenizer):
    tok = train_tokenizer(make_documents(200), tmp_path_factory.mktemp("other-tok"), TokenizerConfig(vocab_size=400))
    assert tok.vocab_size == tokenizer.vocab_size and tok.sha256 != tokenizer.sha256
    return tok


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "held_out.txt"
    p.write_text(" ".join(make_documents(40)))
    return p


def _verb_args(verb: str, run_dir, text_file, tmp_path) -> list[str]:
    return {
        "eval": ["eval", "--checkpoint", str(run_dir), "--tasks", "ppl", "--ppl-data", str(text_file),
                 "--no-progress"],
        "generate": ["generate", "--checkpoint", str(run_dir), "--prompt", "Once", "--max-new-tokens", "3",
                     "--temperature", "0", "--json"],
        "analyze": ["analyze", "expert-usage", "--checkpoint", str(run_dir), "--data", str(text_file),
                    "--batches", "1", "--out", str(tmp_path / "an"), "--no-progress"],
        "export-hf": ["export-hf", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"), "--no-verify"],
    }[verb]


VERBS = ["eval", "generate", "analyze", "export-hf"]


def test_load_run_refuses_a_tokenizer_the_run_was_not_trained_with(run_dir, other_tokenizer, tokenizer):
    with pytest.raises(RunTokenizerMismatch, match=r"tokenizer mismatch: .* --allow-tokenizer-mismatch"):
        load_run(run_dir, tokenizer=other_tokenizer.model_path, device="cpu")
    assert load_run(run_dir, tokenizer=tokenizer.model_path, device="cpu").tokenizer.sha256 == tokenizer.sha256
    loaded = load_run(run_dir, tokenizer=other_tokenizer.model_path, device="cpu", allow_tokenizer_mismatch=True)
    assert loaded.tokenizer.sha256 == other_tokenizer.sha256


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_stops_on_a_mismatched_tokenizer_with_the_same_error(verb, run_dir, other_tokenizer, text_file,
                                                                        tmp_path, capsys):
    if verb == "export-hf":
        need_hf()
    args = _verb_args(verb, run_dir, text_file, tmp_path) + ["--tokenizer", str(other_tokenizer.model_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"moeut {verb}: error: tokenizer mismatch:" in err and OVERRIDE_FLAG in err
    assert "Traceback" not in err


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_accepts_a_mismatched_tokenizer_with_the_override_flag(verb, run_dir, other_tokenizer, text_file,
                                                                          tmp_path, capsys):
    if verb == "export-hf":
        need_hf()
    args = _verb_args(verb, run_dir, text_file, tmp_path) + ["--tokenizer", str(other_tokenizer.model_path),
                                                             OVERRIDE_FLAG]
    assert main(args) == 0
    assert "warning: tokenizer mismatch" in capsys.readouterr().err
