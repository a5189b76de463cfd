"""The ``FEW_SLOTS`` strategy: a weight matrix gathered per slot and one ``bmm`` (e.g. decoding one token).

Gathering a weight matrix per slot is ruinous for a training batch (it copies ``d_in·d_out`` numbers per slot
to do ``d_in·d_out`` multiply-adds with them), but with a handful of slots it replaces the sort, the
per-expert GEMM dispatch and the unsort by one gather and one ``bmm``. Plain torch ops: autograd
differentiates them, no custom op is involved.
"""

from __future__ import annotations

import torch


def expert_matmul_few_slots(x: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor,
                            gates: torch.Tensor | None, out_groups: int) -> torch.Tensor:
    """The contract of :func:`moeut.ops.expert_matmul` for validated inputs (``x [N, G_in, d_in]``)."""
    n, g_in, d_in = x.shape
    s, d_out = expert_ids.shape[1], weight.shape[2]
    xs = x.repeat_interleave(s // g_in, dim=1) if g_in != s else x  # slot s reads x[:, s // (S/G_in)]
    w = weight[expert_ids.reshape(-1)]  # [N·S, d_in, d_out]
    y = torch.bmm(xs.reshape(n * s, 1, d_in), w).view(n, s, d_out)
    if gates is not None:
        y = y * gates.unsqueeze(-1)
    if out_groups != s:
        y = y.view(n, out_groups, s // out_groups, d_out).sum(2)
    return y
