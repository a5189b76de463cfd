from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from moeut.cli.prepare import add_arguments as add_prepare_arguments
from moeut.cli.prepare import run as run_prepare
from moeut.data import (DecodeError, EmptyCorpusError, MissingInputError, OutputDirError, TokenDataset, Tokenizer,
                        iter_documents, prepare, resolve_inputs, split_documents)
from moeut.data.sources import SourceOptions

from tests.data.helpers import SMALL_VOCAB, write_text_corpus

SEP = "<|sep|>"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, documents):
    d = tmp_path_factory.mktemp("corpus")
    write_text_corpus(d, documents)
    return d


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("prepared") / "out"
    res = prepare([corpus], out, vocab_size=SMALL_VOCAB, doc_separator=SEP, val_fraction=0.1, shard_tokens=4096,
                  progress=False)
    return res


def split_docs(ds: TokenDataset, tok: Tokenizer) -> list[str]:
    stream = ds.window(0, len(ds)).astype(np.int64)
    assert stream[-1] == tok.eos_id
    cuts = np.flatnonzero(stream == tok.eos_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(stream[a:b]) for a, b in zip(starts, cuts, strict=True)]


def test_output_layout_and_metadata(prepared):
    out = prepared.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["prepare.json", "tokenizer.json", "tokenizer.model", "train", "val"]
    manifest = json.loads((out / "prepare.json").read_text())
    assert manifest["documents"] == 300 and manifest["tokenizer"]["sha256"] == prepared.tokenizer.sha256
    for split, meta in (("train", prepared.train), ("val", prepared.val)):
        m = json.loads((out / split / "meta.json").read_text())
        assert m["split"] == split and m["dtype"] == "uint16" and m["vocab_size"] == SMALL_VOCAB
        assert m["tokenizer_sha256"] == prepared.tokenizer.sha256 and m["eos_id"] == prepared.tokenizer.eos_id
        assert m["num_tokens"] == meta.num_tokens == sum(s["num_tokens"] for s in m["shards"])
        assert all(s["num_tokens"] <= 4096 for s in m["shards"])
    assert len(prepared.train.shards) > 1
    assert prepared.train.num_documents + prepared.val.num_documents == 300
    assert prepared.val.num_documents == 30
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_every_document_is_followed_by_eos_and_round_trips(prepared, corpus, documents):
    tok = prepared.tokenizer
    train = TokenDataset.open(prepared.out_dir / "train", expected_tokenizer_sha256=tok.sha256)
    val = TokenDataset.open(prepared.out_dir, split="val")
    train_docs, val_docs = split_docs(train, tok), split_docs(val, tok)
    assert len(train_docs) == train.num_documents and len(val_docs) == val.num_documents
    assert sorted(train_docs + val_docs) == sorted(documents)
    assert not set(train_docs) & set(val_docs)
    assert train_docs == [d for d in documents if d in set(train_docs)]  # input order kept within a split


def test_split_is_by_document_and_stable(tmp_path, corpus, prepared, documents):
    # same documents in another order / layout -> same validation documents (the split hashes contents)
    jl = tmp_path / "shuffled.jsonl"
    jl.write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(documents)), encoding="utf-8")
    res = prepare([jl], tmp_path / "out", tokenizer=prepared.out_dir / "tokenizer.model", val_fraction=0.1,
                  progress=False)
    tok = res.tokenizer
    assert tok.sha256 == prepared.tokenizer.sha256 and not res.tokenizer_trained
    val_a = set(split_docs(TokenDataset.open(prepared.out_dir / "val"), tok))
    val_b = set(split_docs(TokenDataset.open(tmp_path / "out" / "val"), tok))
    assert val_a == val_b


def test_split_documents_counts():
    h = np.array([5, 1, 9, 1, 7], dtype=np.uint64)
    assert split_documents(h, 0.2, 1).tolist() == [False, True, False, False, False]
    assert split_documents(h, 0.0, 3).tolist() == [True, True, False, True, False]
    assert split_documents(h, 0.0, 0).sum() == 0
    assert split_documents(h, 0.9, 10).sum() == 4  # training keeps a document


