"""How evaluation text becomes tokens: a context starts a document, a continuation is glued after it.

moeut's tokenizer is SentencePiece with a *dummy prefix*: ``encode("world")`` tokenises ``"▁world"``, as a
document start, and ``encode(" world")`` gives ``"▁▁" "w" "or" "ld"``, which never occurs in running text.
The paper's protocol tokenises context and continuation separately and concatenates them
(:func:`moeut.eval.candidates.encode_pair`); the authors'
tokenizer collapsed whitespace, so their continuation ``" world"`` became ``"▁world"``. We get the same
tokens by encoding continuations with a copy of the model whose dummy prefix is switched off (a one-field
change of its ``NormalizerSpec``): ``" world"`` → ``"▁world"``, ``"s"`` → ``"s"``, ``"\\n"`` → ``"<0x0A>"``.

This is the bottom of :mod:`moeut.eval`: every step above uses it, it uses none of them. Anything with
``encode_context``, ``encode_continuation``, ``decode_continuation`` and ``token_bytes``
(an :class:`Encoder`) can drive the evaluation; tests use a character-level one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm

from moeut.data import Tokenizer

# A serialized ModelProto with this appended merges ``normalizer_spec { add_dummy_prefix: false }`` into it:
# field 3 (normalizer_spec, length-delimited, 2 bytes) holding field 3 (add_dummy_prefix, varint) = 0.
# Protocol buffers merge repeated occurrences of a message field, so nothing else changes.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


class Encoder(Protocol):
    eos_id: int
    vocab_size: int

    def encode_context(self, text: str) -> list[int]: ...

    def encode_continuation(self, text: str) -> list[int]: ...

    def decode_continuation(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self) -> np.ndarray: ...


class SentencePieceEncoder:
    """Wraps a :class:`moeut.data.Tokenizer` for evaluation (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_id)
        self.vocab_size = int(tokenizer.vocab_size)
        self._sp = spm.SentencePieceProcessor(model_file=str(tokenizer.model_path))
        self._cont = spm.SentencePieceProcessor()
        self._cont.LoadFromSerializedProto(self._sp.serialized_model_proto() + _NO_DUMMY_PREFIX)
        self._bytes: np.ndarray | None = None

    @classmethod
    def load(cls, path: str | Path) -> SentencePieceEncoder:
        return cls(Tokenizer.load(path))

    def encode_context(self, text: str) -> list[int]:
        """Tokens of ``text`` as the start of a document (the way training documents were encoded)."""
        return list(self._sp.encode(text)) if text else []

    def encode_continuation(self, text: str) -> list[int]:
        """Tokens of ``text`` as it continues preceding text: a leading space becomes the ``▁`` of the first word."""
        return list(self._cont.encode(text)) if text else []

    def decode_continuation(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`encode_continuation` (keeps a leading space)."""
        return self._cont.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (``▁`` = a space, ``<0xNN>`` = 1, control pieces 0): bits per byte."""
        if self._bytes is None:
            sp = self._sp
            out = np.zeros(self.vocab_size, dtype=np.int64)
            for i in range(self.vocab_size):
                if sp.is_control(i) or sp.is_unknown(i):
                    continue
                if sp.is_byte(i):
                    out[i] = 1
                else:
                    out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
            self._bytes = out
        return self._bytes

