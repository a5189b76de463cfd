"""Attention: SwitchHead (Csordás et al., 2024; MoEUT Sec. 2.2) and the dense baseline's attention.

SwitchHead, per head h (H heads of width d_h, N_A experts per head, top-K_A):

    q = LN(x)·W_Q,  k = LN(x)·W_K                      dense, each scaled by d_h^{-1/4} (net 1/√d_h)
    g^V = σ(LN(x)·W_SVᵀ),  g^O = σ(LN(x)·W_SOᵀ)        per-head routers, top-K_A of N_A
    V_h = Σ_{e ∈ top} g^V_{h,e} · x·W_V^{h,e}            values from the *raw* residual x
    A_h = softmax(q_h k_hᵀ + causal mask) V_h            RoPE on the first half of q_h and k_h
    y   = Σ_h Σ_{e ∈ top} g^O_{h,e} · A_h·W_O^{h,e}

Expert ``h·N_A + e`` belongs to head h in every expert tensor and router. With loss-free balancing
(``selection_bias=True``) each router has a selection bias, the buffers ``sel_v_bias`` / ``sel_o_bias`` [H·N_A]
(:mod:`moeut.model.routing`): it chooses the top-K_A, the gates stay σ(s).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeut.model.cache import LayerKV
from moeut.model.rope import apply_rope
from moeut.model.routing import Routing, sigmoid_topk
from moeut.ops import expert_matmul


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention over ``[B, H, T, d_h]``; q and k are pre-scaled. ``mask``: True = may attend,
    or None for plain causal attention without a cache."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


class SwitchHead(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_head: int, n_experts: int, k: int,
                 backend: str | None = None, norm_init: bool = False, selection_bias: bool = False):
        super().__init__()
        self.d_model, self.n_heads, self.d_head, self.n_experts, self.top_k = d_model, n_heads, d_head, n_experts, k
        self.backend = backend
        self.norm_init = norm_init  # renormalise the V/O experts across the expert axis (moe.att.norm_init)
        self.q = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.k = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.v = nn.Parameter(torch.empty(n_heads * n_experts, d_model, d_head))
        self.o = nn.Parameter(torch.empty(n_heads * n_experts, d_head, d_model))
        self.sel_v = nn.Parameter(torch.empty(n_heads * n_experts, d_model))
        self.sel_o = nn.Parameter(torch.empty(n_heads * n_experts, d_model))
        # loss-free balancing: b of each router's selection, moved by the trainer; saved with the weights
        self.sel_v_bias = nn.Buffer(torch.zeros(n_heads * n_experts)) if selection_bias else None
        self.sel_o_bias = nn.Buffer(torch.zeros(n_heads * n_experts)) if selection_bias else None

    @torch.no_grad()
    def reset_parameters(self, std_scale: float) -> None:
        """The training code's init: N(0, s/√d) for q, k, V experts and routers (router rows renormalised),
        N(0, s/√(H·d_h)) for O experts; with ``norm_init`` the V and O experts are then renormalised across
        the expert axis, keeping their std (``moe.att.norm_init=1``, set by every ≥126M paper run)."""
        d = self.d_model
        for router in (self.sel_v, self.sel_o):
            nn.init.normal_(router, 0, std_scale / math.sqrt(d))
            renorm_rows_keep_row_std(router)
        nn.init.normal_(self.k.weight, 0, std_scale / math.sqrt(d))
        nn.init.normal_(self.q.weight, 0, std_scale / math.sqrt(d))
        nn.init.normal_(self.v, 0, std_scale / math.sqrt(d))
        nn.init.normal_(self.o, 0, std_scale / math.sqrt(self.n_heads * self.d_head))
        if self.norm_init:
            for experts in (self.v, self.o):
                renorm_over_experts_keep_std(experts)
        for bias in (self.sel_v_bias, self.sel_o_bias):
            if bias is not None:
                bias.zero_()

    def _route(self, xn: torch.Tensor, router: torch.Tensor,
               bias: torch.Tensor | None = None) -> tuple[Routing, torch.Tensor]:
        """Per-head top-K_A; returns the routing and global expert ids ``h·N_A + e`` as ``[N, H·K_A]``."""
        r = sigmoid_topk(xn, router, self.top_k, n_heads=self.n_heads, bias=bias)  # indices [B, T, H, K_A]
        head_offset = torch.arange(self.n_heads, device=xn.device).unsqueeze(-1) * self.n_experts
        return r, (r.indices + head_offset).flatten(-2).reshape(-1, self.n_heads * self.top_k)

    def forward(self, x: torch.Tensor, xn: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, past: LayerKV | None = None,
                ) -> tuple[torch.Tensor, LayerKV, Routing, Routing]:
        """``x``: raw residual, ``xn = LN(x)``, both ``[B, T, d]``. Returns output, new (k, v), routings."""
        B, T, _ = x.shape
        H, dh = self.n_heads, self.d_head
        scale = dh ** -0.25
        q = (self.q(xn) * scale).view(B, T, H, dh).transpose(1, 2)
        k = (self.k(xn) * scale).view(B, T, H, dh).transpose(1, 2)

        route_v, ids_v = self._route(xn, self.sel_v, self.sel_v_bias)
        route_o, ids_o = self._route(xn, self.sel_o, self.sel_o_bias)
        v = expert_matmul(x.reshape(B * T, 1, -1), ids_v, self.v, route_v.gates.reshape(B * T, -1),
                          out_groups=H, backend=self.backend)  # [B·T, H, d_h]
        v = v.view(B, T, H, dh).transpose(1, 2)

        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)

        a = attend(q, k, v, mask).transpose(1, 2).reshape(B * T, H, dh)
        y = expert_matmul(a, ids_o, self.o, route_o.gates.reshape(B * T, -1), backend=self.backend)
        return y.view(B, T, -1), (k, v), route_v, route_o

    # ------------------------------------------------------------------ rows (halted tokens skip their work)
    # The same computation on N rows gathered from anywhere in the batch (``[N, d]``), in three parts, so that a
    # token that only serves as key and value (it has halted) runs ``keys_values`` and nothing else.
    def keys_values(self, x: torch.Tensor, xn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """Rotated keys and the values of rows ``x``/``xn`` ``[N, d]`` at their positions (``cos``/``sin``
        ``[N, n_rotate]``): ``k``, ``v`` ``[N, H, d_h]`` and the value routing."""
        N, H, dh = x.shape[0], self.n_heads, self.d_head
        k = (self.k(xn) * dh ** -0.25).view(N, H, dh).transpose(0, 1)  # [H, N, d_h]: rope over N positions
        route_v, ids_v = self._route(xn, self.sel_v, self.sel_v_bias)
        v = expert_matmul(x.reshape(N, 1, x.shape[-1]), ids_v, self.v, route_v.gates.reshape(N, H * self.top_k),
                          out_groups=H, backend=self.backend)
        return apply_rope(k, cos, sin).transpose(0, 1), v.view(N, H, dh), route_v

    def queries(self, xn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated, pre-scaled queries of rows ``xn`` ``[N, d]``: ``[N, H, d_h]``."""
        N, H, dh = xn.shape[0], self.n_heads, self.d_head
        q = (self.q(xn) * dh ** -0.25).view(N, H, dh).transpose(0, 1)
        return apply_rope(q, cos, sin).transpose(0, 1)

    def project_out(self, a: torch.Tensor, xn: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """The output experts on attention results ``a`` ``[N, H, d_h]`` routed by ``xn``: ``[N, d]``."""
        route_o, ids_o = self._route(xn, self.sel_o, self.sel_o_bias)
        y = expert_matmul(a, ids_o, self.o, route_o.gates.reshape(a.shape[0], self.n_heads * self.top_k),
                          backend=self.backend)
        return y.view(a.shape[0], self.d_model), route_o


class DenseAttention(nn.Module):
    """Multi-head attention of the dense baseline: no biases, RoPE on the first half of each head."""

    def __init__(self, d_model: int, n_heads: int, d_head: int):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.q = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.k = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.v = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.o = nn.Linear(n_heads * d_head, d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self, std_scale: float) -> None:
        for lin in (self.q, self.k, self.v):
            nn.init.normal_(lin.weight, 0, std_scale / math.sqrt(lin.in_features))
        nn.init.normal_(self.o.weight, 0, std_scale / math.sqrt(self.o.in_features))

    def forward(self, xn: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                past: LayerKV | None = None) -> tuple[torch.Tensor, LayerKV]:
        B, T, _ = xn.shape
        scale = self.d_head ** -0.25
        q, k, v = (t.view(B, T, self.n_heads, self.d_head).transpose(1, 2)
                   for t in (self.q(xn) * scale, self.k(xn) * scale, self.v(xn)))
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        a = attend(q, k, v, mask).transpose(1, 2).reshape(B, T, -1)
        return self.o(a), (k, v)


@torch.no_grad()
def renorm_rows_keep_row_std(w: torch.Tensor) -> None:
    """Reference init of SwitchHead routers: unit-norm rows, rescaled by each row's original std over
    the std of the normalised matrix."""
    row_std = w.std(dim=-1, keepdim=True)
    w.div_(w.norm(dim=-1, keepdim=True))
    w.mul_(row_std / w.std())


@torch.no_grad()
def renorm_over_experts_keep_std(w: torch.Tensor) -> None:
    """``moe.att.norm_init`` of the training code: for every (input, output) position, the vector of the
    weights of all ``H·N_A`` experts (dim 0) gets unit norm; then the tensor is rescaled to its original std."""
    std = w.std()
    w.div_(w.norm(dim=0, keepdim=True))
    w.mul_(std / w.std())
