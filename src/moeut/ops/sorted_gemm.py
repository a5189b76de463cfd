"""The expert GEMMs over rows sorted by expert, run as a :class:`~moeut.ops.strategy.Strategy` says.

:class:`SortedGemm` binds a strategy (``GROUPED_MM``, ``MM`` or ``BLOCKS``) to one call's plan: it picks
the row layout once (the block layout where the routing allows it) and then gathers rows into that layout
and runs every GEMM of forward and backward the same way, so the two passes cannot disagree.
"""

from __future__ import annotations

import torch

from moeut.ops import strategy as st
from moeut.ops.blocks import Blocks, block_layout
from moeut.ops.grouped_mm_layout import aligned_empty, grouped_mm, grouped_mm_wgrad
from moeut.ops.mm_loops import loop_mm, loop_mm_wgrad
from moeut.ops.plan import ExpertPlan
from moeut.ops.strategy import Strategy
from moeut.ops.unsort import fresh_view, unsort_reduce


class SortedGemm:
    """One call's sorted layout and GEMM kernel.

    * ``layout``: the plan, or its :class:`~moeut.ops.blocks.Blocks` (``BLOCKS`` when the routing fits).
    * ``padded``: rows are gathered into buffers with 16-byte row strides, which grouped_mm needs at widths
      like 82 or 412 (``GROUPED_MM`` only: the ``mm``/``bmm`` kernels read contiguous operands).
    """

    def __init__(self, strategy: Strategy, plan: ExpertPlan) -> None:
        self.strategy = strategy
        self.layout: ExpertPlan | Blocks = plan
        if strategy.kernel == st.BLOCKS:
            self.layout = block_layout(plan, strategy.bucket, strategy.max_block_waste)
        self.blocked = isinstance(self.layout, Blocks)
        self.padded = strategy.kernel == st.GROUPED_MM

    def rows(self, ratio: int) -> torch.Tensor:
        """For every sorted row, the row of a ``[N·G, ·]`` tensor with ``G = S // ratio`` it belongs to."""
        return self.layout.rows(ratio)

    def sorted_gates(self, gates: torch.Tensor) -> torch.Tensor:
        """``gates [N, S]`` in sorted order, ``[M, 1]``."""
        return gates.reshape(-1).index_select(0, self.layout.perm).unsqueeze(1)

    def gather(self, src: torch.Tensor, rows: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """``src[rows]`` (``src [R, D]``): the pad rows of a block layout zeroed; with ``pad`` (and grouped_mm)
        written straight into a padded-stride buffer (no pad for rows returned by the op: contiguous)."""
        if self.blocked:
            return src.index_select(0, rows).index_fill_(0, self.layout.pads, 0)
        if not (pad and self.padded):
            return src.index_select(0, rows)
        return torch.index_select(src, 0, rows, out=aligned_empty((rows.shape[0], src.shape[1]), src))

    def scaled(self, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``t * c`` as a new tensor, in a padded-stride buffer for grouped_mm."""
        return torch.mul(t, c, out=aligned_empty(tuple(t.shape), t)) if self.padded else t * c

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[M, K] x [E, K, N] -> [M, N]``, row ``m`` times its expert's matrix (``b`` may be a transposed
        view). Under grouped_mm the result may have a padded row stride."""
        if self.blocked:
            e, blk = self.layout.n_experts, self.layout.block
            return fresh_view(torch.bmm(a.reshape(e, blk, a.shape[1]), b), (e * blk, b.shape[2]))
        if self.padded:
            return grouped_mm(a, b, self.layout.offsets)
        return loop_mm(a, b, self.layout, self.strategy.bucket)

    def wgrad(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``[M, K], [M, N] -> [E, K, N]``: per-expert ``aᵀ g`` (the weight gradient), contiguous."""
        if self.blocked:  # the pad rows are zero in both (gathered into the layout)
            e, blk = self.layout.n_experts, self.layout.block
            return torch.bmm(a.reshape(e, blk, a.shape[1]).transpose(1, 2), g.reshape(e, blk, g.shape[1]))
        if self.padded:
            return grouped_mm_wgrad(a, g, self.layout.offsets)
        return loop_mm_wgrad(a, g, self.layout, self.strategy.bucket)

    def unsort(self, y: torch.Tensor, n: int, groups: int, gates: torch.Tensor | None = None) -> torch.Tensor:
        """Sorted rows → ``[N, groups, D]`` (see :func:`~moeut.ops.unsort.unsort_reduce`)."""
        return unsort_reduce(y, self.layout, n, groups, gates)
