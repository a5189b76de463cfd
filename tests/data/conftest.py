from __future__ import annotations

import pytest

from moeut.data import Tokenizer, TokenizerConfig, train_tokenizer

from tests.data.helpers import SMALL_VOCAB, make_documents


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents(300)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, documents) -> Tokenizer:
    """A 400-piece tokenizer trained once per session on the generated documents."""
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(documents, out, TokenizerConfig(vocab_size=SMALL_VOCAB))
