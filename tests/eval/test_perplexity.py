"""Perplexity and bits per byte against a naive loop over windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeut.eval.perplexity import TokenArray, open_ppl_data, perplexity
from moeut.model import MoEUTLM
from tests.eval.conftest import CharEncoder
from tests.model.helpers import tiny_config


def test_perplexity_equals_a_naive_loop_over_non_overlapping_windows():
    torch.manual_seed(0)
    model = MoEUTLM(tiny_config(context_length=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 53, size=16 * 9 + 5)  # 8 windows of 17 and a tail
    token_bytes = np.arange(53) % 4  # some tokens stand for several bytes, some for none
    r = perplexity(model, TokenArray(tokens), batch_size=3, token_bytes=token_bytes)

    nll, n, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for w in range(len(tokens) // 17):
            win = torch.tensor(tokens[w * 17:(w + 1) * 17])
            logits = model(win[None, :-1]).logits[0]
            nll += F.cross_entropy(logits, win[1:], reduction="sum").item()
            n += 16
            nbytes += int(token_bytes[win[1:].numpy()].sum())
    assert r.windows == 8 and r.tokens == n == 128 and r.bytes == nbytes
    assert r.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert r.bpb == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
    assert perplexity(model, TokenArray(tokens), batch_size=3, max_windows=2).windows == 2


def test_text_files_and_prepared_shards_are_accepted(tmp_path, tiny_run):
    from moeut.data import Tokenizer

    text = tmp_path / "held_out.txt"
    text.write_text("abc" * 10)
    assert open_ppl_data(text, CharEncoder()).num_tokens == 30
    data = tiny_run.parent / "data"
    sha = Tokenizer.load(data).sha256
    assert open_ppl_data(data, CharEncoder(), sha).num_tokens > 0  # a prepare output dir: its val split
    with pytest.raises(Exception, match="tokenizer"):
        open_ppl_data(data / "val", CharEncoder(), "0" * 64)
    with pytest.raises(FileNotFoundError):
        open_ppl_data(tmp_path / "missing.txt", CharEncoder())
    with pytest.raises(ValueError, match="less than one window"):
        perplexity(MoEUTLM(tiny_config(context_length=16)), TokenArray([1, 2, 3]))
