"""Data mixtures: `--data A:3 --data B:1` draws rows by weight, logs tokens per source, resumes bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moeut.cli import main
from moeut.data import MixtureSampler, MixtureSpecError, TokenDataset, TrainingData, parse_sources, prepare
from moeut.data.mixture import source_names
from moeut.run import latest_checkpoint
from moeut.run.layout import trained_val_split
from moeut.train import TrainConfig
from tests.data.helpers import make_documents
from tests.train.conftest import train_args


def _prepare(root: Path, name: str, seed: int, tokenizer: Path | None, vocab: int = 400) -> Path:
    corpus = root / f"{name}.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(300, seed=seed)))
    prepare([str(corpus)], root / name, vocab_size=vocab, tokenizer=tokenizer, val_fraction=0.05, progress=False)
    return root / name


@pytest.fixture(scope="module")
def second_data(tiny_data, tmp_path_factory) -> Path:
    """Other documents, tokenized with tiny_data's tokenizer."""
    return _prepare(tmp_path_factory.mktemp("mix"), "other", 5, tiny_data / "tokenizer.model")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _mix_args(a: Path, b: Path, run: Path, **kw) -> list[str]:
    args = train_args(a, run, **kw)
    i = args.index("--data")
    return args[:i + 1] + [f"{args[i + 1]}:3", "--data", f"{b}:1"] + args[i + 2:]


def test_spec_parsing_and_single_string_configs():
    assert parse_sources("some/dir") == parse_sources(["some/dir:1"])
    a, b = parse_sources(["x/c4:3", {"dir": "y/code", "weight": 0.5}])
    assert (a.dir, a.weight, b.dir, b.weight) == ("x/c4", 3.0, "y/code", 0.5)
    assert parse_sources(["x:notanumber"])[0].dir == "x:notanumber"  # a colon inside a path
    with pytest.raises(MixtureSpecError, match="positive"):
        parse_sources(["x:0"])
    assert source_names(parse_sources(["a/data:1", "b/data:2", {"dir": "c", "name": "code"}])) == \
        ["data", "data_2", "code"]
    assert TrainConfig.from_dict({"data": "d", "out": "o"}).data == "d"  # train_config.json of older runs
    with pytest.raises(Exception, match=r"TrainConfig.data=.*positive"):
        TrainConfig.from_dict({"data": ["a:1", "b:-2"], "out": "o"})


def test_mixture_sampler_rows_come_from_their_source_in_proportion(tiny_data, second_data):
    ds = [TokenDataset.open(tiny_data / "train"), TokenDataset.open(second_data / "train")]
    whole = MixtureSampler(ds, [3, 1], batch_size=8, seq_len=16, seed=1)
    ranks = [MixtureSampler(ds, [3, 1], batch_size=8, seq_len=16, seed=1, rank=r, world_size=2) for r in (0, 1)]
    seen: list[set] = [set(), set()]
    for step in range(60):
        rows = whole.batch(step)
        assert torch.equal(rows, torch.cat([r.batch(step) for r in ranks]))  # ranks take contiguous blocks
        src, local = whole.sources_of(step * 8 + np.arange(8))
        for row, s, k in zip(rows, src, local):
            sampler = whole.samplers[s]
            w = int(sampler.windows_of_samples(np.array([k]))[0])
            assert torch.equal(row, torch.from_numpy(ds[s].window(w * 17, 17).astype(np.int64)))
            seen[s].add(int(k))
    counts = whole.samples_per_source(60 * 8)
    assert counts.tolist() == [len(seen[0]), len(seen[1])]  # each source's samples numbered without gaps
    assert sorted(seen[0]) == list(range(counts[0])) and sorted(seen[1]) == list(range(counts[1]))
    for n in (8, 100, 480, 5000, 70001):  # every prefix holds each share to within a sample
        c = whole.samples_per_source(n)
        assert c.sum() == n and abs(c[0] - 0.75 * n) <= 1.5
    # the source's own order is its epoch permutation: a full epoch of source 1 visits every window once
    s1 = whole.samplers[1]
    assert sorted(s1.windows_of_samples(np.arange(s1.windows_per_epoch)).tolist()) == list(range(s1.windows_per_epoch))


@pytest.mark.slow
def test_two_source_mixture_trains_in_proportion_and_resumes_bit_identically(tiny_data, second_data, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = dict(steps=12, save_every=4, eval_every=6, batch_size=8)
    assert main(_mix_args(tiny_data, second_data, ref, **common)) == 0
    last = [m for m in _metrics(ref) if "train_loss" in m][-1]
    a, b = last[f"tokens/{tiny_data.name}"], last[f"tokens/{second_data.name}"]
    assert a + b == last["tokens_seen"] == 12 * 8 * 32
    assert abs(a / (a + b) - 0.75) <= 1.5 / (12 * 8)  # 72 of 96 rows, up to one row
    cfg = json.loads((ref / "train_config.json").read_text())
    assert cfg["data"] == [f"{tiny_data}:3", f"{second_data}:1"]
    assert trained_val_split(ref) == [tiny_data / "val"]  # validation on the first source

    # interrupt after step 4: drop the later checkpoints, resume, and compare everything
    assert main(_mix_args(tiny_data, second_data, run, **common)) == 0
    for p in (run / "checkpoints").glob("ckpt_*"):
        if int(p.stem.split("_")[1]) > 4:
            p.unlink()
    assert latest_checkpoint(run)[1]["step"] == 4
    assert main([*_mix_args(tiny_data, second_data, run, **common), "--resume"]) == 0
    sa, sb = latest_checkpoint(ref)[1], latest_checkpoint(run)[1]
    assert sa["step"] == sb["step"] == 12
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    timing = {"tok_per_s", "tflops", "mfu", "peak_memory_bytes"}  # measured, not computed
    strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]  # noqa: E731
    assert strip(_metrics(ref)) == strip(_metrics(run))


def test_mixture_of_different_tokenizers_names_both_directories(tiny_data, tmp_path, capsys):
    other = _prepare(tmp_path, "own_tok", 7, None, vocab=420)
    assert main(_mix_args(tiny_data, other, tmp_path / "run", steps=2)) != 0
    err = capsys.readouterr().err
    assert str(tiny_data) in err and str(other) in err and "share one tokenizer" in err
    with pytest.raises(Exception, match="share one tokenizer"):
        TrainingData.open([str(tiny_data), str(other)])
    shutil.rmtree(other)
