"""What runs one expert matmul: the :class:`Strategy` that :meth:`GemmPolicy.choose` picks.

A strategy is chosen once per call, before the custom op runs, and travels into it as a string argument
(:meth:`Strategy.encode`): the op's forward, its backward and its fake kernel decode the same value, so
they cannot disagree about what forward kept for backward or how many rows that is, and nothing inside the
op reads a setting of its own.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

FEW_SLOTS = "few_slots"  # a weight matrix gathered per slot and one bmm; plain torch ops, not the custom op
LOOP = "loop"  # expert by expert with small reused buffers; nothing gathered is kept for backward
GROUPED_MM = "grouped_mm"  # the slots sorted by expert, one grouped_mm per GEMM (padded row strides)
MM = "mm"  # the slots sorted by expert, a loop of mm over the experts (row counts maybe bucketed)
BLOCKS = "blocks"  # every expert's sorted rows padded to one block, one bmm per GEMM (else MM, bucketed)
TRITON = "triton"  # the Triton gather/scatter kernels (moeut.ops.triton_backend)
KERNELS = (FEW_SLOTS, LOOP, GROUPED_MM, MM, BLOCKS, TRITON)


class Strategy(NamedTuple):
    """How one expert matmul runs.

    * ``kernel``: one of :data:`KERNELS` (the module's constants say what each does).
    * ``save_rows``: forward returns the gathered input rows (and the gate side's rows) for backward
      instead of backward gathering them again (``GROUPED_MM``, ``MM``, ``BLOCKS``).
    * ``bucket``: ``MM``/``BLOCKS``: every GEMM's row count is rounded up to a multiple of this
      (0 = exact counts); ``BLOCKS``: the block size is a multiple of it.
    * ``max_block_waste``: ``BLOCKS``: the block layout is used while its pad rows are at most this
      fraction of the real rows, else the bucketed ``MM`` loop (a routing too unbalanced for blocks).
    """

    kernel: str
    save_rows: bool = False
    bucket: int = 0
    max_block_waste: float = 0.0

    @property
    def sorted_rows(self) -> bool:
        """Does forward gather the sorted input rows into one tensor (and may keep it)?"""
        return self.kernel in (GROUPED_MM, MM, BLOCKS)

    @property
    def routing_sized(self) -> bool:
        """Does the number of rows kept for backward depend on the routing (the block layout), so that a fake
        kernel must give it as a dynamic size?"""
        return self.kernel == BLOCKS

    def encode(self) -> str:
        """The op argument form, e.g. ``"blocks:save=1:bucket=64:waste=0.5"``; :func:`decode` inverts it."""
        return f"{self.kernel}:save={int(self.save_rows)}:bucket={self.bucket}:waste={self.max_block_waste!r}"

    def describe(self) -> str:
        """In words, for logs and benchmark output."""
        bucketed = f", rows bucketed to {self.bucket}" if self.bucket > 1 else ""
        text = {FEW_SLOTS: "a weight per slot, one bmm", LOOP: "loop over experts, small buffers",
                GROUPED_MM: "grouped_mm", MM: f"loop of mm{bucketed}",
                BLOCKS: f"one bmm over blocks of a multiple of {self.bucket} rows (else loop of mm{bucketed})",
                TRITON: "triton kernels"}[self.kernel]
        return text + (", gathered rows kept for backward" if self.save_rows else "")


@lru_cache(maxsize=64)
def decode(text: str) -> Strategy:
    """The :class:`Strategy` that :meth:`Strategy.encode` wrote as ``text``."""
    kernel, *fields = text.split(":")
    values = dict(f.split("=", 1) for f in fields)
    if kernel not in KERNELS or set(values) != {"save", "bucket", "waste"}:
        raise ValueError(f"not an expert-matmul strategy: {text!r} (want e.g. 'mm:save=1:bucket=0:waste=0.0')")
    return Strategy(kernel, values["save"] == "1", int(values["bucket"]), float(values["waste"]))
