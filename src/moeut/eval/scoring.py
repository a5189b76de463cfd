"""Step 4 of a task's walk: log-probabilities of candidate token sequences, batched, with each question's
shared prefix run once through the KV cache.

A *question* is a list of candidates ``(tokens, score_from)`` (:mod:`moeut.eval.candidates`): score ``tokens[score_from:]``, each token
given the tokens before it (the first token of a sequence is never scored, so ``score_from >= 1``). Every
candidate is scored as if run alone from scratch; the batching below only avoids repeated work:

1. the longest token prefix shared by all candidates of a question (the context, often a little more) is
   run once, the prefixes of several questions left-padded into one batch, keeping the KV cache;
2. the rest of every candidate runs on a copy of its question's cache, right-padded (causal attention:
   padding on the right never changes earlier positions); the rows of a batch are sorted by length and
   split into as many forward passes as saves work (:func:`_chunks`).

When the candidates share little (BLiMP's short sentence pairs: under :data:`MIN_SHARED_FRACTION` of
the tokens), or a batch's plain pass costs fewer tokens (:func:`_share_prefixes`), the sequences run
whole in one pass instead. Questions with one candidate always do.

Questions are sorted by shared-prefix length so that a batch holds similar lengths; results come back
in input order. Sequences longer than the model's context keep their last ``max_length + 1`` tokens (``max_length``
inputs, as for perplexity), which :attr:`TokenScores.truncated` reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moeut.eval.candidates import Candidate, choice_candidates, cloze_candidate
from moeut.eval.encoding import Encoder
from moeut.eval.examples import Choice, Cloze
from moeut.model.cache import KVCache


@dataclass
class TokenScores:
    """Per scored token: log p(target | tokens before), the target, and the model's argmax there."""

    logprobs: np.ndarray  # float64 [n]
    targets: np.ndarray  # int64 [n]
    greedy: np.ndarray  # int64 [n]
    truncated: bool = False

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def n(self) -> int:
        return int(self.logprobs.shape[0])

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("-inf")

    @property
    def is_greedy(self) -> bool:
        """Every target is the model's argmax (lm-eval's ``is_greedy``)."""
        return bool(np.array_equal(self.targets, self.greedy))


@dataclass
class _Prepared:
    seqs: list[list[int]]
    starts: list[int]
    prefix: int  # tokens shared by all candidates and run once (each candidate keeps at least one more);
    # 0 for a single candidate
    truncated: list[bool]

    @property
    def length(self) -> int:
        return max(len(s) for s in self.seqs)


def _prepare(question: Sequence[Candidate], max_length: int | None) -> _Prepared:
    seqs, starts, truncated = [], [], []
    for tokens, score_from in question:
        seq = [int(t) for t in tokens]
        if not seq:
            raise ValueError("a candidate has no tokens")
        start = max(1, int(score_from))
        cut = 0 if max_length is None else max(0, len(seq) - (max_length + 1))
        seqs.append(seq[cut:])
        starts.append(max(1, start - cut))
        truncated.append(cut > 0)
    if not seqs:
        raise ValueError("a question has no candidates")
    if len(seqs) == 1:  # nothing to share: one pass, no cache
        return _Prepared(seqs, starts, 0, truncated)
    shared = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < shared and s[i] == first[i]:
            i += 1
        shared = i
    return _Prepared(seqs, starts, shared, truncated)


# A forward pass costs about as much as this many extra (padding) tokens (its fixed cost per call; tuned on
# CPU with benchmarks/eval_speed.py).
CALL_COST_TOKENS = 64
# Below this fraction of tokens saved, sharing prefixes is not worth its second pass (BLiMP's short sentence
# pairs fall below it; PIQA, HellaSwag and ARC-Easy are well above).
MIN_SHARED_FRACTION = 0.25


def _batches(prepared: list[_Prepared], batch_size: int) -> list[list[int]]:
    """Question indices, longest shared prefix first (so the left-padded prefix pass wastes little),
    packed so that a batch holds at most ``batch_size`` candidates."""
    order = sorted(range(len(prepared)), key=lambda i: (-prepared[i].prefix, -prepared[i].length))
    out: list[list[int]] = []
    rows = 0
    for i in order:
        n = len(prepared[i].seqs)
        if out and rows + n <= batch_size:
            out[-1].append(i)
            rows += n
        else:
            out.append([i])
            rows = n
    return out


