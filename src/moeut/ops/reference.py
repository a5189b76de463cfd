"""The slow, obvious expert matmul: the oracle every other backend is tested against.

A Python loop over slots and experts; each expert is applied to *all* rows and masked to the rows that
chose it. Autograd provides the gradients. Cost O(S·E·N·d_in·d_out): for tests on toy shapes only.
"""

from __future__ import annotations

import torch


def expert_matmul_reference(x, expert_ids, weight, gates=None, out_groups=None) -> torch.Tensor:
    """``out[n, s // (S/G_out)] += gates[n, s] · (x[n, s // (S/G_in)] @ weight[expert_ids[n, s]])``.

    ``x [N, G_in, d_in]``, ``expert_ids [N, S]``, ``weight [E, d_in, d_out]``, ``gates [N, S]`` or None;
    returns ``[N, G_out, d_out]``.
    """
    n, g_in, _ = x.shape
    s = expert_ids.shape[1]
    n_experts, _, d_out = weight.shape
    if out_groups is None:
        out_groups = s if gates is None else 1
    outs = [x.new_zeros(n, d_out) for _ in range(out_groups)]
    for slot in range(s):
        x_slot = x[:, slot // (s // g_in)]  # [N, d_in]
        for e in range(n_experts):
            chose_e = (expert_ids[:, slot] == e).unsqueeze(1)  # [N, 1]
            y = torch.where(chose_e, x_slot @ weight[e], torch.zeros((), dtype=x.dtype, device=x.device))
            if gates is not None:
                y = y * gates[:, slot].unsqueeze(1)
            group = slot // (s // out_groups)
            outs[group] = outs[group] + y
    return torch.stack(outs, dim=1)
