"""The block layout (the ``BLOCKS`` strategy, CPU bf16/fp16): every expert's sorted rows padded to one block.

oneDNN builds a kernel per GEMM shape; with every expert's rows in a block of the same size, each GEMM over
all experts is one ``bmm`` of a shape that recurs, and one large call instead of one per expert: faster than a
loop of ``mm`` at the few percent of extra rows a balanced routing costs (benchmarks/README.md). The block is
the largest expert's row count rounded up to the bucket, so a very unbalanced routing would multiply the work:
past ``max_waste`` extra rows the plain sorted layout (and the bucketed loop of ``mm``) is used instead. The
choice is a function of the routing counts alone, so forward and backward agree.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeut.ops.plan import ExpertPlan


class Blocks(NamedTuple):
    """The sorted layout with every expert's rows padded to one block of ``block`` rows: expert ``e`` owns
    rows ``[e·block, e·block + count_e)`` of an ``[E·block, ·]`` tensor. Quacks like
    :class:`~moeut.ops.plan.ExpertPlan` for the backend (``perm`` holds slot 0 at the pad rows, ``inv_perm``
    the block position of every slot); ``pads`` lists the pad rows, which every gather into this layout
    zeroes, so they add nothing to a weight gradient."""

    shape: tuple[int, int]
    n_experts: int
    perm: torch.Tensor
    inv_perm: torch.Tensor
    offsets: torch.Tensor
    pads: torch.Tensor
    block: int

    rows = ExpertPlan.rows  # perm // ratio, the same rule

    def counts_list(self) -> list[int]:
        return [self.block] * self.n_experts


def block_layout(plan: ExpertPlan, bucket: int, max_waste: float) -> ExpertPlan | Blocks:
    """``plan`` in the block layout (blocks a multiple of ``bucket`` rows), or ``plan`` itself when the
    blocks would add more than ``max_waste`` of extra rows, or there are no rows."""
    counts = plan.counts_list()
    m, e = sum(counts), plan.n_experts
    if not m:
        return plan
    block = -(-max(counts) // bucket) * bucket
    if e * block > (1 + max_waste) * m:
        return plan
    dev = plan.perm.device
    # expert e's rows are e·block + j for j < count_e, in sorted order: the block row of every sorted slot
    used = (torch.arange(block, device=dev) < torch.tensor(counts, device=dev).unsqueeze(1)).view(-1)
    pos = used.nonzero().squeeze(1)  # [M]
    perm = plan.perm.new_zeros(e * block).index_copy_(0, pos, plan.perm)
    return Blocks(plan.shape, e, perm, pos.index_select(0, plan.inv_perm),
                  torch.arange(1, e + 1, device=dev, dtype=torch.int32) * block,
                  (~used).nonzero().squeeze(1), block)
