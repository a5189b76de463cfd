"""Softmax top-k routing of the Sparse Universal Transformer (Tan et al., 2023), as the authors' code does it.

    logits = W₂ · tanh(W₁ · x + b₁)                        MLP router (no bias on the last layer)
    p      = softmax(logits)                                p(e|x), zeroed for frozen (halted) tokens
    E      = top-k(p)              (training with sample_topk = s: top-(k−s) greedily, then s experts
                                    sampled from the remaining probability mass + 1e-6)
    g_e    = p_e / (Σ_{e' ∈ E} p_e' + 1e-6)                 the selected gates, renormalised to sum to 1
"""

from __future__ import annotations

import torch
from torch import nn

from moeut.model.routing import Routing


class MLPRouter(nn.Module):
    """``Linear(d, d) → tanh → Linear(d, E, bias=False)`` (the SUT router), torch's default init."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.hidden = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, n_experts, bias=False)

    def reset_parameters(self) -> None:
        self.hidden.reset_parameters()
        self.out.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def softmax_topk(logits: torch.Tensor, k: int, *, active: torch.Tensor | None = None, sample_topk: int = 0,
                 training: bool = False, generator: torch.Generator | None = None) -> Routing:
    """Top-k of ``softmax(logits)`` ``[..., E]`` with gates renormalised to sum to 1 (up to the authors' 1e-6).

    ``active`` ``[...]``: rows where it is 0 (frozen tokens) get all-zero probabilities and gates. With
    ``training`` and ``sample_topk = s > 0`` the last ``s`` of the ``k`` experts are sampled (without
    replacement) from the probabilities of the experts not already taken. The returned ``logits`` are the
    router logits (fp32), for the mutual-information loss.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    if active is not None:
        probs = probs.masked_fill((active == 0).unsqueeze(-1), 0.0)
    if training and sample_topk > 0:
        flat = probs.reshape(-1, probs.shape[-1])
        greedy = flat.topk(k - sample_topk, dim=-1).indices
        rest = (flat + 1e-6).scatter(-1, greedy, 0.0)
        sampled = torch.multinomial(rest, sample_topk, generator=generator)
        indices = torch.cat([greedy, sampled], dim=-1).view(*probs.shape[:-1], k)
        gates = probs.gather(-1, indices)
    else:
        gates, indices = probs.topk(k, dim=-1)
    gates = gates / (gates.sum(-1, keepdim=True) + 1e-6)
    return Routing(logits=logits, gates=gates, indices=indices)
