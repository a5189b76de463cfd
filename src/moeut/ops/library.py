"""``torch.ops.moeut.expert_matmul``: the fast backends as PyTorch custom operators.

Registering the expert matmul with ``torch.library`` (schema, a fake implementation for shape
propagation, and autograd) lets ``torch.compile`` put whole MoE layers into one graph: the op is opaque
to the compiler, so what happens inside (host syncs of the loop fallback, Triton launches) never breaks
the graph. ``torch.library.opcheck`` tests the registration (tests/ops/test_library.py).

Two operators, both functional (no input is mutated, no output aliases an input):

* ``moeut::expert_matmul(x, weight, gates?, perm, inv_perm, offsets, out_groups, backend, save_rows,
  need_gate_grad) -> (y, rows, side_rows)`` — the forward of backend ``backend`` ("torch" or "triton").
  ``rows``/``side_rows`` are what the backend keeps for backward (on CPU: the gathered input rows, and the
  gated input rows or the ungated output rows) or empty ``[0, d_in]`` tensors; their shapes follow from the
  arguments alone (see :func:`_saved_shapes`).
* ``moeut::expert_matmul_backward(grad_y, x, rows, side_rows, weight, gates?, perm, inv_perm, offsets,
  out_groups, backend, need_x, need_w, need_gates) -> (grad_x, grad_weight, grad_gates)`` — empty
  ``[0]`` tensors stand for gradients that were not asked for.

The plan (:class:`~moeut.ops.plan.ExpertPlan`) travels as its three tensors; ``E`` is ``weight``'s first
dimension and ``(N, S)`` follow from ``x`` and ``perm``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moeut.ops import torch_backend, triton_backend  # triton_backend imports triton only when it runs
from moeut.ops.plan import ExpertPlan

def _impl(backend: str):
    if backend == "torch":
        return torch_backend
    if backend == "triton":
        return triton_backend
    raise ValueError(f"moeut::expert_matmul has no backend {backend!r} (known: torch, triton)")


def _plan(x: Tensor, weight: Tensor, perm: Tensor, inv_perm: Tensor, offsets: Tensor) -> ExpertPlan:
    n = x.shape[0]
    s = perm.shape[0] // n if n else 0
    return ExpertPlan((n, s), weight.shape[0], perm, inv_perm, offsets, perm)  # sorted_ids unused here


def _saved_rows(x: Tensor, m: int, save_rows: bool, fake: bool):
    """How many rows a saved-row output has (when it is saved at all): ``M = N·S`` sorted slots, or on a
    CPU in bf16/fp16 a number the routing decides (the torch backend's block layout pads every expert's
    rows to one block size, :func:`moeut.ops.torch_backend._blocked`): a dynamic size for the fake kernel."""
    if not save_rows or x.shape[0] == 0 or m == 0:
        return 0
    if fake and torch_backend.blocks_possible(x):
        return torch.library.get_ctx().new_dynamic_size()
    return m


def _saved_shapes(x: Tensor, weight: Tensor, gates: Optional[Tensor], m: int, save_rows: bool,
                  need_gate_grad: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of ``(rows, side_rows)`` for the fake kernel: a function of the arguments only (``m`` may be a
    dynamic size, see :func:`_saved_rows`).

    ``rows``: the ungated gathered input rows ``[M, d_in]``; ``side_rows``: the gated input rows ``[M, d_in]``
    (gate on the input side) or the ungated output rows ``[M, d_out]`` (gate on the output side, with the
    gates' gradient wanted); see :func:`moeut.ops.torch_backend.forward`."""
    d_in, d_out = x.shape[2], weight.shape[2]
    if not save_rows or x.shape[0] == 0 or (isinstance(m, int) and m == 0):
        return (0, d_in), (0, d_in)
    scale_input = gates is not None and d_in <= d_out
    keep_plain = (not scale_input) or need_gate_grad
    if scale_input:
        side = (m, d_in)
    elif gates is not None and need_gate_grad:
        side = (m, d_out)
    else:
        side = (0, d_in)
    return ((m if keep_plain else 0), d_in), side


