"""The sort of (row, slot) pairs by expert that every fast backend starts from.

A σ-MoE layer calls the expert matmul twice with the same ``expert_ids`` (up- and down-projection), and
SwitchHead twice too (values, output). :func:`make_plan` sorts once; pass the result as ``plan=`` to
both calls.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertPlan(NamedTuple):
    """``expert_ids [N, S]`` flattened to ``M = N·S`` *slots* and sorted (stably) by expert.

    Flat slot ``f = n·S + s``. Sorted position ``m`` holds flat slot ``perm[m]``; flat slot ``f`` sits at
    sorted position ``inv_perm[f]``. Expert ``e`` owns sorted positions ``[offsets[e-1], offsets[e])``.
    A plain tuple of tensors, so ``torch.compile`` traces it without graph breaks.

    * ``shape``: ``(N, S)`` of the ids it was made from; ``n_experts``: E.
    * ``perm``: ``[M]`` int64; ``inv_perm``: ``[M]`` int64, the inverse permutation.
    * ``offsets``: ``[E]`` int32 cumulative *end* offsets (the ``offs`` of ``F.grouped_mm``).
    * ``sorted_ids``: ``[M]`` int64 expert id of each sorted position.

    None of the tensors requires grad; all live on the device of ``expert_ids``.
    """

    shape: tuple[int, int]
    n_experts: int
    perm: torch.Tensor
    inv_perm: torch.Tensor
    offsets: torch.Tensor
    sorted_ids: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.perm.device

    def rows(self, ratio: int) -> torch.Tensor:
        """``perm // ratio``: for each sorted position, the row of a ``[N·G, …]`` tensor with
        ``G = S // ratio`` groups that the slot reads from (or is summed into)."""
        return self.perm if ratio == 1 else torch.div(self.perm, ratio, rounding_mode="floor")

    def counts_list(self) -> list[int]:
        """Slots per expert as Python ints (a host sync on GPU; only the loop fallback needs it)."""
        ends = self.offsets.tolist()
        return [b - a for a, b in zip([0] + ends[:-1], ends)]

    def __repr__(self) -> str:
        return f"ExpertPlan(shape={self.shape}, n_experts={self.n_experts}, device={self.device})"


def make_plan(expert_ids: torch.Tensor, n_experts: int) -> ExpertPlan:
    """Sort ``expert_ids [N, S]`` by expert once, for reuse by several :func:`expert_matmul` calls.

    On CPU the ids are checked to lie in ``[0, n_experts)`` (free: they are sorted); on GPU that check
    would cost a host sync and is skipped — out-of-range ids there give wrong results or a device assert.
    """
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dim() != 2:
        raise ValueError(
            f"expert_ids must be a [N, S] tensor, got "
            f"{tuple(expert_ids.shape) if isinstance(expert_ids, torch.Tensor) else type(expert_ids)}")
    if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
        raise TypeError(f"expert_ids must be an integer tensor, got dtype {expert_ids.dtype}")
    n_experts = int(n_experts)
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    with torch.no_grad():
        flat = expert_ids.reshape(-1)
        m = flat.numel()
        if m and flat.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = (int(v) for v in torch.aminmax(flat))
            if lo < 0 or hi >= n_experts:
                raise ValueError(f"expert_ids must lie in [0, {n_experts}), found values in [{lo}, {hi}]")
        # the narrowest key dtype that holds every id: narrow keys sort several times faster on a CPU
        # (benchmarks/README.md), and the order, and so the plan, is the same
        key = torch.uint8 if n_experts <= 256 else torch.int16 if n_experts <= 32767 else torch.int64
        sorted_keys, perm = torch.sort(flat.to(key), stable=True)
        sorted_ids = sorted_keys.long()
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(m, device=perm.device)
        # offsets[e] = number of slots whose expert id <= e (no host sync, unlike bincount on CUDA)
        offsets = torch.searchsorted(
            sorted_ids, torch.arange(n_experts, device=perm.device, dtype=sorted_ids.dtype), right=True
        ).to(torch.int32)
    return ExpertPlan(tuple(expert_ids.shape), n_experts, perm, inv_perm, offsets, sorted_ids)
