"""Expert GEMMs over sorted rows as a Python loop of ``mm``, one per expert (the ``MM`` strategy).

The fallback where grouped_mm is missing, and on a CPU in bf16/fp16 the path for routings too unbalanced for
the block layout. There, every GEMM's row count can be rounded up to a multiple of ``bucket``: oneDNN
builds a kernel per GEMM shape, and bucketed counts come from a small set of shapes that stays cached
(:mod:`moeut.ops.policy`). The counts come to the host first (a sync on a GPU).
"""

from __future__ import annotations

import torch

from moeut.ops.plan import ExpertPlan


def loop_mm(a: torch.Tensor, b: torch.Tensor, plan: ExpertPlan, bucket: int = 0) -> torch.Tensor:
    """``out[m] = a[m] @ b[e_m]``; ``a [M, K]`` sorted by expert, ``b [E, K, N]`` (may be a view).

    ``bucket > 0``: every GEMM gets a row count rounded up to a multiple of ``bucket``. An expert's extra
    rows are the next expert's first rows, read from ``a`` and written to ``out``; going in expert order,
    the next expert then overwrites them with its own result (each output row depends on its input row
    only). Experts too close to the end for that go through a zero-padded scratch buffer.
    """
    counts = plan.counts_list()
    m = a.shape[0]
    out = a.new_empty(m, b.shape[2])
    start = 0
    for b_e, n in zip(b.unbind(0), counts):
        if n:
            rows = -(-n // bucket) * bucket if bucket else n
            if start + rows <= m:
                torch.mm(a[start:start + rows], b_e, out=out[start:start + rows])
            else:  # the tail: pad a copy
                pad = a.new_zeros(rows, a.shape[1])
                pad[:n] = a[start:start + n]
                out[start:start + n] = torch.mm(pad, b_e)[:n]
        start += n
    return out


def loop_mm_wgrad(a: torch.Tensor, g: torch.Tensor, plan: ExpertPlan, bucket: int = 0) -> torch.Tensor:
    """``out[e] = Σ_{m in e} a[m]ᵀ g[m]``; ``a [M, K]``, ``g [M, N]`` sorted by expert → ``[E, K, N]``.

    ``bucket > 0``: the rows are the GEMM's reduction dimension, so no other expert's rows may join in.
    Each expert's largest multiple of ``bucket`` rows is one GEMM; the remaining ``< bucket`` rows of all
    experts are gathered into ``[E, bucket, ·]`` blocks (rows past an expert's end zeroed on the narrower
    side) and added by one batched GEMM of fixed shape (cheaper than a copy, fill and ``addmm_`` per
    expert, benchmarks/README.md).
    """
    counts = plan.counts_list()
    e, k, n_out = plan.n_experts, a.shape[1], g.shape[1]
    out = a.new_empty(e, k, n_out)
    start = 0
    for out_e, n in zip(out.unbind(0), counts):
        whole = n - n % bucket if bucket else n
        if whole:
            torch.mm(a[start:start + whole].t(), g[start:start + whole], out=out_e)
        else:
            out_e.zero_()
        start += n
    if bucket and any(n % bucket for n in counts):
        _add_remainder_rows(out, a, g, plan, bucket)
    return out


def _add_remainder_rows(out: torch.Tensor, a: torch.Tensor, g: torch.Tensor, plan: ExpertPlan,
                        bucket: int) -> None:
    """``out[e] += Σ aᵀ g`` over the ``< bucket`` rows past each expert's largest multiple of ``bucket``."""
    e, k, n_out = out.shape
    ends = plan.offsets.long()
    tails = ends - (ends - torch.cat([ends.new_zeros(1), ends[:-1]])) % bucket  # first row past the whole part
    j = torch.arange(bucket, device=a.device)
    valid = (tails.unsqueeze(1) + j) < ends.unsqueeze(1)  # [E, bucket]
    rows = torch.where(valid, tails.unsqueeze(1) + j, 0).view(-1)
    a_r, g_r = a.index_select(0, rows), g.index_select(0, rows)
    mask = valid.view(-1, 1).to(a.dtype)
    if k <= n_out:
        a_r.mul_(mask)
    else:
        g_r.mul_(mask)
    out.baddbmm_(a_r.view(e, bucket, k).transpose(1, 2), g_r.view(e, bucket, n_out))
