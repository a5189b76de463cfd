"""Sigmoid top-k expert selection shared by σ-MoE and SwitchHead (Sec. 2.1, Eq. 5–6 of the σ-MoE paper)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """The outcome of routing N rows to k of E experts (possibly per head)."""

    logits: torch.Tensor  # [..., E] router logits s = x · W_Sᵀ, fp32 (input to the regulariser)
    gates: torch.Tensor  # [..., k] σ(s) of the selected experts (differentiable, fp32)
    indices: torch.Tensor  # [..., k] selected expert ids (int64, no gradient), unsorted


def sigmoid_topk(x: torch.Tensor, router: torch.Tensor, k: int, n_heads: int = 1) -> Routing:
    """Router logits in fp32, sigmoid gates, top-k per head. No renormalisation of the gates.

    ``x``: ``[..., d]``; ``router``: ``[n_heads·E, d]``. Returns logits ``[..., (n_heads,) E]``.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = F.linear(x.float(), router.float())
    if n_heads > 1:
        logits = logits.unflatten(-1, (n_heads, -1))
    scores = torch.sigmoid(logits)
    gates, indices = scores.topk(k, dim=-1, sorted=False)
    return Routing(logits=logits, gates=gates, indices=indices)


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How often each expert id in ``indices`` was selected: ``[n_experts]`` int64, no host sync."""
    with torch.no_grad():
        flat = indices.reshape(-1)
        return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