def test_prepare_is_deterministic(tmp_path, corpus, prepared):
    res = prepare([corpus], tmp_path / "again", vocab_size=SMALL_VOCAB, doc_separator=SEP, val_fraction=0.1,
                  shard_tokens=4096, progress=False)
    assert res.tokenizer.sha256 == prepared.tokenizer.sha256
    assert res.train.shards == prepared.train.shards and res.val.shards == prepared.val.shards


def test_rerun_same_inputs_replaces_other_inputs_refused(tmp_path, corpus, documents):
    out = tmp_path / "out"
    kw = dict(vocab_size=SMALL_VOCAB, doc_separator=SEP, progress=False)
    prepare([corpus], out, **kw)
    prepare([corpus], out, **kw, val_fraction=0.2)  # a previous output of the same inputs: replaced
    assert json.loads((out / "prepare.json").read_text())["split"]["val_fraction"] == 0.2
    other = tmp_path / "other.txt"
    other.write_text(f"\n{SEP}\n".join(documents[:50]))
    with pytest.raises(OutputDirError, match="other inputs.*--overwrite"):
        prepare([other], out, **kw)
    res = prepare([other], out, **kw, overwrite=True)
    assert res.train.num_documents + res.val.num_documents == 50


def test_out_dir_holding_something_else(tmp_path, corpus):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError) as e:
        prepare([corpus], out, vocab_size=SMALL_VOCAB, progress=False)
    assert str(out) in str(e.value) and "notes.txt" in str(e.value) and "--overwrite" in str(e.value)
    prepare([corpus], out, vocab_size=SMALL_VOCAB, doc_separator=SEP, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "train" / "meta.json").exists()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        prepare([corpus], f, progress=False)


def test_bad_inputs_fail_before_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MissingInputError, match="missing.txt"):
        prepare([tmp_path / "missing.txt"], out, progress=False)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n\t\n")
    with pytest.raises(EmptyCorpusError, match="no text"):
        prepare([blank], out, progress=False)
    from moeut.data import TokenizerError

    with pytest.raises(TokenizerError, match="nope.model"):
        prepare([blank], out, tokenizer=tmp_path / "nope.model", progress=False)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff")
    with pytest.raises(DecodeError, match=r"bad\.txt: byte 3"):
        prepare([bad], out, progress=False)
    assert not out.exists()


def test_errors_replace_in_prepare(tmp_path, documents):
    f = tmp_path / "mixed.txt"
    f.write_bytes("\n\n".join(documents[:40]).encode() + b"\n\ncaf\xe9 latin-1\n")
    res = prepare([f], tmp_path / "out", vocab_size=SMALL_VOCAB, doc_separator="blank", errors="replace",
                  progress=False)
    docs = split_docs(TokenDataset.open(tmp_path / "out" / "train"), res.tokenizer) + \
        split_docs(TokenDataset.open(tmp_path / "out" / "val"), res.tokenizer)
    assert "caf\ufffd latin-1" in docs


def test_input_kinds_in_one_run(tmp_path, documents):
    pq = pytest.importorskip("pyarrow.parquet")
    import gzip

    import pyarrow as pa

    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"body": t}) + "\n" for t in documents[:50]).encode()))
    pq.write_table(pa.table({"body": documents[50:100]}), d / "b.parquet")
    (d / "c.txt").write_text(documents[100])
    sources = resolve_inputs([d], SourceOptions(text_field="body"))
    assert list(iter_documents(sources)) == documents[:101]
    res = prepare([d], tmp_path / "out", vocab_size=SMALL_VOCAB, text_field="body", progress=False)
    assert res.num_documents == 101


def test_cli_entry_points(tmp_path, corpus, capsys):
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(["--input", str(corpus), "--out", str(out), "--vocab-size", str(SMALL_VOCAB),
                              "--doc-separator", SEP, "--val-fraction", "0.05", "--seed", "7", "--quiet"])
    assert run_prepare(args) == 0
    printed = capsys.readouterr().out
    assert "300 documents" in printed and "train:" in printed
    assert json.loads((out / "prepare.json").read_text())["split"]["seed"] == 7
    args = parser.parse_args(["--input", str(tmp_path / "nope.txt"), "--out", str(out), "--quiet"])
    assert run_prepare(args) == 1
    assert "nope.txt does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--val-fraction", "1.5"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--errors", "ignore"])
