"""Activation checkpointing per layer application: the same loss, regulariser, routing counts and
gradients as without it (counts once, not twice), every K-th application, eval untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeut.model import ModelConfig, build_model
from moeut.train.activation_checkpointing import CheckpointEveryK, apply_activation_checkpointing
from moeut.train.step import autocast_for

SMALL = dict(d_model=32, n_layers=6, group_size=2, n_heads=2, d_head=16, att_n_experts=3, ff_n_experts=8,
             ff_expert_size=16, ff_k=2, context_length=16, vocab_size=50)


def _run(model, tokens, every: int, autocast=None, seed: int = 0, head_chunk_tokens: int | None = None):
    apply_activation_checkpointing(model, every)
    if head_chunk_tokens is not None:
        model.head_chunk_tokens = head_chunk_tokens
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # sampled routing (sample_topk) draws the same numbers in both runs
    with autocast or torch.autocast("cpu", enabled=False):
        out = model(tokens[:, :-1], targets=tokens[:, 1:])  # as train_step: the head computes the CE
    ce = out.ce
    assert (out.logits is None) == (model.head_chunk_tokens > 0)
    (ce + out.reg_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return ce.detach(), out.reg_loss.detach(), out.expert_counts, grads


def _assert_same(ref, got, rel=1e-6, grad_rel=None):
    grad_rel = rel if grad_rel is None else grad_rel
    (ce0, reg0, c0, g0), (ce1, reg1, c1, g1) = ref, got
    assert torch.allclose(ce1, ce0, rtol=rel, atol=0)
    assert torch.allclose(reg1, reg0, rtol=rel, atol=1e-12)
    if c0 is not None:
        assert set(c0) == set(c1)
        for k in c0:  # counted once per application: exactly the same integers
            assert torch.equal(c0[k], c1[k]), k
    assert set(g0) == set(g1) and g0
    for n in g0:
        scale = g0[n].abs().max().clamp_min(1e-30)
        assert ((g1[n] - g0[n]).abs().max() / scale).item() <= grad_rel, n


@pytest.mark.parametrize("preset, extra", [
    ("moeut-tiny", {}),
    ("moeut-tiny", dict(sample_topk=1, att_k=2)),  # random routing: the recomputation replays the RNG
    ("moeut-tiny", dict(norm_placement="pre")),
    ("dense-tiny", {}),
    ("sut-tiny", {}),
])
@pytest.mark.parametrize("every", [1, 2, 4])
@pytest.mark.parametrize("head_chunk_tokens", [None, 7])  # None: the default (one chunk here); 7: uneven chunks
def test_checkpointing_gives_the_same_loss_regulariser_counts_and_gradients(preset, extra, every, head_chunk_tokens):
    over = {**SMALL, **extra}
    if preset == "dense-tiny":
        over = {k: v for k, v in over.items() if k in ("d_model", "n_layers", "n_heads", "d_head",
                                                       "context_length", "vocab_size")}
        over["group_size"] = over["n_layers"]
    if preset == "sut-tiny":
        over = dict(d_model=32, n_layers=4, group_size=2, vocab_size=50, context_length=16)
    cfg = ModelConfig.from_name(preset, **over)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(cfg.vocab_size, (3, 17))
    ref = _run(model, tokens, 0)
    # in uneven chunks the head-weight (and upstream) gradients are summed chunk by chunk: fp32 summation order,
    # 1.5e-6 relative seen with 2 threads; the loss stays within 1e-6
    grad_rel = 1e-5 if head_chunk_tokens else None
    _assert_same(ref, _run(model, tokens, every, head_chunk_tokens=head_chunk_tokens), grad_rel=grad_rel)


def test_checkpointing_under_bf16_autocast_matches():
    cfg = ModelConfig.from_name("moeut-tiny", **SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(cfg.vocab_size, (3, 17))
    ac = lambda: autocast_for("bf16", torch.device("cpu"))  # noqa: E731
    _assert_same(_run(model, tokens, 0, ac()), _run(model, tokens, 1, ac()))
    # in chunks, each chunk's bf16 head-weight gradient is rounded to bf16 before the chunks are summed (the
    # plain head rounds the sum once): equal to bf16 precision, not to 1e-6
    _assert_same(_run(model, tokens, 0, ac()), _run(model, tokens, 1, ac(), head_chunk_tokens=5), rel=1.6e-2)


def test_chunked_head_is_the_plain_cross_entropy_and_keeps_no_logits():
    """The head + loss in recomputed chunks: the CE and every gradient of the plain head (summation order
    aside), the logits of the whole batch never returned; without targets or gradients, logits as usual."""
    cfg = ModelConfig.from_name("moeut-tiny", **SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(cfg.vocab_size, (3, 17))
    plain = _run(model, tokens, 0)
    ref = F.cross_entropy(model(tokens[:, :-1]).logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert torch.allclose(plain[0], ref.detach(), rtol=1e-7, atol=0)
    model.head_chunk_tokens = 4
    model.train()
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    assert out.logits is None and torch.allclose(out.ce.detach(), plain[0], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="use its `ce`"):
        out.loss(tokens[:, 1:])
    assert model(tokens[:, :-1]).logits.shape == (3, 16, cfg.vocab_size)  # no targets: the logits
    with torch.no_grad():  # nothing to recompute: one pass, logits kept
        assert model(tokens[:, :-1], targets=tokens[:, 1:]).logits is not None


def test_checkpointing_recomputes_the_chosen_applications_only(monkeypatch):
    cfg = ModelConfig.from_name("moeut-tiny", **SMALL)
    model = build_model(cfg)
    calls: list[int] = []
    real = model.layers[0].forward

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(model.layers[0], "forward", counting)
    tokens = torch.randint(cfg.vocab_size, (2, 9))
    for every, recomputed in ((0, 0), (1, 3), (2, 3), (4, 2)):  # layer 0 runs at applications 0, 2, 4
        calls.clear()
        _run(model, tokens, every)
        assert len(calls) == 3 + recomputed, every
    model.eval()  # no gradient, nothing to recompute: the runner calls the layer directly
    apply_activation_checkpointing(model, 1)
    with torch.no_grad():
        calls.clear()
        model(tokens)
        assert len(calls) == 3


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        CheckpointEveryK(0)
    with pytest.raises(TypeError, match="moeut language model"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), 1)
