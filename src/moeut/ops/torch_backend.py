"""Fast pure-PyTorch expert matmul (CPU and GPU): sort slots by expert, grouped GEMMs, unsort.

The ``M = N·S`` slots are sorted by expert once, through an :class:`~moeut.ops.plan.ExpertPlan` shared by
the two matmuls of a layer; then every expert's rows are contiguous. How the GEMMs then run is the
:class:`~moeut.ops.strategy.Strategy` that :meth:`~moeut.ops.policy.GemmPolicy.choose` picked:

* ``LOOP`` (:mod:`moeut.ops.streamed_loop`): expert by expert, small reused buffers, nothing kept.
* ``GROUPED_MM``, ``MM``, ``BLOCKS`` (:class:`~moeut.ops.sorted_gemm.SortedGemm`): whole-tensor steps.
  Forward gathers the input row of every sorted slot, ``a = x[perm // (S/G_in)]`` ``[M, d_in]``, runs
  one grouped GEMM ``y_m = a_m @ W[e_m]`` and unsorts; backward gathers ``g`` and runs two more. With
  ``save_rows`` forward returns what backward would gather again (:mod:`moeut.ops.context`).

Unsort: a gather ``y[inv_perm]`` when every slot is its own output group, else the sum of the ``S/G_out``
slots of each group (:mod:`moeut.ops.unsort`). The gate ``c_m`` scales the narrower of the input and the
output row; on the output side the unsort applies it.

Called by the ``moeut::expert_matmul`` custom op (:mod:`moeut.ops.library`), which owns autograd.
"""

from __future__ import annotations

import torch

from moeut.ops import strategy as st
from moeut.ops.context import INPUT_GATE, OUTPUT_GATE, RAW_OUTPUT, MatmulContext, Needs
from moeut.ops.plan import ExpertPlan
from moeut.ops.sorted_gemm import SortedGemm
from moeut.ops.streamed_loop import loop_backward, loop_forward
from moeut.ops.unsort import unsort_reduce

Tensor = torch.Tensor
Grads = tuple[Tensor | None, Tensor | None, Tensor | None]  # ∂x, ∂W, ∂gates; None where not asked for


