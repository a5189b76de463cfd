"""The one perplexity routine (training's validation and ``moeut eval``'s ppl task): total next-token NLL of
token windows ``[B, T+1]``, in fp32, summed in float64. ``ppl = exp(nll / tokens)``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class NLLTotals:
    nll: float  # total, nats
    tokens: int  # targets scored
    bytes: int  # UTF-8 bytes of the scored targets (0 without ``token_bytes``)
    windows: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


@torch.no_grad()
def window_nll(model: torch.nn.Module, batches: Iterable[torch.Tensor], *, token_bytes: np.ndarray | None = None,
               max_windows: int | None = None, progress: Callable[[int], None] | None = None,
               repeats: int | None = None) -> NLLTotals:
    """Score every window of ``batches``: the first ``T`` tokens are the input, all ``T`` targets count.
    ``token_bytes[id]``: bytes per token (for bits per byte). ``max_windows`` stops early. ``repeats``: apply the
    shared layers that many times (depth at inference; None = the model's configured depth). The model is in
    eval mode while scoring and goes back to its previous mode afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64)
    n_tok = n_bytes = n_win = 0
    try:
        for batch in batches:
            if max_windows is not None:
                batch = batch[:max(0, max_windows - n_win)]
                if batch.shape[0] == 0:
                    break
            batch = batch.to(device)
            logits = (model(batch[:, :-1]) if repeats is None else model(batch[:, :-1], repeats=repeats)).logits.float()
            targets = batch[:, 1:]
            nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double().cpu()
            n_tok += targets.numel()
            n_win += batch.shape[0]
            if token_bytes is not None:
                n_bytes += int(token_bytes[targets.cpu().numpy()].sum())
            if progress is not None:
                progress(batch.shape[0])
    finally:
        model.train(was_training)
    return NLLTotals(nll=float(nll), tokens=n_tok, bytes=n_bytes, windows=n_win)