def _chunks(lengths: Sequence[int], call_cost: int | None = None) -> tuple[list[list[int]], int]:
    """Row indices grouped into forward passes, and the cost in tokens: rows sorted by length, cut where
    the padding saved outweighs a call (exact minimum of Σ rows·longest + call_cost, dynamic programming)."""
    call_cost = CALL_COST_TOKENS if call_cost is None else call_cost
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    n = len(order)
    best, cut = [0] + [0] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        best[j], cut[j] = min((best[i] + (j - i) * longest + call_cost, i) for i in range(j))
    out, j = [], n
    while j > 0:
        out.append(order[cut[j]:j])
        j = cut[j]
    return out[::-1], best[n]


def _share_prefixes(qs: list[_Prepared]) -> list[_Prepared]:
    """The batch as it is (shared prefixes run once), or with nothing shared when a single pass over the
    whole sequences costs less (short sequences with little in common, such as BLiMP's pairs)."""
    Lmax = max(q.prefix for q in qs)
    if Lmax == 0:
        return qs
    shared = len(qs) * Lmax + CALL_COST_TOKENS + _chunks([len(s) - q.prefix for q in qs for s in q.seqs])[1]
    plain = _chunks([len(s) for q in qs for s in q.seqs])[1]
    if shared < plain:
        return qs
    return [_Prepared(q.seqs, q.starts, 0, q.truncated) for q in qs]