@torch.library.custom_op("moeut::expert_matmul", mutates_args=())
def expert_matmul_op(x: Tensor, weight: Tensor, gates: Optional[Tensor], perm: Tensor, inv_perm: Tensor,
                     offsets: Tensor, out_groups: int, backend: str, save_rows: bool,
                     need_gate_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    plan = _plan(x, weight, perm, inv_perm, offsets)
    y, rows, side = _impl(backend).forward(x, weight, gates, plan, out_groups, save_rows, need_gate_grad)
    # what was not kept is an empty [0, d_in] tensor (the fake's shape for it)
    rows = rows if rows is not None and rows.shape[0] else x.new_empty(0, x.shape[2])
    side = side if side is not None and side.shape[0] else x.new_empty(0, x.shape[2])
    return y, rows, side


@expert_matmul_op.register_fake
def _(x, weight, gates, perm, inv_perm, offsets, out_groups, backend, save_rows, need_gate_grad):
    m = _saved_rows(x, perm.shape[0], save_rows, fake=backend == "torch")
    shape_rows, shape_side = _saved_shapes(x, weight, gates, m, save_rows, need_gate_grad)
    return (x.new_empty(x.shape[0], out_groups, weight.shape[2]), x.new_empty(shape_rows),
            x.new_empty(shape_side))


@torch.library.custom_op("moeut::expert_matmul_backward", mutates_args=())
def expert_matmul_backward_op(grad_y: Tensor, x: Tensor, rows: Tensor, side_rows: Tensor, weight: Tensor,
                              gates: Optional[Tensor], perm: Tensor, inv_perm: Tensor, offsets: Tensor,
                              out_groups: int, backend: str, need_x: bool, need_w: bool,
                              need_gates: bool) -> tuple[Tensor, Tensor, Tensor]:
    plan = _plan(x, weight, perm, inv_perm, offsets)
    gx, gw, gc = _impl(backend).backward(grad_y, x, rows if rows.shape[0] else None,
                                         side_rows if side_rows.shape[0] else None, weight, gates, plan,
                                         out_groups, need_x, need_w, need_gates)
    empty = x.new_empty(0)
    return (gx if need_x else empty, gw if need_w else empty.clone(),
            gc if need_gates and gates is not None else empty.clone())


@expert_matmul_backward_op.register_fake
def _(grad_y, x, rows, side_rows, weight, gates, perm, inv_perm, offsets, out_groups, backend, need_x, need_w,
      need_gates):
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            x.new_empty(gates.shape if need_gates and gates is not None else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, gates, perm, inv_perm, offsets, out_groups, backend, _save, _need_c = inputs
    _, rows, side = output
    ctx.save_for_backward(x, rows, side, weight, gates, perm, inv_perm, offsets)
    ctx.out_groups, ctx.backend = out_groups, backend
    # the saved-row outputs never get a gradient: without this autograd would fill an [M, d] zero tensor
    # for each of them on every backward
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_rows, _grad_side):
    if grad_y is None:  # y did not reach the loss
        return (None,) * 10
    x, rows, side, weight, gates, perm, inv_perm, offsets = ctx.saved_tensors
    need_x, need_w, need_c = ctx.needs_input_grad[:3]
    gx, gw, gc = expert_matmul_backward_op(grad_y, x, rows, side, weight, gates, perm, inv_perm, offsets,
                                           ctx.out_groups, ctx.backend, need_x, need_w, need_c)
    return (gx if need_x else None, gw if need_w else None, gc if need_c else None,
            None, None, None, None, None, None, None)


expert_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def expert_matmul_planned(x: Tensor, weight: Tensor, gates: Optional[Tensor], plan: ExpertPlan, out_groups: int,
                          backend: str) -> Tensor:
    """The custom op for validated inputs (``x`` 3D, one dtype and device) and a plan for these ids."""
    save_rows = backend == "torch" and _impl("torch").saves_rows(x.device)
    need_gate_grad = gates is not None and gates.requires_grad and torch.is_grad_enabled()
    y, _, _ = torch.ops.moeut.expert_matmul(x, weight, gates, plan.perm, plan.inv_perm, plan.offsets, out_groups,
                                            backend, save_rows, need_gate_grad)
    return y


# ----------------------------------------------------------------------------- σ-MoE experts, fused
# ``moeut::sigma_moe(x [N, d], keys, values, gates [N, K], perm, inv_perm, offsets, save_rows)
#   -> (y [N, d], rows [M | 0, d], hidden [M, d_e])`` — the torch backend's fused up- and down-projection
# (moeut.ops.torch_backend.sigma_moe_forward); ``hidden`` (sorted post-ReLU rows) is kept for backward.
@torch.library.custom_op("moeut::sigma_moe", mutates_args=())
def sigma_moe_op(x: Tensor, keys: Tensor, values: Tensor, gates: Tensor, perm: Tensor, inv_perm: Tensor,
                 offsets: Tensor, save_rows: bool) -> tuple[Tensor, Tensor, Tensor]:
    plan = ExpertPlan(tuple(gates.shape), keys.shape[0], perm, inv_perm, offsets, perm)
    y, rows, hidden = torch_backend.sigma_moe_forward(x, keys, values, gates, plan, save_rows)
    if rows is None:
        rows = x.new_empty(0, x.shape[1])
    return y, rows, hidden


@sigma_moe_op.register_fake
def _(x, keys, values, gates, perm, inv_perm, offsets, save_rows):
    m = _saved_rows(x, perm.shape[0], True, fake=True)  # the hidden rows are always kept
    return (x.new_empty(x.shape[0], values.shape[2]), x.new_empty(m if save_rows else 0, x.shape[1]),
            x.new_empty(m, keys.shape[2]))


@torch.library.custom_op("moeut::sigma_moe_backward", mutates_args=())
def sigma_moe_backward_op(grad_y: Tensor, x: Tensor, rows: Tensor, hidden: Tensor, keys: Tensor, values: Tensor,
                          gates: Tensor, perm: Tensor, inv_perm: Tensor, offsets: Tensor, need_x: bool,
                          need_keys: bool, need_values: bool, need_gates: bool) -> list[Tensor]:
    plan = ExpertPlan(tuple(gates.shape), keys.shape[0], perm, inv_perm, offsets, perm)
    grads = torch_backend.sigma_moe_backward(grad_y, x, rows if rows.shape[0] else None, hidden, keys, values,
                                             gates, plan, need_x, need_keys, need_values, need_gates)
    return [g if g is not None else x.new_empty(0) for g in grads]


@sigma_moe_backward_op.register_fake
def _(grad_y, x, rows, hidden, keys, values, gates, perm, inv_perm, offsets, need_x, need_keys, need_values,
      need_gates):
    return [t.new_empty(t.shape if need else (0,))
            for t, need in ((x, need_x), (keys, need_keys), (values, need_values), (gates, need_gates))]


def _sigma_setup_context(ctx, inputs, output) -> None:
    x, keys, values, gates, perm, inv_perm, offsets, _save = inputs
    _, rows, hidden = output
    ctx.save_for_backward(x, rows, hidden, keys, values, gates, perm, inv_perm, offsets)
    ctx.set_materialize_grads(False)  # no [M, d] / [M, d_e] zero gradients for the saved outputs


def _sigma_backward(ctx, grad_y, _grad_rows, _grad_hidden):
    if grad_y is None:
        return (None,) * 8
    x, rows, hidden, keys, values, gates, perm, inv_perm, offsets = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    grads = sigma_moe_backward_op(grad_y, x, rows, hidden, keys, values, gates, perm, inv_perm, offsets, *needs)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None)


sigma_moe_op.register_autograd(_sigma_backward, setup_context=_sigma_setup_context)
