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


TIMING = {"tok_per_s", "tflops", "mfu", "peak_memory_bytes"}  # measured, not computed: differ run to run


def assert_same_run(ref: Path, run: Path, steps: int) -> None:
    """Two runs ended at ``steps`` with equal weights (every tensor of the newest checkpoint's model, buffers
    included) and equal metrics.jsonl apart from the timing fields: a resumed run equals an uninterrupted one."""
    import torch

    from moeut.run import latest_checkpoint

    a, b = latest_checkpoint(ref)[1], latest_checkpoint(run)[1]
    assert a["step"] == b["step"] == steps
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    def computed(r: Path) -> list[dict]:
        lines = (r / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]

    assert computed(ref) == computed(run)
