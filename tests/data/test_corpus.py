from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from moeut.data import DependencyError, TokenDataset, default_corpus_files, default_corpus_sources, prepare
from moeut.data.corpus import split_wikiextractor

INSTALLED = importlib.util.find_spec("exllamav2") is not None
needs_corpus = pytest.mark.skipif(not INSTALLED, reason="pip install --no-deps exllamav2==0.3.2 for the default corpus")


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DependencyError) as e:
        default_corpus_files()
    assert "pip install --no-deps exllamav2==0.3.2" in str(e.value) and "--input" in str(e.value)


def test_split_wikiextractor():
    lines = ['<doc id="1" url="u" title="A">\n', "A\n", "\n", "Body of A.\n", "</doc>\n",
             '<doc id="2" title="Stub">\n', "Stub\n", "\n", "</doc>\n",
             '<doc id="3" title="C">\n', "C\n", "text\n"]
    assert list(split_wikiextractor(lines)) == ["A\n\nBody of A.", "C\ntext"]


@needs_corpus
def test_default_corpus_is_found_without_importing_exllamav2():
    code = ("import sys; from moeut.data import default_corpus_files; fs = default_corpus_files(); "
            "assert 'exllamav2' not in sys.modules; print(len(fs), sum(f.stat().st_size for f in fs))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "4" and 2_800_000 < int(out[1]) < 3_000_000


@needs_corpus
def test_default_corpus_documents():
    counts = {s.path.stem: sum(1 for _ in s) for s in default_corpus_sources()}
    assert counts == {"wiki": 1095, "c4": 118, "tiny": 317, "code": 105}


@needs_corpus
def test_prepare_default_corpus(tmp_path):
    res = prepare(None, tmp_path / "out", progress=False)
    assert res.tokenizer.vocab_size == 8000 and res.tokenizer_trained
    assert res.num_documents == 1635
    assert (res.train.num_documents, res.val.num_documents) == (1618, 17)
    assert 700_000 < res.train.num_tokens < 850_000
    train = TokenDataset.open(tmp_path / "out" / "train", expected_tokenizer_sha256=res.tokenizer.sha256)
    text = res.tokenizer.decode(train.window(0, 200))
    assert len(text) > 400
