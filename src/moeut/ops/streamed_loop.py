"""The ``LOOP`` strategy: expert by expert in Python, with small reused buffers.

The rows of expert ``e`` are gathered (and gated) into an L2-sized buffer right before its GEMM, and in
backward its output-gradient rows likewise, shared by its weight- and input-gradient GEMMs; nothing ``S/G_in``
times the size of ``x`` is made or kept. Weights are split once with ``unbind``: indexing ``W[i]`` in the loop
costs an indexing op per expert (several times slower, benchmarks/README.md). The per-expert counts come to
the host (a sync on a GPU).
"""

from __future__ import annotations

import itertools

import torch

from moeut.ops.context import Needs
from moeut.ops.plan import ExpertPlan


def loop_forward(x2d: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, plan: ExpertPlan,
                 c: torch.Tensor | None, scale_input: bool) -> torch.Tensor:
    """Sorted ``y_m = (c_m·) a_m @ W_e`` ``[M, d_out]``, the gate applied on the input side when
    ``scale_input`` (else the caller's unsort applies it)."""
    counts = plan.counts_list()
    d_in, d_out = x2d.shape[1], weight.shape[2]
    y = x2d.new_empty(rows.shape[0], d_out)
    buf = x2d.new_empty(max(counts), d_in)
    c_split = c.split(counts) if c is not None else itertools.repeat(None)
    for r_e, c_e, w_e, y_e, n in zip(rows.split(counts), c_split, weight.unbind(0), y.split(counts), counts):
        if not n:
            continue
        a_e = buf[:n]
        torch.index_select(x2d, 0, r_e, out=a_e)
        if c_e is not None and scale_input:
            a_e.mul_(c_e)
        torch.mm(a_e, w_e, out=y_e)
        if c_e is not None and not scale_input:
            y_e.mul_(c_e)
    return y


def loop_backward(x2d: torch.Tensor, rows_in: torch.Tensor, g2d: torch.Tensor, rows_out: torch.Tensor,
                  weight: torch.Tensor, plan: ExpertPlan, c: torch.Tensor | None, scale_input: bool,
                  needs: Needs) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Sorted ``∂x`` rows ``c_m g_m W_eᵀ`` ``[M, d_in]``, ``∂W`` ``[E, d_in, d_out]`` and sorted ``∂c`` ``[M]``;
    None where ``needs`` does not ask for it.

    Per expert, its input rows and output-gradient rows are gathered into small reused buffers that both of
    its GEMMs (``aᵀg`` and ``g Wᵀ``) then read from cache.
    """
    counts = plan.counts_list()
    m, d_in, d_out, big = rows_in.shape[0], x2d.shape[1], weight.shape[2], max(counts)
    grad_w = weight.new_empty(weight.shape) if needs.w else None
    t = x2d.new_empty(m, d_in) if needs.x else None  # sorted ∂x rows
    grad_c = x2d.new_empty(m) if needs.c else None
    need_a = needs.w or needs.c
    a_buf = x2d.new_empty(big, d_in) if need_a else None
    g_buf = x2d.new_empty(big, d_out)
    gated_buf = None
    if needs.w and c is not None:  # the gated side of ∂W = Σ c aᵀ g
        gated_buf = x2d.new_empty(big, d_in if scale_input else d_out)
    t_buf = x2d.new_empty(big, d_in) if needs.c and not needs.x else None

    def split(t: torch.Tensor | None):
        return t.split(counts) if t is not None else itertools.repeat(None)

    for r_in, r_out, c_e, w_e, gw_e, t_e, gc_e, n in zip(
            rows_in.split(counts), rows_out.split(counts), split(c), weight.unbind(0),
            grad_w.unbind(0) if needs.w else itertools.repeat(None), split(t), split(grad_c), counts):
        if not n:
            if needs.w:
                gw_e.zero_()
            continue
        g_e = g_buf[:n]
        torch.index_select(g2d, 0, r_out, out=g_e)
        if need_a:
            a_e = a_buf[:n]
            torch.index_select(x2d, 0, r_in, out=a_e)
        if needs.w:
            if c_e is None:
                torch.mm(a_e.t(), g_e, out=gw_e)
            elif scale_input:
                torch.mm(torch.mul(a_e, c_e, out=gated_buf[:n]).t(), g_e, out=gw_e)
            else:
                torch.mm(a_e.t(), torch.mul(g_e, c_e, out=gated_buf[:n]), out=gw_e)
        if needs.x or needs.c:
            if t_e is None:
                t_e = t_buf[:n]
            torch.mm(g_e, w_e.t(), out=t_e)  # g W_eᵀ
            if needs.c:  # ∂c_m = a_m · (g_m W_eᵀ)
                torch.sum(a_e * t_e, 1, out=gc_e)
            if needs.x and c_e is not None:
                t_e.mul_(c_e)
    return t, grad_w, grad_c
