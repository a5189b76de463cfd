"""Continuations are tokenised as running text, not as document starts with SentencePiece's dummy prefix."""

from __future__ import annotations

from moeut.eval.candidates import encode_pair
from moeut.eval.encoding import SentencePieceEncoder


def test_continuation_tokens_match_running_text(tiny_run):
    enc = SentencePieceEncoder.load(tiny_run)
    sp = enc.tokenizer
    # as a document start, "hello" is "▁hello"; so is " hello" continuing a text
    for word in ("hello", "Document", "and"):
        assert enc.encode_continuation(" " + word) == sp.encode(word)
    assert enc.decode_continuation(enc.encode_continuation(" and so")) == " and so"
    assert enc.decode_continuation(enc.encode_continuation("s\nnext")) == "s\nnext"  # no space invented
    assert enc.encode_continuation("") == [] and enc.encode_context("") == []
    ctx, cont = encode_pair(enc, "the dog and the ", "cat")  # the trailing space moves to the continuation
    assert ctx == sp.encode("the dog and the") and cont == enc.encode_continuation(" cat")


def test_token_bytes_count_the_text_bytes(tiny_run):
    enc = SentencePieceEncoder.load(tiny_run)
    text = "Document 7. naïve words\nand 12345 more"
    ids = enc.encode_context(text)
    assert int(enc.token_bytes()[ids].sum()) == len(text.encode()) + 1  # + the dummy-prefix space
    assert enc.token_bytes()[enc.eos_id] == 0
