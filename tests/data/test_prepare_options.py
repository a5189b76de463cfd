"""``PrepareOptions``: the one place a prepare setting is defined; ``prepare`` takes it or its fields as keywords."""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings

import pytest

from moeut.cli.prepare import add_arguments as add_prepare_arguments
from moeut.cli.prepare import options as cli_options
from moeut.data import PrepareOptions, TokenDataset, prepare

from tests.data.helpers import write_text_corpus

SEP = "<|sep|>"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, documents):
    d = tmp_path_factory.mktemp("corpus")
    write_text_corpus(d, documents[:120])
    return d


def test_options_object_and_keywords_write_the_same_output(tmp_path, corpus, small_tokenizer):
    opts = PrepareOptions(tokenizer=small_tokenizer.model_path, doc_separator=SEP, val_fraction=0.1,
                          shard_tokens=2048, progress=False)
    a = prepare([corpus], tmp_path / "a", opts)
    b = prepare([corpus], tmp_path / "b", **{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)})
    assert a.train.shards == b.train.shards and a.val.shards == b.val.shards
    c = prepare([corpus], tmp_path / "c", opts, val_fraction=0.2)  # a keyword overrides the options object
    assert json.loads((tmp_path / "c" / "prepare.json").read_text())["split"]["val_fraction"] == 0.2
    assert c.val.num_documents == 24 and a.val.num_documents == 12


def test_bad_settings_fail_before_anything_is_read_or_written(tmp_path):
    out = tmp_path / "out"
    for bad, match in (({"val_fraction": 1.0}, "val_fraction"), ({"min_val_docs": -1}, "min_val_docs"),
                       ({"passes": 3}, "passes must be 1 or 2")):
        with pytest.raises(ValueError, match=match):
            PrepareOptions(**bad)
        with pytest.raises(ValueError, match=match):
            prepare([tmp_path / "missing.txt"], out, **bad)
    with pytest.raises(TypeError, match="vocab"):
        prepare([tmp_path / "missing.txt"], out, vocab=400)  # not a PrepareOptions field
    assert not out.exists()


def test_the_cli_flags_build_the_options():
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    assert cli_options(parser.parse_args(["--out", "x"])) == PrepareOptions()  # the flags' defaults are the options'
    args = parser.parse_args(["--out", "x", "--tokenizer", "t.model", "--vocab-size", "500", "--text-field", "body",
                              "--doc-separator", "line", "--val-fraction", "0.2", "--min-val-docs", "3",
                              "--errors", "replace", "--seed", "4", "--shard-tokens", "100",
                              "--max-tokenizer-bytes", "1000", "--threads", "2", "--passes", "1", "--overwrite",
                              "--quiet"])
    assert cli_options(args) == PrepareOptions(
        tokenizer="t.model", vocab_size=500, text_field="body", doc_separator="line", val_fraction=0.2,
        min_val_docs=3, errors="replace", seed=4, shard_tokens=100, max_tokenizer_bytes=1000, num_threads=2,
        passes=1, overwrite=True, progress=False)


@pytest.mark.parametrize("passes", [1, 2])
def test_warnings_point_at_the_caller_of_prepare(tmp_path, documents, small_tokenizer, passes):
    one = tmp_path / "one.txt"
    one.write_text(documents[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = prepare([one], tmp_path / "out", tokenizer=small_tokenizer.model_path, min_val_docs=2, passes=passes,
                      progress=False)
    assert res.passes == passes and len(TokenDataset.open(res.out_dir / "train")) > 0
    assert [w.filename for w in caught] == [__file__], [str(w.message) for w in caught]
