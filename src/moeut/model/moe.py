"""σ-MoE feed-forward block (Csordás et al., 2023), as used by MoEUT (Sec. 2.1).

    s = LN(x) · W_Sᵀ                         router logits, W_S ∈ R^{N_E × d}
    E = top-K(σ(s))                          K of N_E experts, gates not renormalised
    y = Σ_{e ∈ E} σ(s_e) · ReLU(x · W₁ᵉ) · W₂ᵉ     W₁ᵉ ∈ R^{d × d_e} ("keys"), W₂ᵉ ∈ R^{d_e × d} ("values")

The experts read the *raw* residual x; only the router sees the LayerNorm (peri-LayerNorm, Sec. 2.4).
With loss-free balancing (``selection_bias=True``) the top-K is taken over σ(s) + b, b the buffer
``expert_sel_bias`` [N_E] (:mod:`moeut.model.routing`); the gates stay σ(s).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeut.model.routing import Routing, sigmoid_topk
from moeut.ops import sigma_moe_experts
from moeut.ops.plan import make_plan


class SigmaMoE(nn.Module):
    def __init__(self, d_model: int, n_experts: int, expert_size: int, k: int, backend: str | None = None,
                 selection_bias: bool = False):
        super().__init__()
        self.d_model, self.n_experts, self.expert_size, self.top_k = d_model, n_experts, expert_size, k
        self.backend = backend
        self.keys = nn.Parameter(torch.empty(n_experts, d_model, expert_size))  # W₁, up-projections
        self.values = nn.Parameter(torch.empty(n_experts, expert_size, d_model))  # W₂, down-projections
        self.expert_sel = nn.Parameter(torch.empty(n_experts, d_model))  # W_S, router
        # loss-free balancing: b of the selection, moved by the trainer (not the optimizer); saved with the weights
        self.expert_sel_bias = nn.Buffer(torch.zeros(n_experts)) if selection_bias else None

    @torch.no_grad()
    def reset_parameters(self, std_scale: float) -> None:
        """The init of the paper's training code (``layers/moe_layer.py``): N(0, s/√d) for keys and router,
        N(0, s/√(N_E·d_e)) for values. The router rows are *not* renormalised: the training code does that
        only under ``lm.trafo.xl_init``, which no paper run sets (the minimal reference repo always does)."""
        nn.init.normal_(self.expert_sel, 0, std_scale / math.sqrt(self.d_model))
        nn.init.normal_(self.keys, 0, std_scale / math.sqrt(self.d_model))
        nn.init.normal_(self.values, 0, std_scale / math.sqrt(self.n_experts * self.expert_size))
        if self.expert_sel_bias is not None:
            self.expert_sel_bias.zero_()

    def forward(self, x: torch.Tensor, router_input: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """``x``: raw residual ``[B, T, d]``; ``router_input``: ``LN(x)``. Returns ``(y, routing)``."""
        routing = sigmoid_topk(router_input, self.expert_sel, self.top_k, bias=self.expert_sel_bias)
        ids = routing.indices.reshape(-1, self.top_k)
        plan = make_plan(ids, self.n_experts)  # one sort by expert, shared by both projections
        y = sigma_moe_experts(x.reshape(-1, self.d_model), ids, routing.gates.reshape(-1, self.top_k), self.keys,
                              self.values, backend=self.backend, plan=plan)  # Σ_k g_k · ReLU(x W₁) W₂
        return y.view_as(x), routing

