from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeut.data import prepare
from tests.data.helpers import make_documents

# a model of a few thousand parameters, so a training step takes milliseconds
TINY_MODEL = dict(d_model=32, n_layers=4, group_size=2, n_heads=2, d_head=16, att_n_experts=3,
                  ff_n_experts=8, ff_expert_size=16, ff_k=2, context_length=32)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Prepared shards (vocab 400) of generated text: about 40k training tokens."""
    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(400)))
    out = root / "prepared"
    prepare([str(corpus)], out, vocab_size=400, val_fraction=0.05, progress=False)
    return out


def train_args(data: Path, out: Path, **kw) -> list[str]:
    args = ["train", "--preset", "moeut-tiny", "--data", str(data), "--out", str(out), "--steps", "12",
            "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--eval-every", "6", "--eval-batches", "2",
            "--save-every", "4", "--log-every", "1", "--routing-every", "4", "--no-progress"]
    for k, v in TINY_MODEL.items():
        args += ["--model", f"{k}={v}"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args
