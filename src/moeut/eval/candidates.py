"""Step 3 of a task's walk: examples become the token sequences to score, by the paper's protocol.

The paper's protocol (the authors' evaluation code): no BOS token; the first token of a sequence is
never scored; context and continuation are tokenised separately and concatenated (:func:`encode_pair`);
each candidate is scored as if alone. A *candidate* is ``(tokens, score_from)``: score
``tokens[score_from:]``, each token given the tokens before it; a *question* is the list of candidates
that compete (one for a LAMBADA passage).
"""

from __future__ import annotations

from collections.abc import Sequence

from moeut.eval.encoding import Encoder
from moeut.eval.examples import Choice, Cloze

Candidate = tuple[Sequence[int], int]  # (tokens, index of the first scored token)


def encode_pair(encoder: Encoder, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokenised separately; whitespace at the end of the context moves to the
    continuation (so ``"… the " + "dog"`` is scored as ``"… the" + " dog"``, one ``▁dog`` token)."""
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    return encoder.encode_context(context), encoder.encode_continuation(continuation)


def choice_candidates(encoder: Encoder, ex: Choice) -> list[tuple[list[int], int]]:
    """Token sequences and first scored positions of a question's candidates. Without a context each
    choice is a whole document (BLiMP), scored from its second token."""
    if not ex.context:
        return [(encoder.encode_context(c), 1) for c in ex.choices]
    out = []
    for c in ex.choices:
        ctx, cont = encode_pair(encoder, ex.context, c)
        out.append((ctx + cont, len(ctx)))
    return out


def cloze_candidate(encoder: Encoder, ex: Cloze) -> tuple[list[tuple[list[int], int]], str]:
    """A LAMBADA passage as a one-candidate question, and its target as the text its tokens decode to
    (what the argmax predictions must decode to exactly)."""
    ctx, cont = encode_pair(encoder, ex.context, ex.target)
    return [(ctx + cont, len(ctx))], encoder.decode_continuation(cont)
