"""Perplexity and bits per byte of a text or a prepared shard set.

The token stream is cut into non-overlapping windows of ``T + 1`` tokens (``T`` = the model's context):
the first ``T`` are the input, every one of the ``T`` targets is scored, in fp32; the tail shorter than a
window is not used (as in training's validation, which uses the same routine,
:func:`moeut.model.perplexity.window_nll`). ``ppl = exp(total NLL / targets)``. Bits per byte,
``total NLL / ln 2 / bytes``, counts the UTF-8 bytes the scored target tokens stand for (``▁`` is a
space, a byte piece one byte, EOS none), so models with different tokenizers can be compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeut.data import EvalWindows, TokenArray, open_token_stream
from moeut.eval.encoding import Encoder
from moeut.model.perplexity import window_nll

__all__ = ["PerplexityResult", "TokenArray", "perplexity", "open_ppl_data"]


@dataclass
class PerplexityResult:
    ppl: float
    bpb: float
    nll: float  # total, nats
    tokens: int  # targets scored
    bytes: int
    windows: int

    def to_json(self) -> dict:
        return {"ppl": self.ppl, "bpb": self.bpb, "n": self.tokens, "bytes": self.bytes, "windows": self.windows,
                "nll": self.nll}


@torch.inference_mode()
def perplexity(model: torch.nn.Module, dataset, *, seq_len: int | None = None, batch_size: int = 8,
               token_bytes: np.ndarray | None = None, max_windows: int | None = None,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity of ``dataset`` (a :class:`moeut.data.TokenDataset` or :class:`moeut.data.TokenArray`) over
    non-overlapping ``seq_len + 1`` windows (``seq_len`` defaults to the model's context).
    ``token_bytes[id]``: bytes per token, for bits per byte (NaN without it). ``max_windows`` limits the windows."""
    seq_len = seq_len or model.cfg.context_length
    t = window_nll(model, EvalWindows(dataset, batch_size, seq_len), token_bytes=token_bytes,
                   max_windows=max_windows, progress=progress)
    if t.tokens == 0:
        raise ValueError(f"the data holds {dataset.num_tokens} tokens, less than one window of {seq_len + 1}: "
                         "give more text or a smaller context")
    bpb = t.nll / math.log(2) / t.bytes if t.bytes else float("nan")
    return PerplexityResult(ppl=t.ppl, bpb=bpb, nll=t.nll, tokens=t.tokens, bytes=t.bytes, windows=t.windows)


def open_ppl_data(path: str | Path, encoder: Encoder, tokenizer_sha256: str | None = None):
    """A ``--ppl-data`` argument as a token stream: a text file (one document, tokenised as training documents
    are: dummy prefix, no EOS), a prepared split directory (``meta.json`` inside), or a ``moeut prepare``
    output directory (its ``val`` split). Shards must be made with the model's tokenizer (checked when
    ``tokenizer_sha256`` is given)."""
    return open_token_stream(path, encoder.encode_context, tokenizer_sha256, flag="--ppl-data")
