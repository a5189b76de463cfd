"""What one expert matmul's forward keeps for its backward: :class:`MatmulContext`, derived from the op's
arguments alone by :meth:`MatmulContext.of`.

The custom op's forward decides what to keep from it, its backward reads the kept tensors through it, and
its fake kernel gives their shapes from it: three readers of one derivation, so they stay in step without
being kept in step by hand.

What is kept (with the ``save_rows`` strategies, :class:`~moeut.ops.strategy.Strategy`), and why: the gate
``c_m`` scales whichever of the input row and the output row is narrower.

* Gate on the input side (``d_in <= d_out``): the gated input rows ``c_m a_m`` (``side``, read by ∂W) and,
  when the gates' gradient ``∂c_m = a_m · (g_m W_eᵀ)`` is wanted, the ungated rows ``a_m`` (``rows``).
* Gate on the output side: the ungated input rows ``a_m`` (``rows``, read by ∂W) and, when ∂c is wanted,
  the ungated output rows ``a_m W_e`` (``side``), so that ``∂c_m = (a_m W_e)·g_m`` is a row dot product at
  the narrow width ``d_out`` (at SwitchHead's V projection, ``d_in`` 256 against ``d_out`` 64, the wide
  product was a large part of the layer's time, benchmarks/README.md).
* No gate: the input rows ``a_m`` (``rows``).

A tensor not kept is an empty ``[0, d_in]`` one in the op's outputs. Kept rows number ``M = N·S`` in the
sorted layout, or, in the block layout, ``E·block`` (routing-dependent: a dynamic size to the fake kernel).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moeut.ops.strategy import Strategy

NO_GATE, INPUT_GATE, OUTPUT_GATE = "", "input", "output"
GATED_INPUT, RAW_OUTPUT = "gated_input", "raw_output"  # what ``side`` holds


class Needs(NamedTuple):
    """Which gradients backward computes: of ``x``, of the weight, of the gates."""

    x: bool
    w: bool
    c: bool


class MatmulContext(NamedTuple):
    """The facts about one expert matmul that its forward, backward and fake kernel share.

    ``n, g_in, d_in`` from ``x [N, G_in, d_in]``; ``s`` slots per row; ``g_out``; ``d_out``; ``empty``: no
    rows or no slots (forward returns zeros and keeps nothing). ``gate``: :data:`NO_GATE`, :data:`INPUT_GATE`
    or :data:`OUTPUT_GATE` (the narrower side). ``keep_rows``: forward keeps the ungated gathered input rows;
    ``keep_side``: ``""``, :data:`GATED_INPUT` or :data:`RAW_OUTPUT` (see the module doc).
    """

    strategy: Strategy
    n: int
    g_in: int
    s: int
    g_out: int
    d_in: int
    d_out: int
    empty: bool
    gate: str
    keep_rows: bool
    keep_side: str

    @classmethod
    def of(cls, x: torch.Tensor, weight: torch.Tensor, gates: torch.Tensor | None, n_slots: int, g_out: int,
           strategy: Strategy, need_gate_grad: bool) -> MatmulContext:
        """From the op's arguments (``n_slots = N·S``, the plan's length); works on fake tensors too."""
        n, g_in, d_in = x.shape
        d_out = weight.shape[2]
        s = n_slots // n if n else 0
        empty = n == 0 or n_slots == 0
        gate = NO_GATE if gates is None else INPUT_GATE if d_in <= d_out else OUTPUT_GATE
        keep = strategy.save_rows and not empty
        keep_rows = keep and (gate != INPUT_GATE or need_gate_grad)
        if not keep or gate == NO_GATE or (gate == OUTPUT_GATE and not need_gate_grad):
            keep_side = ""
        else:
            keep_side = GATED_INPUT if gate == INPUT_GATE else RAW_OUTPUT
        return cls(strategy, n, g_in, s, g_out, d_in, d_out, empty, gate, keep_rows, keep_side)

    def saved_shapes(self, m: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of the op's ``(rows, side_rows)`` outputs when the kept tensors have ``m`` rows."""
        rows = (m if self.keep_rows else 0, self.d_in)
        side = {GATED_INPUT: (m, self.d_in), RAW_OUTPUT: (m, self.d_out)}.get(self.keep_side, (0, self.d_in))
        return rows, side
