"""The one place that decides how the torch backend runs an expert matmul: :meth:`GemmPolicy.choose`.

The choice follows from the device, the dtype and the number of slots, under a few settings that have
defaults, can be overridden from the environment (read once, :mod:`moeut.ops.overrides`) and, for tests and
benchmarks, through :func:`use_policy`. Why each rule:

* **few slots** (``few_slots``, default 64 ``(row, slot)`` pairs, e.g. one token per step while decoding):
  gathering a weight matrix per slot is ruinous for a training batch, but for a handful of slots one gather
  and one ``bmm`` replace the sort, the per-expert GEMMs and the unsort.
* **grouped_mm** where it exists and agrees with a loop for the device and dtype
  (:func:`~moeut.ops.grouped_mm_layout.grouped_mm_works`): whole-tensor steps, no Python loop and no host
  sync. It is the default even where a loop's steps are faster in isolation, because the loop's many small
  parallel regions lose on a busy machine (benchmarks/README.md, "design measurements").
* **loop**: where grouped_mm is missing (float64, older torch) or forced (``gemm="loop"``), the experts one
  by one in small reused buffers; nothing the size of the gathered rows is made or kept.
* **block layout**, on a CPU in bf16/fp16: oneDNN, which runs those matmuls, builds a kernel for every new
  GEMM shape, and expert row counts change with every batch; padding every expert's rows to one block (a
  multiple of ``row_bucket``) makes each GEMM one ``bmm`` of a shape that recurs. Past ``max_block_waste``
  extra rows (a very unbalanced routing) a loop of ``mm`` over row counts rounded up to ``row_bucket`` runs
  instead. Never grouped_mm there: its CPU kernel is itself a loop of ``mm``, and oneDNN's bf16 ``mm`` turns
  NaN in the padding of a row-padded operand (grouped_mm's layout at widths like 82) into NaN results.
* **keep the gathered rows for backward** (``save_gathered``) on a CPU, where gathering again costs more
  than the memory; not on a GPU, where gathers are cheap and memory is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch

from moeut.ops import strategy as st
from moeut.ops.grouped_mm_layout import grouped_mm_works
from moeut.ops.overrides import OVERRIDES, Overrides
from moeut.ops.strategy import Strategy

_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class GemmPolicy:
    """The settings behind the torch backend's choice, and :meth:`choose`, which applies them.

    * ``gemm``: ``"auto"`` (grouped_mm where it works, else the loop), ``"grouped_mm"`` or ``"loop"``
      (force one; env ``MOEUT_GEMM_IMPL``).
    * ``save_gathered``: keep the gathered rows for backward on ``"cpu"``, ``"always"`` or ``"never"``
      (env ``MOEUT_SAVE_GATHERED``).
    * ``row_bucket``: CPU bf16/fp16 row multiple, 0 = exact counts and no blocks (env ``MOEUT_CPU_ROW_BUCKET``).
    * ``max_block_waste``: CPU bf16/fp16 block layout while pad rows ≤ this fraction, negative = never (env
      ``MOEUT_CPU_MAX_BLOCK_WASTE``).
    * ``few_slots``: at or below this many ``(row, slot)`` pairs, the few-slot ``bmm``.
    """

    gemm: str = "auto"
    save_gathered: str = "cpu"
    row_bucket: int = 64
    max_block_waste: float = 0.5
    few_slots: int = 64

    def __post_init__(self) -> None:
        if self.gemm not in ("auto", "grouped_mm", "loop"):
            raise ValueError(f"gemm must be auto, grouped_mm or loop, got {self.gemm!r}")
        if self.save_gathered not in ("cpu", "always", "never"):
            raise ValueError(f"save_gathered must be cpu, always or never, got {self.save_gathered!r}")
        object.__setattr__(self, "row_bucket", max(int(self.row_bucket), 0))
        object.__setattr__(self, "max_block_waste", float(self.max_block_waste))

    @classmethod
    def from_overrides(cls, overrides: Overrides) -> GemmPolicy:
        return cls(gemm=overrides.gemm, save_gathered=overrides.save_gathered, row_bucket=overrides.cpu_row_bucket,
                   max_block_waste=overrides.cpu_max_block_waste)

    def choose(self, device: torch.device, dtype: torch.dtype, n_slots: int, *, fused: bool = False) -> Strategy:
        """The strategy for ``n_slots`` ``(row, slot)`` pairs of ``dtype`` on ``device`` (see the module doc).

        ``fused``: for the fused σ-MoE op, which always gathers the sorted rows (it has no ``LOOP``).
        """
        if n_slots <= self.few_slots:
            return Strategy(st.FEW_SLOTS)
        save = self.gemm != "loop" and (self.save_gathered == "always"
                                        or (self.save_gathered == "cpu" and device.type == "cpu"))
        grouped = self.gemm == "grouped_mm" or (self.gemm == "auto" and grouped_mm_works(device.type, dtype))
        if not (fused or grouped or save):
            return Strategy(st.LOOP)
        low_precision_cpu = device.type == "cpu" and dtype in _LOW_PRECISION
        bucket = self.row_bucket if low_precision_cpu else 0
        if bucket and self.max_block_waste >= 0:
            return Strategy(st.BLOCKS, save, bucket, self.max_block_waste)
        if grouped and not low_precision_cpu and grouped_mm_works(device.type, dtype):
            return Strategy(st.GROUPED_MM, save)
        return Strategy(st.MM, save, bucket)

    def describe(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """What a training batch's expert GEMMs run for ``device``/``dtype``, in words."""
        return self.choose(torch.device(device), dtype, self.few_slots + 1).describe()


_current = GemmPolicy.from_overrides(OVERRIDES)


def current_policy() -> GemmPolicy:
    """The policy every expert matmul of this process uses now (the environment's, unless
    :func:`use_policy` is active)."""
    return _current


@contextlib.contextmanager
def use_policy(policy: GemmPolicy | None = None, **changes) -> Iterator[GemmPolicy]:
    """Run the enclosed code under ``policy`` (default: the current one) with ``changes`` applied, e.g.
    ``with use_policy(gemm="loop"):``. Process-wide, not per thread; restored on exit. A compiled model
    re-checks the policy it was traced under and recompiles when it changed."""
    global _current
    before = _current
    _current = dataclasses.replace(policy or before, **changes)
    try:
        yield _current
    finally:
        _current = before
