"""Sorted rows back to token order: a gather, or a (gated) sum of each output group's slots."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeut.ops.plan import ExpertPlan


def fresh_view(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t.view(shape)`` for a tensor made here, returned as a tensor of its own rather than a view (an op
    output that is a view of an intermediate could not be modified in place by the caller)."""
    return torch.ops.aten._unsafe_view(t, shape)


def unsort_reduce(y: torch.Tensor, plan: ExpertPlan, n: int, groups: int,
                  gates: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted ``[M, D]`` → ``[N, groups, D]``, summing the ``S/groups`` slots of each group, each scaled by
    its gate first when ``gates`` (``[N, S]``, in slot order) is given. ``plan`` may be a block layout.

    Returns a fresh tensor, not a view (callers may apply in-place ops to the op's output).
    """
    s, d = plan.shape[1], y.shape[1]
    if groups == s:  # a pure permutation: a gather (faster than the scatter ``index_copy_``)
        out = y.new_empty(n, groups, d)
        torch.index_select(y, 0, plan.inv_perm, out=out.view(n * groups, d))
        return out if gates is None else out.mul_(gates.reshape(n, groups, 1))
    bags = plan.inv_perm.view(n * groups, s // groups)  # the sorted positions of each group's slots
    if y.device.type == "cpu":
        # embedding_bag is a gather and a (weighted) sum in one pass, accumulating in fp32 for bf16: no [M, D]
        # intermediate, no atomics, and the gate multiply comes free as its per-sample weights (faster than
        # index_add_ or gather + sum, benchmarks/README.md). Deterministic: each bag is summed in slot order.
        w = None if gates is None else gates.reshape(n * groups, s // groups)
        return fresh_view(F.embedding_bag(bags, y, mode="sum", per_sample_weights=w), (n, groups, d))
    # GPU: gather + sum (deterministic, unlike a scatter with atomics; bf16 summed in fp32)
    g = y.index_select(0, plan.inv_perm).view(n, groups, s // groups, d)
    if gates is not None:
        g.mul_(gates.reshape(n, groups, s // groups, 1))  # g is a fresh gather: no second [M, D] buffer
    return g.sum(2)
