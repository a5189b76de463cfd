"""Sigmoid top-k expert selection shared by σ-MoE and SwitchHead (Sec. 2.1, Eq. 5–6 of the σ-MoE paper), and
the selection bias of loss-free balancing (DeepSeek-V3's auxiliary-loss-free strategy, arXiv 2412.19437 §2.1.2).

Loss-free balancing (``ModelConfig.balancing = "loss_free"`` or ``"both"``): every router has a per-expert bias b
(a buffer, not a parameter) that is added to the sigmoid scores for the top-k *selection only*; the gates that
weight the experts' outputs stay the unbiased σ(s). After every optimizer step the trainer nudges it by the sign
of each expert's load error over the step's tokens (all data-parallel ranks): ``b_i += u · sign(mean_j c_j − c_i)``
(:func:`loss_free_update`). A shared layer has one bias per router, its counts summed over its applications.
"""

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


def sigmoid_topk(x: torch.Tensor, router: torch.Tensor, k: int, n_heads: int = 1,
                 bias: torch.Tensor | None = None) -> Routing:
    """Router logits in fp32, sigmoid gates, top-k per head. No renormalisation of the gates.

    ``x``: ``[..., d]``; ``router``: ``[n_heads·E, d]``. Returns logits ``[..., (n_heads,) E]``. ``bias``
    (``[n_heads·E]``, loss-free balancing) is added to the scores σ(s) to choose the top-k; the gates are the
    unbiased scores of the chosen experts.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = F.linear(x.float(), router.float())
    if n_heads > 1:
        logits = logits.unflatten(-1, (n_heads, -1))
    scores = torch.sigmoid(logits)
    if bias is None:
        gates, indices = scores.topk(k, dim=-1, sorted=False)
        return Routing(logits=logits, gates=gates, indices=indices)
    with torch.no_grad():
        indices = (scores + bias.float().view(scores.shape[-2:] if n_heads > 1 else (-1,))).topk(
            k, dim=-1, sorted=False).indices
    return Routing(logits=logits, gates=scores.gather(-1, indices), indices=indices)


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How often each expert id in ``indices`` was selected: ``[n_experts]`` int64, no host sync."""
    with torch.no_grad():
        flat = indices.reshape(-1)
        return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))


@torch.no_grad()
def loss_free_update(bias: torch.Tensor, counts: torch.Tensor, rate: float, n_heads: int = 1) -> None:
    """One step of loss-free balancing, in place: ``b_i += rate · sign(mean load − load_i)``.

    ``bias``: ``[n_heads·E]``; ``counts``: how often each expert was selected over the step's tokens, ``[n_heads·E]``.
    The mean is taken within each head (every head selects the same number of experts per token, so it is the same
    for all heads; per head keeps the rule right for any counts). An expert at exactly the mean keeps its bias.
    """
    load = counts.reshape(n_heads, -1).double()
    err = load.mean(-1, keepdim=True) - load
    bias.add_(torch.sign(err).reshape(bias.shape).to(bias.dtype), alpha=rate)
