"""The batched scorer against running every candidate alone, and the paper's scoring rules on a model with
designed log-probabilities (ties, length normalisation, first-token exclusion, multi-token LAMBADA words)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from moeut.eval import scoring
from moeut.eval.aggregate import average_accuracy, lm_eval_choice, paper_correct, strict_winner, summarize_choices
from moeut.eval.evaluate import score_lambada
from moeut.eval.examples import Choice, Cloze
from moeut.eval.scoring import _chunks, score_candidates, score_choices
from moeut.model import MoEUTLM
from tests.eval.conftest import ids
from tests.model.helpers import tiny_config


def _brute_force(model, tokens, start):
    """log p of tokens[start:] and the argmax there, from one forward pass over the candidate alone
    (its last context_length + 1 tokens)."""
    cut = max(0, len(tokens) - (model.cfg.context_length + 1))
    tokens, start = tokens[cut:], start - cut
    with torch.inference_mode():
        logp = model(torch.tensor([tokens])).logits.float().log_softmax(-1)[0]
    start = max(1, start)
    lp = logp[:-1].gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1)[start - 1:]
    return lp.double().numpy(), logp[:-1].argmax(-1)[start - 1:].numpy()


@pytest.fixture(scope="module")
def real_model():
    torch.manual_seed(0)
    return MoEUTLM(tiny_config(context_length=24)).eval()


def _random_questions(rng: random.Random, n: int, vocab: int = 53):
    qs = []
    for i in range(n):
        ctx = [rng.randrange(vocab) for _ in range(rng.choice([0, 1, 3, 9, 17]))]
        cands = []
        for _ in range(rng.choice([1, 2, 4, 5])):
            shared = [rng.randrange(vocab)] * rng.choice([0, 0, 2])  # candidates that share leading tokens
            cont = shared + [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
            cands.append((ctx + cont, len(ctx)))
        if i % 5 == 0:
            cands.append(cands[0])  # a duplicate candidate (ARC has a few)
        qs.append(cands)
    return qs


# (64, 0.25): the defaults; call cost 0: a forward pass per continuation length; fraction 2: no sharing at all
@pytest.mark.parametrize("call_cost,min_shared", [(64, 0.25), (0, 0.25), (64, 2.0)])
def test_batched_shared_prefix_scores_equal_each_candidate_run_alone(real_model, monkeypatch, call_cost, min_shared):
    monkeypatch.setattr(scoring, "CALL_COST_TOKENS", call_cost)
    monkeypatch.setattr(scoring, "MIN_SHARED_FRACTION", min_shared)
    qs = _random_questions(random.Random(1), 30)
    got = score_candidates(real_model, qs, batch_size=7)
    for q, res in zip(qs, got):
        assert len(res) == len(q)
        for (toks, start), s in zip(q, res):
            lp, am = _brute_force(real_model, toks, start)
            np.testing.assert_allclose(s.logprobs, lp, atol=2e-5, rtol=0)
            assert np.array_equal(s.greedy, am)
            if not s.truncated:
                assert np.array_equal(s.targets, toks[max(1, start):])
    assert any(s.truncated for res in got for s in res)


def test_sequences_longer_than_the_context_keep_their_last_tokens(real_model):
    T = real_model.cfg.context_length
    rng = random.Random(2)
    long_ctx = [rng.randrange(53) for _ in range(T + 10)]
    q = [(long_ctx + [5, 6, 7], len(long_ctx)), (long_ctx + [8], len(long_ctx))]
    (a, b), = score_candidates(real_model, [q], batch_size=4)
    assert a.truncated and b.truncated
    for (toks, start), s in zip(q, (a, b)):
        kept = toks[-(T + 1):]
        with torch.inference_mode():
            logp = real_model(torch.tensor([kept])).logits.float().log_softmax(-1)[0]
        n = len(toks) - start  # the continuation is scored whole
        want = logp[:-1].gather(-1, torch.tensor(kept[1:])[:, None]).squeeze(-1)[-n:]
        np.testing.assert_allclose(s.logprobs, want.double().numpy(), atol=2e-5, rtol=0)


def test_a_shared_context_is_run_once_per_question(bigram):
    ctx = ids("Question: why?\nAnswer:")
    conts = [ids(" because"), ids(" no"), ids(" it is red")]
    q = [(ctx + c, len(ctx)) for c in conts]
    score_candidates(bigram, [q, q], batch_size=8)
    prefix_call, rest_call = bigram.calls
    # the prefix pass sees each question's context (and the space all continuations start with) once;
    # the second pass only the rest of each continuation
    assert prefix_call == (2, len(ctx) + 1)
    assert rest_call == (6, max(len(c) for c in conts) - 1)


def test_rows_are_split_into_forward_passes_only_when_padding_costs_more_than_a_call():
    assert _chunks([3, 4, 3, 4], call_cost=64) == ([[0, 2, 1, 3]], 4 * 4 + 64)
    assert _chunks([2, 100, 3, 90], call_cost=64) == ([[0, 2], [3, 1]], 2 * 3 + 2 * 100 + 2 * 64)
    assert sorted(r for c in _chunks([5, 1, 9, 9, 2, 7], call_cost=0)[0] for r in c) == list(range(6))


def test_strict_winner_and_lm_eval_argmax_on_ties():
    assert strict_winner([-1.0, -2.0]) == 0
    assert strict_winner([-1.0, -1.0, -3.0]) is None
    assert not paper_correct([-1.0, -1.0], 0)  # a tie at the top is wrong for the paper
    assert lm_eval_choice([-1.0, -1.0]) == 0  # lm-eval takes the first
    assert paper_correct([-3.0, -1.0], 1)


def _designed_question(model):
    """Context 'q:' and two choices: ' a' (1 token after the space, sum -2.0, mean -1.0) and ' bbbb'
    (sum -2.5 over 5 tokens, mean -0.5)."""
    model.set(":", " ", -0.5)
    model.set(" ", "a", -1.5)
    model.set(" ", "b", -0.5)
    model.set("b", "b", -0.5)
    return Choice(context="q:", choices=[" a", " bbbb"], gold=1)


def test_mean_per_token_and_summed_scores_pick_different_candidates(bigram, enc):
    ex = _designed_question(bigram)
    (s,) = score_choices(bigram, enc, [ex])
    np.testing.assert_allclose(s.total, [-2.0, -2.5], atol=1e-5)
    assert list(s.tokens) == [2, 5] and list(s.chars) == [1, 4]
    mean = summarize_choices("piqa", [ex], [s])  # mean per token: ' bbbb' (-0.5) beats ' a' (-1.0)
    assert mean["accuracy"] == 1.0
    assert mean["acc"] == 0.0  # lm-eval acc sums: ' a' (-2.0) beats ' bbbb' (-2.5)
    assert mean["acc_norm"] == 1.0  # per character: -2.0/1 vs -2.5/4


def test_blimp_sums_and_never_scores_the_first_token(bigram, enc):
    # good 'xy', bad 'zw': only the second token counts; its log-prob decides
    bigram.set("x", "y", -1.0)
    bigram.set("z", "w", -2.0)
    good_first = Choice(context="", choices=["xy", "zw"], gold=0, group="p1", info={"field": "syntax"})
    bad_first = Choice(context="", choices=["zw", "xy"], gold=0, group="p2", info={"field": "semantics"})
    tie = Choice(context="", choices=["xy", "xy"], gold=0, group="p2", info={"field": "semantics"})
    scores = score_choices(bigram, enc, [good_first, bad_first, tie])
    np.testing.assert_allclose(scores[0].total, [-1.0, -2.0], atol=1e-5)
    assert list(scores[0].tokens) == [1, 1]  # first tokens excluded
    r = summarize_choices("blimp", [good_first, bad_first, tie], scores)
    assert r["paradigms"] == {"p1": 1.0, "p2": 0.0}
    assert r["accuracy"] == 0.5  # mean over paradigms, not over pairs
    assert r["accuracy_pairs"] == pytest.approx(1 / 3)
    assert r["fields"] == {"semantics": 0.0, "syntax": 1.0}


def test_lambada_counts_a_multi_token_word_only_when_every_token_is_predicted(bigram, enc):
    for a, b in zip("e c", " ca"):  # argmax after 'e' is ' ', after ' ' is 'c', after 'c' is 'a'
        bigram.set(a, b, -0.1)
    bigram.set("a", "t", -0.2)  # '... the cat': ' cat' predicted in full
    examples = [Cloze("the", " cat"), Cloze("the", " cab")]
    r = score_lambada(bigram, enc, examples)
    assert r["accuracy"] == 0.5 and r["acc"] == 0.5 and r["n"] == 2
    nll_cat = (0.1 + 0.1 + 0.1 + 0.2) / 4
    nll_cab = (0.1 + 0.1 + 0.1 - bigram.other_logp("a")) / 4
    assert math.log(r["target_ppl"]) == pytest.approx((nll_cat + nll_cab) / 2, rel=1e-4)
    assert math.log(r["ppl"]) == pytest.approx(2 * (nll_cat + nll_cab), rel=1e-4)  # lm-eval: exp(-mean sum)


def test_arc_reports_four_choice_questions_as_the_paper_number_and_all_questions_beside(bigram, enc):
    bigram.set(" ", "a", -0.1)
    four = Choice(context="Q:", choices=[" a", " b", " c", " d"], gold=0)
    three = Choice(context="Q:", choices=[" a", " b", " c"], gold=2)
    r = summarize_choices("arc_easy", [four, three], score_choices(bigram, enc, [four, three]))
    assert (r["accuracy"], r["n"]) == (1.0, 1)
    assert (r["accuracy_all"], r["n_all"]) == (0.5, 2)


def test_cbt_averages_its_types(bigram, enc):
    bigram.set(" ", "a", -0.1)
    exs = [Choice("x", [" a", " b"], 0, group="CN"), Choice("x", [" a", " b"], 1, group="NE"),
           Choice("x", [" a", " b"], 0, group="NE")]
    r = summarize_choices("cbt", exs, score_choices(bigram, enc, exs))
    assert r["types"]["CN"]["accuracy"] == 1.0 and r["types"]["NE"]["accuracy"] == 0.5
    assert r["accuracy"] == 0.75


def test_average_is_over_the_evaluated_tasks_and_names_the_missing():
    avg = average_accuracy({"blimp": {"accuracy": 0.6}, "piqa": {"accuracy": 0.8}, "cbt": {"accuracy": None}})
    assert avg["accuracy"] == pytest.approx(0.7) and avg["tasks"] == ["blimp", "piqa"]
    assert avg["not_evaluated"] == ["cbt"]  # only the tasks asked for: lambada was not


def test_no_average_without_an_evaluated_zero_shot_task():
    assert average_accuracy({"ppl": {"ppl": 9.0}}) is None
    assert average_accuracy({"ppl": {"ppl": 9.0}, "piqa": {"accuracy": None, "status": "not evaluated"}}) is None
