"""One token stream from what a user points a verb at: a prepared split, a ``moeut prepare`` output directory
(its ``val`` split), or a text file tokenised on the fly. Evaluation's perplexity and the analyses read data
through :func:`open_token_stream`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from moeut.data.errors import MissingInputError
from moeut.data.shards import META_FILE, TokenDataset


class TokenArray:
    """An in-memory token stream with the ``num_tokens``/``window`` interface of :class:`TokenDataset`."""

    def __init__(self, tokens) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def window(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start:start + length]


def open_token_stream(path: str | Path, encode: Callable[[str], list[int]] | None,
                      tokenizer_sha256: str | None = None, *, flag: str = "--data") -> TokenDataset | TokenArray:
    """``path`` as a token stream. A directory is a split (``meta.json`` inside) or a ``moeut prepare`` output
    (its ``val`` split), checked against ``tokenizer_sha256`` when given; a file is one document encoded with
    ``encode`` (as training documents are: a document start, no EOS)."""
    path = Path(path)
    if path.is_dir():
        if not (path / META_FILE).exists() and (path / "val" / META_FILE).exists():
            path = path / "val"
        return TokenDataset.open(path, expected_tokenizer_sha256=tokenizer_sha256)
    if not path.is_file():
        raise MissingInputError(f"{flag} {path} does not exist (give a text file or a directory of token shards "
                                "written by `moeut prepare`)")
    if encode is None:
        raise MissingInputError(f"{flag} {path} is a text file but no tokenizer is available to tokenise it; pass "
                                "--tokenizer or prepared shards")
    text = path.read_text(encoding="utf-8")
    return TokenArray(encode(text) if text else [])
