"""The output head and the training cross-entropy, optionally in recomputed chunks of tokens.

    logits = W_out · x + b_out;   CE = mean over tokens of −log softmax(logits)[next token]

For a vocabulary of V, the head's logits, their log-softmax and both gradients are four ``[tokens, V]`` fp32
tensors alive at once at the start of the backward pass (4 × 4096 tokens × 8000 × 4 bytes ≈ 0.5 GB for a batch
of 8 × 512). Once the layer applications are recomputed (activation checkpointing) that is most of the peak
memory, so :func:`chunked_cross_entropy` computes the head and the loss over chunks of ``chunk_tokens`` tokens,
each under :func:`torch.utils.checkpoint.checkpoint`: the forward pass keeps only the head's inputs, the
backward pass recomputes one chunk's logits at a time. Same loss and gradients up to the summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 of ``logits`` ``[..., V]`` against ``targets`` ``[...]``."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


def _chunk_ce_sum(head: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(x).float(), targets, reduction="sum")


def chunked_cross_entropy(head: nn.Module, features: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """:func:`cross_entropy` of ``head(features)`` without holding the logits of every token: the head and the
    loss run over chunks of ``chunk_tokens`` tokens, each recomputed in the backward pass."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    x = features.flatten(0, -2)
    t = targets.flatten()
    total = torch.zeros((), device=x.device, dtype=torch.float32)
    for xc, tc in zip(x.split(chunk_tokens), t.split(chunk_tokens)):
        total = total + checkpoint(_chunk_ce_sum, head, xc, tc, use_reentrant=False)
    return total / t.numel()
