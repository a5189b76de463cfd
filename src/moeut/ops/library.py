"""``torch.ops.moeut.expert_matmul`` and ``torch.ops.moeut.sigma_moe``: the fast paths as custom operators.

Registering them with ``torch.library`` (schema, a fake implementation for shape propagation, and
autograd) lets ``torch.compile`` put whole MoE layers into one graph: the ops are opaque to the compiler, so
what happens inside (host syncs of the loops, Triton launches) never breaks the graph.
``torch.library.opcheck`` tests the registration (tests/ops/test_library.py).

All four operators are functional (no input is mutated, no output aliases an input):

* ``moeut::expert_matmul(x, weight, gates?, perm, inv_perm, offsets, out_groups, strategy, need_gate_grad)
  -> (y, rows, side_rows)``. ``strategy`` is an encoded :class:`~moeut.ops.strategy.Strategy` (the choice
  made before the op, :meth:`~moeut.ops.policy.GemmPolicy.choose`); ``rows``/``side_rows`` are what forward
  keeps for backward, or empty ``[0, d_in]`` tensors, as :class:`~moeut.ops.context.MatmulContext` says.
* ``moeut::expert_matmul_backward(grad_y, x, rows, side_rows, weight, gates?, perm, inv_perm, offsets,
  out_groups, strategy, need_gate_grad, need_x, need_w, need_gates) -> (grad_x, grad_weight, grad_gates)``
  — empty ``[0]`` tensors stand for gradients that were not asked for.
* ``moeut::sigma_moe(x [N, d], keys, values, gates [N, K], perm, inv_perm, offsets, strategy)
  -> (y [N, d_out], rows [M | 0, d], hidden [M, d_e])`` and its backward: the torch backend's fused
  up- and down-projection (:mod:`moeut.ops.sigma_moe`).

Forward, backward and fake kernel all derive what is kept, and its shapes, from the op's arguments through
the same code (:meth:`MatmulContext.of`, :meth:`Strategy.routing_sized`); the real forward checks its
tensors against those shapes. The plan (:class:`~moeut.ops.plan.ExpertPlan`) travels as its three tensors;
``E`` is ``weight``'s first dimension and ``(N, S)`` follow from ``x`` and ``perm``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moeut.ops import strategy as st
from moeut.ops import torch_backend, triton_backend  # triton_backend imports triton only when it runs
from moeut.ops.context import MatmulContext, Needs
from moeut.ops.plan import ExpertPlan
from moeut.ops.sigma_moe import FusedNeeds, sigma_moe_backward, sigma_moe_forward
from moeut.ops.strategy import Strategy, decode


def _plan(n: int, s: int, weight: Tensor, perm: Tensor, inv_perm: Tensor, offsets: Tensor) -> ExpertPlan:
    return ExpertPlan((n, s), weight.shape[0], perm, inv_perm, offsets, perm)  # sorted_ids unused here


def _kept_rows(strategy: Strategy, n_slots: int, kept: bool) -> int:
    """For a fake kernel: rows of a kept sorted tensor. ``M = N·S``, or in the block layout a number the routing
    decides (a dynamic size; created only when something is kept, as every unbacked size must be bound)."""
    if kept and strategy.routing_sized:
        return torch.library.get_ctx().new_dynamic_size()
    return n_slots


def _context(x: Tensor, weight: Tensor, gates: Optional[Tensor], perm: Tensor, out_groups: int, strategy: str,
             need_gate_grad: bool) -> MatmulContext:
    return MatmulContext.of(x, weight, gates, perm.shape[0], out_groups, decode(strategy), need_gate_grad)


@torch.library.custom_op("moeut::expert_matmul", mutates_args=())
def expert_matmul_op(x: Tensor, weight: Tensor, gates: Optional[Tensor], perm: Tensor, inv_perm: Tensor,
                     offsets: Tensor, out_groups: int, strategy: str,
                     need_gate_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    ctx = _context(x, weight, gates, perm, out_groups, strategy, need_gate_grad)
    plan = _plan(ctx.n, ctx.s, weight, perm, inv_perm, offsets)
    if ctx.strategy.kernel == st.TRITON:
        y, rows, side = triton_backend.forward(x, weight, gates, plan, out_groups, False, need_gate_grad)
    else:
        y, rows, side = torch_backend.forward(x, weight, gates, plan, ctx)
    empty = x.new_empty(0, ctx.d_in)  # what was not kept (the fake's shape for it)
    rows = empty if rows is None else rows
    side = empty.clone() if side is None else side
    m = max(rows.shape[0], side.shape[0])
    if (tuple(rows.shape), tuple(side.shape)) != ctx.saved_shapes(m):
        raise AssertionError(f"moeut::expert_matmul kept {tuple(rows.shape)} and {tuple(side.shape)}, but its "
                             f"fake kernel says {ctx.saved_shapes(m)} for {ctx}")
    return y, rows, side


@expert_matmul_op.register_fake
def _(x, weight, gates, perm, inv_perm, offsets, out_groups, strategy, need_gate_grad):
    ctx = _context(x, weight, gates, perm, out_groups, strategy, need_gate_grad)
    m = _kept_rows(ctx.strategy, perm.shape[0], ctx.keep_rows or bool(ctx.keep_side))
    shape_rows, shape_side = ctx.saved_shapes(m)
    return x.new_empty(ctx.n, ctx.g_out, ctx.d_out), x.new_empty(shape_rows), x.new_empty(shape_side)


@torch.library.custom_op("moeut::expert_matmul_backward", mutates_args=())
def expert_matmul_backward_op(grad_y: Tensor, x: Tensor, rows: Tensor, side_rows: Tensor, weight: Tensor,
                              gates: Optional[Tensor], perm: Tensor, inv_perm: Tensor, offsets: Tensor,
                              out_groups: int, strategy: str, need_gate_grad: bool, need_x: bool, need_w: bool,
                              need_gates: bool) -> tuple[Tensor, Tensor, Tensor]:
    ctx = _context(x, weight, gates, perm, out_groups, strategy, need_gate_grad)
    plan = _plan(ctx.n, ctx.s, weight, perm, inv_perm, offsets)
    if ctx.strategy.kernel == st.TRITON:
        gx, gw, gc = triton_backend.backward(grad_y, x, None, None, weight, gates, plan, out_groups, need_x, need_w,
                                             need_gates)
    else:
        gx, gw, gc = torch_backend.backward(grad_y, x, rows if ctx.keep_rows else None,
                                            side_rows if ctx.keep_side else None, weight, gates, plan, ctx,
                                            Needs(need_x, need_w, need_gates))
    empty = x.new_empty(0)
    return (gx if need_x else empty, gw if need_w else empty.clone(),
            gc if need_gates and gates is not None else empty.clone())


@expert_matmul_backward_op.register_fake
def _(grad_y, x, rows, side_rows, weight, gates, perm, inv_perm, offsets, out_groups, strategy, need_gate_grad,
      need_x, need_w, need_gates):
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            x.new_empty(gates.shape if need_gates and gates is not None else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, gates, perm, inv_perm, offsets, out_groups, strategy, need_gate_grad = inputs
    _, rows, side = output
    ctx.save_for_backward(x, rows, side, weight, gates, perm, inv_perm, offsets)
    ctx.out_groups, ctx.strategy, ctx.need_gate_grad = out_groups, strategy, need_gate_grad
    # the saved-row outputs never get a gradient: without this autograd would fill an [M, d] zero tensor
    # for each of them on every backward (benchmarks/README.md)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_rows, _grad_side):
    if grad_y is None:  # y did not reach the loss
        return (None,) * 9
    x, rows, side, weight, gates, perm, inv_perm, offsets = ctx.saved_tensors
    need_x, need_w, need_c = ctx.needs_input_grad[:3]
    gx, gw, gc = expert_matmul_backward_op(grad_y, x, rows, side, weight, gates, perm, inv_perm, offsets,
                                           ctx.out_groups, ctx.strategy, ctx.need_gate_grad, need_x, need_w, need_c)
    return (gx if need_x else None, gw if need_w else None, gc if need_c else None,
            None, None, None, None, None, None)


expert_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def expert_matmul_planned(x: Tensor, weight: Tensor, gates: Optional[Tensor], plan: ExpertPlan, out_groups: int,
                          strategy: Strategy) -> Tensor:
    """The custom op for validated inputs (``x`` 3D, one dtype and device), a plan for these ids and the
    strategy chosen for them."""
    need_gate_grad = gates is not None and gates.requires_grad and torch.is_grad_enabled()
    y, _, _ = torch.ops.moeut.expert_matmul(x, weight, gates, plan.perm, plan.inv_perm, plan.offsets, out_groups,
                                            strategy.encode(), need_gate_grad)
    return y


# ----------------------------------------------------------------------------- σ-MoE experts, fused
@torch.library.custom_op("moeut::sigma_moe", mutates_args=())
def sigma_moe_op(x: Tensor, keys: Tensor, values: Tensor, gates: Tensor, perm: Tensor, inv_perm: Tensor,
                 offsets: Tensor, strategy: str) -> tuple[Tensor, Tensor, Tensor]:
    plan = ExpertPlan(tuple(gates.shape), keys.shape[0], perm, inv_perm, offsets, perm)
    chosen = decode(strategy)
    y, rows, hidden = sigma_moe_forward(x, keys, values, gates, plan, chosen)
    if rows is None:
        rows = x.new_empty(0, x.shape[1])
    if (tuple(rows.shape), tuple(hidden.shape)) != _sigma_kept_shapes(x, keys, chosen, hidden.shape[0]):
        raise AssertionError(f"moeut::sigma_moe kept {tuple(rows.shape)} and {tuple(hidden.shape)}, but its fake "
                             f"kernel says {_sigma_kept_shapes(x, keys, chosen, hidden.shape[0])} for {chosen}")
    return y, rows, hidden


def _sigma_kept_shapes(x: Tensor, keys: Tensor, strategy: Strategy, m: int) -> tuple[tuple[int, int], ...]:
    """``(rows, hidden)`` shapes when ``m`` sorted rows are kept: the gathered input rows with ``save_rows``,
    the post-ReLU hidden rows always."""
    return (m if strategy.save_rows else 0, x.shape[1]), (m, keys.shape[2])


@sigma_moe_op.register_fake
def _(x, keys, values, gates, perm, inv_perm, offsets, strategy):
    chosen = decode(strategy)
    kept = x.shape[0] != 0 and perm.shape[0] != 0  # nothing runs without rows or slots
    shape_rows, shape_hidden = _sigma_kept_shapes(x, keys, chosen, _kept_rows(chosen, perm.shape[0], True) if kept
                                                  else 0)
    return x.new_empty(x.shape[0], values.shape[2]), x.new_empty(shape_rows), x.new_empty(shape_hidden)


@torch.library.custom_op("moeut::sigma_moe_backward", mutates_args=())
def sigma_moe_backward_op(grad_y: Tensor, x: Tensor, rows: Tensor, hidden: Tensor, keys: Tensor, values: Tensor,
                          gates: Tensor, perm: Tensor, inv_perm: Tensor, offsets: Tensor, strategy: str,
                          need_x: bool, need_keys: bool, need_values: bool, need_gates: bool) -> list[Tensor]:
    plan = ExpertPlan(tuple(gates.shape), keys.shape[0], perm, inv_perm, offsets, perm)
    chosen = decode(strategy)
    grads = sigma_moe_backward(grad_y, x, rows if chosen.save_rows else None, hidden, keys, values, gates, plan,
                               chosen, FusedNeeds(need_x, need_keys, need_values, need_gates))
    return [g if g is not None else x.new_empty(0) for g in grads]


@sigma_moe_backward_op.register_fake
def _(grad_y, x, rows, hidden, keys, values, gates, perm, inv_perm, offsets, strategy, need_x, need_keys,
      need_values, need_gates):
    return [t.new_empty(t.shape if need else (0,))
            for t, need in ((x, need_x), (keys, need_keys), (values, need_values), (gates, need_gates))]


def _sigma_setup_context(ctx, inputs, output) -> None:
    x, keys, values, gates, perm, inv_perm, offsets, strategy = inputs
    _, rows, hidden = output
    ctx.save_for_backward(x, rows, hidden, keys, values, gates, perm, inv_perm, offsets)
    ctx.strategy = strategy
    ctx.set_materialize_grads(False)  # no [M, d] / [M, d_e] zero gradients for the saved outputs


def _sigma_backward(ctx, grad_y, _grad_rows, _grad_hidden):
    if grad_y is None:
        return (None,) * 8
    x, rows, hidden, keys, values, gates, perm, inv_perm, offsets = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    grads = sigma_moe_backward_op(grad_y, x, rows, hidden, keys, values, gates, perm, inv_perm, offsets,
                                  ctx.strategy, *needs)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None)


sigma_moe_op.register_autograd(_sigma_backward, setup_context=_sigma_setup_context)


def sigma_moe_planned(x: Tensor, keys: Tensor, values: Tensor, gates: Tensor, plan: ExpertPlan,
                      strategy: Strategy) -> Tensor:
    """The fused op for validated inputs of one dtype and a plan for these ids."""
    y, _, _ = torch.ops.moeut.sigma_moe(x, keys, values, gates, plan.perm, plan.inv_perm, plan.offsets,
                                        strategy.encode())
    return y
