"""Perplexity and bits per byte of a text or a prepared shard set.

The token stream is cut into non-overlapping windows of ``T + 1`` tokens (``T`` = the model's context):
the first ``T`` are the input, every one of the ``T`` targets is scored, in fp32; the tail shorter than a
window is not used (as in training's validation). ``ppl = exp(total NLL / targets)``. Bits per byte,
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
import torch.nn.functional as F

from moeut.data import META_FILE, EvalWindows, TokenDataset
from moeut.eval.encoding import Encoder


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


class TokenArray:
    """An in-memory token stream with the ``num_tokens``/``window`` interface of :class:`moeut.data.TokenDataset`."""

    def __init__(self, tokens) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def window(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start:start + length]


@torch.inference_mode()
def perplexity(model: torch.nn.Module, dataset, *, seq_len: int | None = None, batch_size: int = 8,
               token_bytes: np.ndarray | None = None, max_windows: int | None = None,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity of ``dataset`` (a :class:`moeut.data.TokenDataset` or :class:`TokenArray`) over
    non-overlapping ``seq_len + 1`` windows (``seq_len`` defaults to the model's context).
    ``token_bytes[id]``: bytes per token, for bits per byte (NaN without it). ``max_windows`` limits the windows."""
    seq_len = seq_len or model.cfg.context_length
    windows = EvalWindows(dataset, batch_size, seq_len)
    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64)
    n_tok = n_bytes = n_win = 0
    for batch in windows:
        if max_windows is not None:
            batch = batch[:max(0, max_windows - n_win)]
            if batch.shape[0] == 0:
                break
        batch = batch.to(device)
        logits = model(batch[:, :-1]).logits.float()
        targets = batch[:, 1:]
        nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double().cpu()
        n_tok += targets.numel()
        n_win += batch.shape[0]
        if token_bytes is not None:
            n_bytes += int(token_bytes[targets.cpu().numpy()].sum())
        if progress is not None:
            progress(batch.shape[0])
    if n_tok == 0:
        raise ValueError(f"the data holds {dataset.num_tokens} tokens, less than one window of {seq_len + 1}: "
                         "give more text or a smaller context")
    total = float(nll)
    bpb = total / math.log(2) / n_bytes if n_bytes else float("nan")
    return PerplexityResult(ppl=math.exp(total / n_tok), bpb=bpb, nll=total, tokens=n_tok, bytes=n_bytes,
                            windows=n_win)


def text_tokens(path: str | Path, encoder: Encoder) -> TokenArray:
    """A text file as one document, tokenised as training documents are (dummy prefix, no EOS)."""
    text = Path(path).read_text(encoding="utf-8")
    return TokenArray(encoder.encode_context(text))


def open_ppl_data(path: str | Path, encoder: Encoder, tokenizer_sha256: str | None = None):
    """A ``--ppl-data`` argument as a token stream: a text file, a prepared split directory (``meta.json``
    inside), or a ``moeut prepare`` output directory (its ``val`` split). Shards must be made with the
    model's tokenizer (checked when ``tokenizer_sha256`` is given)."""
    path = Path(path)
    if path.is_dir():
        if not (path / META_FILE).exists() and (path / "val" / META_FILE).exists():
            path = path / "val"
        return TokenDataset.open(path, expected_tokenizer_sha256=tokenizer_sha256)
    if not path.is_file():
        raise FileNotFoundError(f"--ppl-data {path} does not exist (give a text file or a directory of "
                                "token shards written by `moeut prepare`)")
    return text_tokens(path, encoder)