def forward(x: torch.Tensor, weight: torch.Tensor, gates: torch.Tensor | None, plan: ExpertPlan,
            ctx: MatmulContext) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(y [N, G_out, d_out], rows, side)``: ``rows``/``side`` the tensors ``ctx`` says to keep, else None."""
    if ctx.empty:
        return x.new_zeros(ctx.n, ctx.g_out, ctx.d_out), None, None
    x2d = x.reshape(ctx.n * ctx.g_in, ctx.d_in)
    scale_input = ctx.gate == INPUT_GATE
    out_gates = gates if ctx.gate == OUTPUT_GATE else None  # applied by the unsort
    if ctx.strategy.kernel == st.LOOP:
        c = gates.reshape(-1).index_select(0, plan.perm).unsqueeze(1) if scale_input else None
        y = loop_forward(x2d, plan.rows(ctx.s // ctx.g_in), weight, plan, c, scale_input)
        return unsort_reduce(y, plan, ctx.n, ctx.g_out, out_gates), None, None
    k = SortedGemm(ctx.strategy, plan)
    # [M, d_in] sorted by expert; not padded when kept (the op's outputs are contiguous): grouped_mm then pads a
    # copy if the width needs it
    a = k.gather(x2d, k.rows(ctx.s // ctx.g_in), pad=not ctx.strategy.save_rows)
    side = None
    if scale_input:
        c = k.sorted_gates(gates)
        side = a * c if ctx.keep_rows else a.mul_(c)  # ungated a kept for ∂c
        y = k.mm(side, weight)
    else:
        y = k.mm(a, weight)
        if ctx.keep_side == RAW_OUTPUT:
            side = y.contiguous()  # ungated output rows for ∂c
    y = k.unsort(y, ctx.n, ctx.g_out, out_gates)
    return y, (a if ctx.keep_rows else None), (side if ctx.keep_side else None)


def backward(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None, side: torch.Tensor | None,
             weight: torch.Tensor, gates: torch.Tensor | None, plan: ExpertPlan, ctx: MatmulContext,
             needs: Needs) -> Grads:
    """``(∂x, ∂W, ∂gates)`` (None where ``needs`` does not ask) from what :func:`forward` kept for ``ctx``."""
    if ctx.empty:
        return (x.new_zeros(x.shape) if needs.x else None, torch.zeros_like(weight) if needs.w else None,
                torch.zeros_like(gates) if needs.c else None)
    # contiguous(): gathering rows of a broadcast gradient (e.g. of ``.sum()``, stride 0) is much slower
    # (benchmarks/README.md)
    g2d = grad_out.contiguous().view(ctx.n * ctx.g_out, ctx.d_out)
    x2d = x.reshape(ctx.n * ctx.g_in, ctx.d_in)
    if ctx.strategy.kernel == st.LOOP:
        return _loop_backward(g2d, x2d, weight, gates, plan, ctx, needs)
    k = SortedGemm(ctx.strategy, plan)
    c = None if gates is None else k.sorted_gates(gates)
    rows_in = k.rows(ctx.s // ctx.g_in)
    a_in = side if ctx.gate == INPUT_GATE else None  # gated input rows
    if ctx.gate == INPUT_GATE:
        need_a = needs.c or (needs.w and a_in is None)
    else:
        need_a = needs.w or (needs.c and ctx.keep_side != RAW_OUTPUT)
    a = rows
    if a is None and need_a:  # not kept: gather again
        a = k.gather(x2d, rows_in)
    g = k.gather(g2d, k.rows(ctx.s // ctx.g_out))  # [M, d_out]
    if ctx.keep_side == RAW_OUTPUT:
        return _grads_output_gate(k, a, side, g, c, weight, gates, ctx, needs)
    return _grads(k, a, a_in, g, c, weight, gates, ctx, needs)


def _loop_backward(g2d: Tensor, x2d: Tensor, weight: Tensor, gates: Tensor | None, plan: ExpertPlan,
                   ctx: MatmulContext, needs: Needs) -> Grads:
    c = None if gates is None else gates.reshape(-1).index_select(0, plan.perm).unsqueeze(1)
    t, grad_w, gc = loop_backward(x2d, plan.rows(ctx.s // ctx.g_in), g2d, plan.rows(ctx.s // ctx.g_out), weight,
                                  plan, c, ctx.gate == INPUT_GATE, needs)
    grad_c = gc.index_select(0, plan.inv_perm).view_as(gates) if needs.c else None
    grad_x = unsort_reduce(t, plan, ctx.n, ctx.g_in) if needs.x else None
    return grad_x, grad_w, grad_c


def _grads_output_gate(k: SortedGemm, a: Tensor | None, y_raw: Tensor, g: Tensor, c: Tensor, weight: Tensor,
                       gates: Tensor, ctx: MatmulContext, needs: Needs) -> Grads:
    """Gate on the output side, ungated output rows kept: ``g̃_m = c_m g_m`` serves both ``∂W_e = Σ a_mᵀ g̃_m``
    and ``∂x_m = g̃_m W_eᵀ``, and ``∂c_m = (a_m W_e)·g_m`` is a row dot product at the narrow width ``d_out``."""
    grad_x = grad_w = grad_c = None
    g_c = k.scaled(g, c) if needs.w or needs.x else None  # c_m g_m, [M, d_out]
    if needs.w:
        grad_w = k.wgrad(a, g_c)
    if needs.c:
        grad_c = (y_raw * g).sum(1).index_select(0, k.layout.inv_perm).view_as(gates)
    if needs.x:
        grad_x = k.unsort(k.mm(g_c, weight.transpose(1, 2)), ctx.n, ctx.g_in)
    return grad_x, grad_w, grad_c


def _grads(k: SortedGemm, a: Tensor | None, a_in: Tensor | None, g: Tensor, c: Tensor | None, weight: Tensor,
           gates: Tensor | None, ctx: MatmulContext, needs: Needs) -> Grads:
    """``∂W_e = Σ c_m a_mᵀ g_m`` (``c`` applied to the narrower side), ``t_m = g_m W_eᵀ``, ``∂c_m = a_m·t_m``,
    ``∂x_m = c_m t_m`` (the gate applied by the unsort)."""
    grad_x = grad_w = grad_c = None
    if needs.w:
        if c is None:
            grad_w = k.wgrad(a, g)
        elif ctx.gate == INPUT_GATE:
            grad_w = k.wgrad(a_in if a_in is not None else k.scaled(a, c), g)
        else:
            grad_w = k.wgrad(a, k.scaled(g, c))
    if needs.x or needs.c:
        t = k.mm(g, weight.transpose(1, 2))  # g_m W_eᵀ, [M, d_in]
        if needs.c:
            grad_c = (a * t).sum(1).index_select(0, k.layout.inv_perm).view_as(gates)
        if needs.x:
            grad_x = k.unsort(t, ctx.n, ctx.g_in, gates)
    return grad_x, grad_w, grad_c
