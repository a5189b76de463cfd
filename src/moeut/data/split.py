"""How ``moeut prepare`` assigns documents to the train and validation splits.

Both rules rank documents by a keyed hash of their *content*, ``blake2b(document, key=seed)``, so the split
does not depend on input order or layout, and adding documents moves few others:

* **exact** (two passes): after a scan, the ``n_val`` documents with the smallest hashes go to validation;
* **on the fly** (one pass): a document goes to validation when its hash is below ``val_fraction * 2**64``,
  decided as it is read, so ``n_val`` is about, not exactly, ``val_fraction * N``.

Each rule's wording is recorded in the output (``meta.json`` of each split, ``prepare.json``) so a prepared
directory says how it was split.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitRule:
    """One way of splitting, as recorded in the output."""

    passes: int  # reads of the inputs this rule needs
    split_method: str  # the ``split_method`` of each split's meta.json
    method: str  # the ``split.method`` of prepare.json


EXACT = SplitRule(
    passes=2,
    split_method="smallest blake2b(document, key=seed) hashes go to val",
    method="the n_val documents with the smallest blake2b(document, key=seed) go to val, "
           "n_val = max(ceil(val_fraction * documents), min_val_docs)")
ON_THE_FLY = SplitRule(
    passes=1,
    split_method="blake2b(document, key=seed) < val_fraction * 2**64 goes to val",
    method="single pass: a document goes to val when blake2b(document, key=seed) < val_fraction * 2**64")


def split_key(seed: int) -> bytes:
    """The blake2b key of ``seed``: another seed gives an unrelated ranking, hence another split."""
    return b"moeut-split" + int(seed).to_bytes(16, "little", signed=True)


def doc_hash(text: str, key: bytes) -> int:
    """The document's 64-bit keyed content hash (``surrogatepass``: text decoded with lone surrogates still hashes)."""
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little")


def val_threshold(val_fraction: float) -> int:
    """The hash bound of the on-the-fly rule: a uniform 64-bit hash is below it with probability ``val_fraction``."""
    return min(int(val_fraction * 2.0 ** 64), (1 << 64) - 1)


def split_documents(hashes: np.ndarray, val_fraction: float, min_val_docs: int) -> np.ndarray:
    """Boolean mask of validation documents: the ``n_val`` smallest hashes (ties by position).

    ``n_val = max(ceil(val_fraction * N), min_val_docs)``, at most ``N - 1`` (training keeps one document).
    """
    n = len(hashes)
    n_val = max(math.ceil(val_fraction * n - 1e-9), min_val_docs) if n else 0
    n_val = max(0, min(n_val, n - 1))
    order = np.lexsort((np.arange(n), hashes))
    mask = np.zeros(n, dtype=bool)
    mask[order[:n_val]] = True
    return mask
