"""Single-pass `prepare` for streams (stdin, streaming datasets, --passes 1): one read, split on the fly,
tokenizer from the first documents, bounded memory."""

from __future__ import annotations

import argparse
import io
import json
import tracemalloc

import numpy as np
import pytest

from moeut.cli.prepare import add_arguments as add_prepare_arguments
from moeut.cli.prepare import run as run_prepare
from moeut.data import EmptyCorpusError, Tokenizer, prepare
from moeut.data.sources import StdinSource
from moeut.data.split import doc_hash, split_key
from tests.data.helpers import SMALL_VOCAB, make_documents


class OnceSource:
    """A stream of generated documents that refuses a second read (like stdin or a streamed dataset)."""

    is_stream = True

    def __init__(self, n: int, seed: int = 0, words: tuple[int, int] = (20, 80)) -> None:
        self.n, self.seed, self.words, self.reads = n, seed, words, 0

    def describe(self) -> str:
        return f"generated:{self.n}:{self.seed}"

    def __iter__(self):
        self.reads += 1
        assert self.reads == 1, "a stream was read twice"
        for i in range(self.n):  # one document at a time: nothing holds the corpus
            yield from make_documents(1, seed=self.seed * 1_000_003 + i, min_words=self.words[0],
                                      max_words=self.words[1])


def _jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def _docs_of(split, tok: Tokenizer) -> list[str]:
    stream = split.window(0, len(split)).astype(np.int64) if len(split) else np.zeros(0, np.int64)
    cuts = np.flatnonzero(stream == tok.eos_id)
    starts = np.concatenate([[0], cuts[:-1] + 1]) if len(cuts) else []
    return [tok.decode(stream[a:b]) for a, b in zip(starts, cuts)]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_documents(300, seed=3)


@pytest.fixture(scope="module")
def two_pass(tmp_path_factory, docs):
    f = tmp_path_factory.mktemp("two") / "c.jsonl"
    f.write_bytes(_jsonl(docs))
    return prepare([str(f)], f.parent / "out", vocab_size=SMALL_VOCAB, val_fraction=0.1, progress=False)


def test_stdin_is_read_once_and_split_by_hash_on_the_fly(tmp_path, docs, two_pass):
    from moeut.data import TokenDataset

    src = StdinSource(stream=io.BytesIO(_jsonl(docs)))
    res = prepare([src], tmp_path / "out", tokenizer=two_pass.out_dir / "tokenizer.model", val_fraction=0.1,
                  progress=False)
    assert res.passes == 1 and res.num_documents == len(docs)
    key, threshold = split_key(0), int(0.1 * 2.0 ** 64)
    want_val = [d for d in docs if doc_hash(d, key) < threshold]
    assert 10 <= len(want_val) <= 50  # about 10 % of 300
    tok = res.tokenizer
    got_val = _docs_of(TokenDataset.open(res.out_dir / "val"), tok)
    got_train = _docs_of(TokenDataset.open(res.out_dir / "train"), tok)
    assert got_val == [tok.decode(tok.encode(d)) for d in want_val]  # in input order
    assert len(got_train) + len(got_val) == len(docs)
    # the same documents and tokenizer as the two-pass output: the same tokens in total
    assert res.train.num_tokens + res.val.num_tokens == two_pass.train.num_tokens + two_pass.val.num_tokens
    assert json.loads((res.out_dir / "prepare.json").read_text())["passes"] == 1
    with pytest.raises(Exception, match="read only once"):
        list(src)


def test_single_pass_trains_the_tokenizer_on_the_first_documents(tmp_path):
    src = OnceSource(400, seed=1)
    res = prepare([src], tmp_path / "out", vocab_size=SMALL_VOCAB, val_fraction=0.05, max_tokenizer_bytes=20_000,
                  progress=False)
    assert src.reads == 1 and res.passes == 1 and res.tokenizer_trained
    sample = json.loads((res.out_dir / "tokenizer.json").read_text())["training_sample"]
    assert sample["documents_seen"] < 150  # only the first ~20 kB of training documents were buffered
    assert res.num_documents == 400 and res.train.num_documents + res.val.num_documents == 400


def test_files_keep_two_passes_unless_asked(tmp_path, docs, two_pass):
    assert two_pass.passes == 2
    f = tmp_path / "c.jsonl"
    f.write_bytes(_jsonl(docs))
    res = prepare([str(f)], tmp_path / "one", vocab_size=SMALL_VOCAB, val_fraction=0.1, progress=False, passes=1)
    assert res.passes == 1 and res.num_documents == len(docs)


def test_cli_reads_stdin_and_says_how(tmp_path, docs, monkeypatch, capsys):
    class Stdin:
        buffer = io.BytesIO(_jsonl(docs))

    monkeypatch.setattr("sys.stdin", Stdin)
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    args = parser.parse_args(["--input", "-", "--out", str(tmp_path / "o"), "--vocab-size", str(SMALL_VOCAB),
                              "--quiet"])
    assert run_prepare(args) == 0
    out = capsys.readouterr().out
    assert "300 documents" in out and "one pass" in out


def _peak(tmp_path, two_pass, n_docs: int) -> tuple[int, int]:
    src = OnceSource(n_docs, seed=2, words=(150, 250))
    tracemalloc.start()
    try:
        res = prepare([src], tmp_path / f"out{n_docs}", tokenizer=two_pass.out_dir / "tokenizer.model",
                      val_fraction=0.01, progress=False)
        return tracemalloc.get_traced_memory()[1], res.num_bytes
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_single_pass_memory_does_not_grow_with_the_input(tmp_path, two_pass):
    """Python-side peak of a streamed prepare: three times the input (past one tokenization batch of 512
    documents), about the same peak — nothing holds the corpus."""
    small, small_bytes = _peak(tmp_path, two_pass, 600)
    big, big_bytes = _peak(tmp_path, two_pass, 1800)
    assert big_bytes > 2.9 * small_bytes
    assert big < 1.25 * small, (small, big)


@pytest.mark.parametrize("given", [False, True])
def test_single_pass_of_no_text_says_what_to_check_and_leaves_nothing(tmp_path, two_pass, given):
    kw = {"tokenizer": two_pass.out_dir / "tokenizer.model"} if given else {"vocab_size": SMALL_VOCAB}
    with pytest.raises(EmptyCorpusError, match=r"no text .*check the paths, --text-field and --doc-separator"):
        prepare([StdinSource(stream=io.BytesIO(b"\n"))], tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists()


def test_single_pass_with_only_validation_documents_cannot_train_a_tokenizer(tmp_path):
    with pytest.raises(EmptyCorpusError, match="no training document.*lower --val-fraction, or pass --tokenizer"):
        prepare([OnceSource(3)], tmp_path / "out", vocab_size=SMALL_VOCAB, val_fraction=0.999, progress=False)
    assert not (tmp_path / "out").exists()
