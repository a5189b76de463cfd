"""The SUT feed-forward block: a softmax top-k mixture of experts with biases (Tan et al., 2023).

    E, g = softmax_topk(MLPRouter(x))                       greedy top-k, gates renormalised to sum to 1
    y    = Σ_{e ∈ E} g_e · (ReLU(x · W₁ᵉ + b₁ᵉ) · W₂ᵉ + b₂ᵉ)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeut.model.routing import Routing
from moeut.model.sut_routing import MLPRouter, softmax_topk
from moeut.ops import expert_matmul
from moeut.ops.plan import make_plan


class SoftmaxMoE(nn.Module):
    def __init__(self, d_model: int, n_experts: int, expert_size: int, k: int, backend: str | None = None):
        super().__init__()
        self.d_model, self.n_experts, self.expert_size, self.top_k = d_model, n_experts, expert_size, k
        self.backend = backend
        self.router = MLPRouter(d_model, n_experts)
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, expert_size))
        self.b1 = nn.Parameter(torch.empty(n_experts, expert_size))
        self.w2 = nn.Parameter(torch.empty(n_experts, expert_size, d_model))
        self.b2 = nn.Parameter(torch.empty(n_experts, d_model))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The SUT code's init: weights U(±1/fan_in), biases U(±1/√(output width))."""
        self.router.reset_parameters()
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            nn.init.uniform_(w, -1 / w.shape[1], 1 / w.shape[1])
            bound = 1 / math.sqrt(w.shape[2])
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor, active: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """``x`` ``[B, T, d]``; ``active`` ``[B, T]`` (0 = frozen token: gates 0). Returns ``(y, routing)``."""
        # greedy top-k in training too: SUT's sample_topk is for the attention-expert router only
        routing = softmax_topk(self.router(x), self.top_k, active=active)
        ids = routing.indices.reshape(-1, self.top_k)
        gates = routing.gates.reshape(-1, self.top_k).to(x.dtype)
        plan = make_plan(ids, self.n_experts)
        h = expert_matmul(x.reshape(-1, 1, self.d_model), ids, self.w1, backend=self.backend, plan=plan)
        h = F.relu(h + self.b1[ids])  # [N, k, d_e]
        y = expert_matmul(h, ids, self.w2, gates, backend=self.backend, plan=plan)[:, 0]
        y = y + (gates.unsqueeze(-1) * self.b2[ids]).sum(1)
        return y.view_as(x), routing
