"""The active tokens of one group application under adaptive depth (``act_halting="skip"``), as rows.

A halted token does no more work: the layers run on the rows ``[N, d]`` of the tokens that have not halted,
gathered from the whole batch (``B·T`` rows). Attention needs one more layout: the queries of the active tokens,
sequence by sequence, padded to the largest count of a sequence (``[B, H, T_q, d_h]``), against the keys and
values of *every* position of the sequence (halted tokens included). :class:`ActiveRows` holds the indices and the
attention mask that map between the three, built once per group application and shared by its layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeut.model.attention import attend


@dataclass(frozen=True)
class ActiveRows:
    """Where the active tokens of a ``[B, T]`` batch are, and how their queries attend."""

    batch: int
    time: int
    idx: torch.Tensor  # [N] flat indices (b·T + t) of the active tokens, ascending
    new_idx: torch.Tensor  # [N_new] flat indices of the tokens that halted just before this group application
    slots: torch.Tensor  # [N] each active token's row in the padded query layout [B·T_q]
    n_slots: int  # T_q: the most active tokens of any sequence
    mask: torch.Tensor  # [B, 1, T_q, T_past + T] True = may attend (causal, padding; pad slots see key 0)
    cos: torch.Tensor  # [N, n_rotate] RoPE tables at the active tokens' positions
    sin: torch.Tensor
    cos_new: torch.Tensor  # [N_new, n_rotate] at the newly halted tokens' positions
    sin_new: torch.Tensor

    @classmethod
    def build(cls, active: torch.Tensor, new: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
              mask: torch.Tensor | None) -> "ActiveRows":
        """``active``/``new`` ``[B, T]`` bool; ``rope`` the pass's tables (``[T, n]`` or ``[B, T, n]``);
        ``mask`` the pass's attention mask (None = causal, ``[T, S]`` or ``[B, 1, T, S]``)."""
        B, T = active.shape
        idx = active.reshape(-1).nonzero().squeeze(1)
        new_idx = new.reshape(-1).nonzero().squeeze(1)
        rank = active.long().cumsum(1) - 1  # each active token's place among its sequence's active tokens
        n_slots = int(active.sum(1).max().item()) if idx.numel() else 0
        slots = (idx // T) * n_slots + rank.reshape(-1)[idx]
        t_of_slot = torch.zeros(B * n_slots, dtype=torch.long, device=active.device)  # pad slots: position 0
        t_of_slot = t_of_slot.index_copy(0, slots, idx % T).view(B, n_slots)
        cos, sin = rope
        return cls(batch=B, time=T, idx=idx, new_idx=new_idx, slots=slots, n_slots=n_slots,
                   mask=_rows_of_mask(mask, t_of_slot, T).unsqueeze(1),
                   cos=_at(cos, idx, B, T), sin=_at(sin, idx, B, T),
                   cos_new=_at(cos, new_idx, B, T), sin_new=_at(sin, new_idx, B, T))

    def whole_sequence(self, halted: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Keys or values of every position, ``[B, H, T, d_h]``: the active rows ``[N, H, d_h]`` over the halted
        tokens' ``[B·T, H, d_h]``."""
        full = halted.index_copy(0, self.idx, active)
        return full.view(self.batch, self.time, *full.shape[1:]).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the active rows' queries ``q`` ``[N, H, d_h]`` over ``k``, ``v`` ``[B, H, S, d_h]``:
        ``[N, H, d_h]``."""
        N, H, dh = q.shape
        padded = q.new_zeros(self.batch * self.n_slots, H, dh).index_copy(0, self.slots, q)
        padded = padded.view(self.batch, self.n_slots, H, dh).transpose(1, 2)
        a = attend(padded, k, v, self.mask).transpose(1, 2).reshape(self.batch * self.n_slots, H, dh)
        return a.index_select(0, self.slots)


def _at(table: torch.Tensor, idx: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Rows of a RoPE table (``[T, n]``, shared by the sequences, or ``[B, T, n]``) at flat indices."""
    if table.dim() == 2:
        return table.index_select(0, idx % T)
    return table.reshape(B * T, -1).index_select(0, idx)


def _rows_of_mask(mask: torch.Tensor | None, t: torch.Tensor, T: int) -> torch.Tensor:
    """The pass's attention-mask rows of the query positions ``t`` ``[B, T_q]``: ``[B, T_q, S]``."""
    if mask is None:  # causal without a cache: S = T
        return torch.arange(T, device=t.device) <= t.unsqueeze(-1)
    if mask.dim() == 2:  # [T, S]: the same for every sequence
        return mask[t]
    S = mask.shape[-1]
    return mask[:, 0].gather(1, t.unsqueeze(-1).expand(-1, -1, S))
