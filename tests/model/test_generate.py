"""generate(): the KV cache changes nothing; batches with left padding equal prompts run alone."""

from __future__ import annotations

import pytest
import torch

from moeut.model import MoEUTLM
from moeut.model.generate import sample_next
from tests.model.helpers import tiny_config


@pytest.fixture(params=["moeut", "dense"])
def model(request):
    torch.manual_seed(2)
    m = MoEUTLM(tiny_config(request.param)).eval()
    with torch.no_grad():  # sharpen the distribution so greedy paths are not near ties
        m.lm_head.weight.mul_(20)
    return m


def test_greedy_with_cache_equals_without(model):
    prompts = [[5, 7, 9, 11], [3], [1, 2, 3, 4, 5, 6, 7]]
    a = model.generate(prompts, 12, temperature=0)
    b = model.generate(prompts, 12, temperature=0, use_cache=False)
    assert a == b and all(len(x) == 12 for x in a)


def test_left_padded_batch_equals_one_by_one(model):
    prompts = [[5, 7, 9, 11], [3], [1, 2, 3, 4, 5, 6, 7]]
    batched = model.generate(prompts, 10, temperature=0)
    alone = [model.generate([p], 10, temperature=0)[0] for p in prompts]
    assert batched == alone


def test_sampling_is_reproducible_with_a_seed(model):
    a = model.generate([[1, 2]], 15, temperature=1.0, top_k=20, seed=3)
    b = model.generate([[1, 2]], 15, temperature=1.0, top_k=20, seed=3)
    assert a == b


def test_stops_at_eos(model):
    first = model.generate([[4, 4]], 1, temperature=0)[0][0]
    out = model.generate([[4, 4]], 10, temperature=0, eos_id=first)
    assert out == [[first]]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {3, 4}
    probs = logits[0].softmax(-1)  # 0.64 for the top token: top_p 0.5 keeps only it
    assert probs[4] > 0.5
    assert set(sample_next(logits, top_p=0.5, generator=g).tolist()) == {4}
    assert set(sample_next(logits, top_p=0.85, generator=g).tolist()) == {3, 4}
    assert sample_next(logits[:1], temperature=0).item() == 4
