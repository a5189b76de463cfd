"""Norms of the residual stream around each layer application (paper, App. A.2), from the hidden states a
forward pass returns with ``output_hidden_states=True``. Training logs them (:mod:`moeut.train.metrics`),
the residual-norm analysis tabulates and plots them."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def residual_norm_stats(hidden_states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over tokens of ‖x_i‖ (``n+1`` entries) and ‖x_{i+1} − x_i‖ (``n`` entries), float64, and nothing
    else: divide by the number of tokens (``B·T``) for the means."""
    hs = torch.stack([h.detach().float() for h in hidden_states])  # [n+1, B, T, d]
    res = hs.norm(dim=-1).double().flatten(1).sum(-1)
    upd = (hs[1:] - hs[:-1]).norm(dim=-1).double().flatten(1).sum(-1)
    return res, upd
