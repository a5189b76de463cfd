"""Mixture of attention heads (MoA) of the Sparse Universal Transformer (Zhang et al., 2022; Tan et al., 2023).

N_A experts, each owning ``h`` heads of width d_h (expert width ``h·d_h``); top-K_A experts per token from a
softmax MLP router (gates renormalised to sum to 1). Queries and outputs are experts; keys and values are
shared by all experts (head j of every expert attends with the shared key/value head j):

    q_e = x_q · W_Qᵉ · d_h^{-1/4}   (e ∈ top-K_A, no gate),   k = x_kv · W_K · d_h^{-1/4},   v = x_kv · W_V
    A_e = softmax(q_e kᵀ + q_e · R[clip(j − i, ±(P−1))] + causal mask) v
    y   = Σ_e g_e · A_e · W_Oᵉ

R is a learned table per head (``2P+1`` rows of width d_h, zero-initialised; P = ``rel_pos_max``): a
content-dependent relative-position term, the model's only position information. ``x_q`` is the stream
being updated and ``x_kv`` the one attended to (under ACT: the halting-weighted state, see :mod:`moeut.model.sut`).
Distances are counted in sequence slots (left padding keeps the distances of the real tokens).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeut.model.cache import LayerKV
from moeut.model.routing import Routing
from moeut.model.sut_routing import MLPRouter, softmax_topk
from moeut.ops import expert_matmul


class MixtureOfAttentionHeads(nn.Module):
    def __init__(self, d_model: int, n_experts: int, k: int, heads_per_expert: int, d_head: int,
                 rel_pos_max: int = 64, sample_topk: int = 0, backend: str | None = None):
        super().__init__()
        self.d_model, self.n_experts, self.top_k = d_model, n_experts, k
        self.n_heads, self.d_head = heads_per_expert, d_head
        self.rel_pos_max, self.sample_topk = rel_pos_max, sample_topk
        self.backend = backend
        width = heads_per_expert * d_head
        self.router = MLPRouter(d_model, n_experts)
        self.q = nn.Parameter(torch.empty(n_experts, d_model, width))
        self.o = nn.Parameter(torch.empty(n_experts, width, d_model))
        self.k = nn.Linear(d_model, width, bias=False)
        self.v = nn.Linear(d_model, width, bias=False)
        self.rel_pos = nn.Parameter(torch.empty(heads_per_expert, d_head, 2 * rel_pos_max + 1))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The SUT code's init: expert weights U(±1/fan_in), K and V Xavier-uniform with gain 1/√2, R = 0."""
        self.router.reset_parameters()
        for w in (self.q, self.o):
            nn.init.uniform_(w, -1 / w.shape[1], 1 / w.shape[1])
        for lin in (self.k, self.v):
            nn.init.xavier_uniform_(lin.weight, gain=1 / math.sqrt(2))
        nn.init.zeros_(self.rel_pos)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, mask: torch.Tensor | None,
                past: LayerKV | None = None, active: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, LayerKV, Routing]:
        """``x_q``, ``x_kv`` ``[B, T, d]``; ``mask`` True = may attend (``[T, S]`` or ``[B, 1, T, S]``) or None
        (causal); ``past`` cached ``(k, v)``; ``active`` ``[B, T]`` (0 = frozen token). Returns
        ``(y, (k, v), routing)``."""
        B, T, d = x_q.shape
        H, dh, K = self.n_heads, self.d_head, self.top_k
        scale = dh ** -0.25
        routing = softmax_topk(self.router(x_q), K, active=active, sample_topk=self.sample_topk,
                               training=self.training)
        ids = routing.indices.reshape(-1, K)
        q = expert_matmul(x_q.reshape(-1, 1, d), ids, self.q, backend=self.backend)  # [B·T, K, H·d_h]
        # the K selected experts' head j share key/value head j: rows (e, t) of one [B·H, K·T, d_h] batch
        q = (q * scale).view(B, T, K, H, dh).permute(0, 3, 2, 1, 4).reshape(B * H, K * T, dh)
        k = (self.k(x_kv) * scale).view(B, T, H, dh).transpose(1, 2)  # [B, H, T, d_h]
        v = self.v(x_kv).view(B, T, H, dh).transpose(1, 2)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        S = k.shape[2]

        # relative-position logits q · R[clip(s − t)], with masked positions pointing at an extra −inf column
        P = self.rel_pos_max
        q_pos = torch.arange(S - T, S, device=x_q.device).unsqueeze(-1)
        k_pos = torch.arange(S, device=x_q.device)
        rel = (k_pos - q_pos).clamp(1 - P, P - 1) + P  # [T, S] rows of R
        if mask is None:
            allowed = k_pos <= q_pos
        else:
            allowed = mask[:, 0] if mask.dim() == 4 else mask  # [B, T, S] or [T, S]
        rel = torch.where(allowed, rel, 2 * P + 1)  # [T, S] or [B, T, S]
        rel = (rel if rel.dim() == 3 else rel.unsqueeze(0)).unsqueeze(1).unsqueeze(2).expand(B, H, K, T, S)
        rel_logits = torch.matmul(q.view(B, H, K * T, dh), self.rel_pos.to(q.dtype))  # [B, H, K·T, 2P+1]
        rel_logits = torch.cat((rel_logits, rel_logits.new_full((B, H, K * T, 1), float("-inf"))), dim=-1)
        bias = rel_logits.view(B, H, K, T, 2 * P + 2).gather(-1, rel).view(B * H, K * T, S)
        scores = torch.baddbmm(bias, q, k.reshape(B * H, S, dh).transpose(1, 2))
        att = torch.bmm(scores.float().softmax(-1).to(v.dtype), v.reshape(B * H, S, dh))  # [B·H, K·T, d_h]
        att = att.view(B, H, K, T, dh).permute(0, 3, 2, 1, 4).reshape(B * T, K, H * dh)
        y = expert_matmul(att, ids, self.o, routing.gates.reshape(-1, K).to(att.dtype), backend=self.backend)
        return y.view(B, T, d), (k, v), routing