@torch.inference_mode()
def score_candidates(model: torch.nn.Module, questions: Sequence[Sequence[Candidate]], *, batch_size: int = 64,
                     max_length: int | None = None, pad_id: int = 0,
                     progress: Callable[[list[int]], None] | None = None) -> list[list[TokenScores]]:
    """:class:`TokenScores` for every candidate of every question (see the module docstring).

    ``batch_size`` bounds the candidate rows of one forward pass; ``max_length`` defaults to the model's
    ``cfg.context_length``. ``progress`` is called with the indices of the questions finished by each batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_length is None:
        max_length = getattr(getattr(model, "cfg", None), "context_length", None)
    prepared = [_prepare(q, max_length) for q in questions]
    saved = sum((len(q.seqs) - 1) * q.prefix for q in prepared)
    if saved < MIN_SHARED_FRACTION * sum(len(s) for q in prepared for s in q.seqs):
        # little in common (BLiMP): one plain pass per batch, batches sorted by length, is faster
        prepared = [_Prepared(q.seqs, q.starts, 0, q.truncated) for q in prepared]
    results: list[list[TokenScores] | None] = [None] * len(prepared)
    device = next(model.parameters()).device
    for batch in _batches(prepared, batch_size):
        for i, scores in zip(batch, _score_batch(model, [prepared[i] for i in batch], device, pad_id)):
            results[i] = scores
        if progress is not None:
            progress(batch)
    return results  # type: ignore[return-value]


def _target_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """From ``[B, T, V]`` logits: log p of ``tokens[:, 1:]`` ``[B, T-1]``, the argmax ``[B, T]``, and the
    log-probabilities at the last position ``[B, V]`` (log p = logit - logsumexp, no [B, T, V] copy)."""
    logits = logits.float()
    lse = logits.logsumexp(-1)
    target = (logits[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1) - lse[:, :-1]).double().cpu().numpy()
    return target, logits.argmax(-1).cpu().numpy(), logits[:, -1] - lse[:, -1:]


def _score_batch(model, qs: list[_Prepared], device: torch.device, pad_id: int) -> list[list[TokenScores]]:
    qs = _share_prefixes(qs)
    Lmax = max(q.prefix for q in qs)
    rows = [(qi, ci) for qi, q in enumerate(qs) for ci in range(len(q.seqs))]
    rest = [qs[qi].seqs[ci][qs[qi].prefix:] for qi, ci in rows]

    # 1. shared prefixes, left-padded, once per question
    layers, pmask, padded = None, None, False
    if Lmax > 0:
        ptoks = torch.full((len(qs), Lmax), pad_id, dtype=torch.long)
        pmask = torch.zeros((len(qs), Lmax), dtype=torch.long)
        for qi, q in enumerate(qs):
            if q.prefix:
                ptoks[qi, Lmax - q.prefix:] = torch.tensor(q.seqs[0][:q.prefix])
                pmask[qi, Lmax - q.prefix:] = 1
        ptoks, pmask = ptoks.to(device), pmask.to(device)
        padded = bool((pmask == 0).any())
        out = model(ptoks, cache=KVCache(), attention_mask=pmask if padded else None)
        p_target, p_argmax, p_last = _target_logprobs(out.logits, ptoks)  # p_last predicts the first token after
        layers = out.cache.layers
        del out

    # 2. the rest of every candidate, right-padded, on a copy of its question's cache; rows of similar
    #    length share a forward pass
    c_target: list[np.ndarray | None] = [None] * len(rows)
    c_argmax: list[np.ndarray | None] = [None] * len(rows)
    first = np.zeros(len(rows))
    for chunk in _chunks([len(r) for r in rest])[0]:
        K = max(len(rest[r]) for r in chunk)
        ctoks = torch.full((len(chunk), K), pad_id, dtype=torch.long)
        for j, r in enumerate(chunk):
            ctoks[j, :len(rest[r])] = torch.tensor(rest[r])
        ctoks = ctoks.to(device)
        cache, mask = None, None
        if layers is not None:
            q_index = torch.tensor([rows[r][0] for r in chunk], device=device)
            cache = KVCache({i: (k.index_select(0, q_index), v.index_select(0, q_index))
                             for i, (k, v) in layers.items()})
            if padded:
                mask = torch.cat([pmask.index_select(0, q_index),
                                  torch.ones((len(chunk), K), dtype=torch.long, device=device)], dim=1)
            first[chunk] = p_last.index_select(0, q_index).gather(-1, ctoks[:, :1]).squeeze(-1).double().cpu().numpy()
        target, argmax, _ = _target_logprobs(model(ctoks, cache=cache, attention_mask=mask).logits, ctoks)
        for j, r in enumerate(chunk):
            c_target[r], c_argmax[r] = target[j], argmax[j]

    results: list[list[TokenScores]] = [[] for _ in qs]
    for r, (qi, ci) in enumerate(rows):
        q = qs[qi]
        seq, start, n, k = q.seqs[ci], q.starts[ci], len(q.seqs[ci]), len(rest[r])
        if q.prefix > 0:
            off = Lmax - q.prefix
            # entry t-1 holds token t (t = 1 … n-1): prefix tokens, the first token after it, the rest
            lp = np.concatenate([p_target[qi, off:Lmax - 1], first[r:r + 1], c_target[r][:k - 1]])
            am = np.concatenate([p_argmax[qi, off:Lmax], c_argmax[r][:k - 1]])
        else:
            lp, am = c_target[r][:k - 1], c_argmax[r][:k - 1]
        results[qi].append(TokenScores(logprobs=lp[start - 1:n - 1].astype(np.float64),
                                       targets=np.asarray(seq[start:n], dtype=np.int64),
                                       greedy=am[start - 1:n - 1].astype(np.int64), truncated=q.truncated[ci]))
    return results


# ----------------------------------------------------------------------------- one task's examples


@dataclass
class ChoiceScores:
    """One question: per candidate, the summed log-probability of its scored tokens, their number, and the
    characters of the choice (for ``acc_norm``)."""

    total: np.ndarray  # float64 [n_choices]
    tokens: np.ndarray  # int64
    chars: np.ndarray  # int64
    truncated: bool = False

    def paper_scores(self, how: str) -> np.ndarray:
        if how == "sum":
            return self.total
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.tokens > 0, self.total / np.maximum(self.tokens, 1), -np.inf)


def score_choices(model: torch.nn.Module, encoder: Encoder, examples: Sequence[Choice], *, batch_size: int = 64,
                  max_length: int | None = None,
                  progress: Callable[[list[int]], None] | None = None) -> list[ChoiceScores]:
    questions = [choice_candidates(encoder, ex) for ex in examples]
    scored = score_candidates(model, questions, batch_size=batch_size, max_length=max_length,
                              pad_id=encoder.eos_id, progress=progress)
    out = []
    for ex, cands in zip(examples, scored):
        out.append(ChoiceScores(total=np.array([c.total for c in cands], dtype=np.float64),
                                tokens=np.array([c.n for c in cands], dtype=np.int64),
                                chars=np.array([len(ch) - ch.startswith(" ") for ch in ex.choices], dtype=np.int64),
                                truncated=any(c.truncated for c in cands)))
    return out


@dataclass
class ClozeScores:
    """One LAMBADA passage: its target's :class:`TokenScores`, and whether the argmax predictions at the
    target's positions (teacher forced) decode to exactly the target."""

    target: TokenScores
    correct: bool


def score_clozes(model: torch.nn.Module, encoder: Encoder, examples: Sequence[Cloze], *, batch_size: int = 64,
                 max_length: int | None = None,
                 progress: Callable[[list[int]], None] | None = None) -> list[ClozeScores]:
    questions, targets = [], []
    for ex in examples:
        question, target = cloze_candidate(encoder, ex)
        questions.append(question)
        targets.append(target)
    scored = score_candidates(model, questions, batch_size=batch_size, max_length=max_length,
                              pad_id=encoder.eos_id, progress=progress)
    return [ClozeScores(target=s, correct=encoder.decode_continuation(s.greedy.tolist()) == target)
            for (s,), target in zip(scored, targets)]
