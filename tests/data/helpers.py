"""Small generated corpora for the data tests (no shared data needed)."""

from __future__ import annotations

import random
from pathlib import Path

SMALL_VOCAB = 400  # small enough to train in a fraction of a second on the generated text

WORDS = ("the cat dog sat on a mat with blue red green house tree river under over quickly slowly and then "
         "it was very happy sad big small one day little girl boy named Lily Tom ran jumped saw found "
         "über naïve café 東京 數據 🙂 — def return import print x y if else for while").split()


def make_documents(n: int, seed: int = 0, min_words: int = 20, max_words: int = 80) -> list[str]:
    """``n`` distinct documents of random words, numbers and a little unicode, some with newlines."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        for _ in range(3):
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        text = " ".join(words)
        if i % 3 == 0:
            text = text.replace(" and ", "\n  and ", 1)
        docs.append(f"Document {i}. {text}.")
    return docs


def write_text_corpus(directory: Path, docs: list[str], per_file: int = 10) -> list[Path]:
    """Write documents as .txt files separated by ``<|sep|>`` lines; returns the files."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(0, len(docs), per_file):
        f = directory / f"part{k // per_file:03d}.txt"
        f.write_text("\n<|sep|>\n".join(docs[k:k + per_file]) + "\n", encoding="utf-8")
        files.append(f)
    return files
