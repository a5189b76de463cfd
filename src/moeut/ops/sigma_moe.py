"""The σ-MoE experts fused (torch backend): ``y = Σ_k c_k · ReLU(x W₁[e_k]) W₂[e_k]`` in one sorted order.

Two separate expert matmuls would unsort the hidden rows ``h`` after the up-projection and gather them again
before the down-projection (and likewise ``∂h`` in backward); here they stay sorted by expert between the
two GEMMs. Called by the ``moeut::sigma_moe`` custom op (:mod:`moeut.ops.library`), with a ``GROUPED_MM``,
``MM`` or ``BLOCKS`` :class:`~moeut.ops.strategy.Strategy`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeut.ops.plan import ExpertPlan
from moeut.ops.sorted_gemm import SortedGemm
from moeut.ops.strategy import Strategy
from moeut.ops.unsort import fresh_view


class FusedNeeds(NamedTuple):
    """Which gradients the fused backward computes."""

    x: bool
    keys: bool
    values: bool
    gates: bool


def sigma_moe_forward(x2d: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor,
                      plan: ExpertPlan, strategy: Strategy) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(y [N, d_out], a | None, h)``: ``a`` the gathered input rows (kept with ``strategy.save_rows``),
    ``h`` the sorted post-ReLU hidden rows (always kept)."""
    n, d = x2d.shape
    k = plan.shape[1]
    if n == 0 or k == 0:
        return x2d.new_zeros(n, values.shape[2]), None, x2d.new_zeros(0, keys.shape[2])
    gemm = SortedGemm(strategy, plan)
    a = gemm.gather(x2d, gemm.rows(k), pad=not strategy.save_rows)  # [M, d] (returned when kept: contiguous)
    h = gemm.mm(a, keys).relu_()  # [M, d_e], row stride padded by grouped_mm if d_e needs it
    # Σ_k c_k (h_k W₂): the gates are applied by the unsort, so no pass over the rows multiplies them
    y = fresh_view(gemm.unsort(gemm.mm(h, values), n, 1, gates), (n, values.shape[2]))
    return y, (a if strategy.save_rows else None), h.contiguous()  # an op output: contiguous, as its fake says


def sigma_moe_backward(grad_y: torch.Tensor, x2d: torch.Tensor, a: torch.Tensor | None, h: torch.Tensor,
                       keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor, plan: ExpertPlan,
                       strategy: Strategy, needs: FusedNeeds) -> tuple[torch.Tensor | None, ...]:
    """``(∂x, ∂W₁, ∂W₂, ∂gates)`` (None where ``needs`` does not ask).

    With ``t = ∂y_m W₂ᵀ``: ``∂c_m = h_m · t_m``, ``∂h_m = c_m t_m ⊙ [h_m > 0]``, ``∂W₂ = Σ c_m h_mᵀ ∂y_m``.
    """
    n, d = x2d.shape
    k = plan.shape[1]
    if n == 0 or k == 0:
        return (torch.zeros_like(x2d) if needs.x else None, torch.zeros_like(keys) if needs.keys else None,
                torch.zeros_like(values) if needs.values else None, torch.zeros_like(gates) if needs.gates else None)
    gemm = SortedGemm(strategy, plan)
    rows = gemm.rows(k)
    c = gemm.sorted_gates(gates)
    g = gemm.gather(grad_y.contiguous(), rows)  # [M, d]
    grad_x = grad_keys = grad_values = grad_gates = None
    if needs.values:  # the gate on the narrower side
        grad_values = (gemm.wgrad(gemm.scaled(h, c), g) if keys.shape[2] <= values.shape[2]
                       else gemm.wgrad(h, gemm.scaled(g, c)))
    if needs.x or needs.keys or needs.gates:
        t = gemm.mm(g, values.transpose(1, 2))  # [M, d_e]
        if needs.gates:
            grad_gates = (t * h).sum(1).index_select(0, gemm.layout.inv_perm).view_as(gates)
        dh = torch.ops.aten.threshold_backward(t.mul_(c), h, 0)  # c_m t_m where h_m > 0, one pass
        if needs.keys:
            if a is None:
                a = gemm.gather(x2d, rows)
            grad_keys = gemm.wgrad(a, dh)
        if needs.x:
            grad_x = fresh_view(gemm.unsort(gemm.mm(dh, keys.transpose(1, 2)), n, 1), (n, d))
    return grad_x, grad_keys, grad_values, grad_gates
