from __future__ import annotations

import hashlib
import json

import pytest
import sentencepiece

from moeut.data import (Tokenizer, TokenizerConfig, TokenizerError, TokenizerMismatchError, TrainingSample,
                        train_tokenizer)
from moeut.data.tokenizer import training_sentences

ROUND_TRIP = [
    "Hello world 12345 and 0.5 + 3/4 = 1.25",
    "ünïcödé café — naïve 東京 數據 🙂 𝔘𝔫𝔦",
    "  leading spaces\n\tand a tab\n\nand blank lines\n",
    "x\r\ny trailing  ",
    "a",
    "",
    "\x00 control \x7f chars \u2028",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_lossless(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert all(0 <= i < small_tokenizer.vocab_size for i in ids)
    assert small_tokenizer.eos_id not in ids
    assert small_tokenizer.decode(ids) == text


def test_digits_are_split(small_tokenizer):
    pieces = [small_tokenizer.id_to_piece(i) for i in small_tokenizer.encode("x 9876543210")]
    digit_pieces = [p.lstrip("▁") for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list("9876543210")


def test_encode_batch_matches_encode(small_tokenizer):
    assert small_tokenizer.encode_batch(ROUND_TRIP) == [small_tokenizer.encode(t) for t in ROUND_TRIP]
    assert small_tokenizer.encode_batch([]) == []


def test_metadata_records_sha256_and_ids(small_tokenizer):
    model = small_tokenizer.model_path
    meta = json.loads(model.with_name("tokenizer.json").read_text())
    assert meta["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest() == small_tokenizer.sha256
    assert meta["vocab_size"] == small_tokenizer.vocab_size == 400
    assert (meta["unk_id"], meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (0, 1, 2, 3)
    assert small_tokenizer.id_to_piece(small_tokenizer.eos_id) == "</s>"
    assert meta["sentencepiece_version"] == sentencepiece.__version__
    assert meta["config"]["model_type"] == "bpe" and meta["config"]["split_digits"] is True
    assert meta["training_sample"]["documents"] == 300


@pytest.mark.parametrize("which", ["dir", "model", "json"])
def test_load_from_dir_model_or_json(small_tokenizer, which):
    d = small_tokenizer.model_path.parent
    path = {"dir": d, "model": d / "tokenizer.model", "json": d / "tokenizer.json"}[which]
    tok = Tokenizer.load(path)
    assert (tok.sha256, tok.vocab_size, tok.eos_id) == (small_tokenizer.sha256, 400, 2)
    assert tok.encode("the cat 42") == small_tokenizer.encode("the cat 42")


def test_training_is_deterministic(tmp_path, documents, small_tokenizer):
    again = train_tokenizer(list(reversed(documents)), tmp_path, TokenizerConfig(vocab_size=400))
    assert again.sha256 == small_tokenizer.sha256  # sample order does not matter


def test_replaced_model_is_detected(tmp_path, small_tokenizer, documents):
    small_tokenizer.save(tmp_path)
    other = train_tokenizer(documents[:100], tmp_path / "other", TokenizerConfig(vocab_size=350))
    (tmp_path / "tokenizer.model").write_bytes(other.model_path.read_bytes())
    with pytest.raises(TokenizerMismatchError) as e:
        Tokenizer.load(tmp_path)
    assert other.sha256 in str(e.value) and small_tokenizer.sha256 in str(e.value)


def test_missing_or_bad_model(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="junk.model"):
        Tokenizer.load(tmp_path / "junk.model")


def test_vocab_too_large_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="vocab"):
        train_tokenizer(["hello world"] * 5, tmp_path, TokenizerConfig(vocab_size=5000))


def test_training_sample_is_bounded_and_order_independent(documents):
    a, b = TrainingSample(5000, seed=1), TrainingSample(5000, seed=1)
    for i, d in enumerate(documents):
        a.add(i, d)
    for i, d in reversed(list(enumerate(documents))):
        b.add(i, d)
    docs = a.documents()
    assert docs == b.documents()
    size = sum(len(d.encode()) for d in docs)
    assert 5000 <= size <= 5000 + max(len(d.encode()) for d in documents)
    assert len(docs) < len(documents)
    excluded = a.documents(exclude=range(len(documents)))
    assert excluded == []


def test_long_lines_are_cut_for_training():
    long = " ".join(["word"] * 3000)
    pieces = list(training_sentences([long + "\n\n  \nshort"], max_chars=1000))
    assert all(len(p) <= 1000 for p in pieces) and pieces[-1] == "short"
    assert "".join(pieces[:-1]) == long


def test_vocab_too_small_says_to_increase_it(tmp_path, documents):
    with pytest.raises(TokenizerError, match="larger --vocab-size"):
        train_tokenizer(documents, tmp_path, TokenizerConfig(vocab_size=270))
