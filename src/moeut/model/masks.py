"""Positions and attention masks for a forward pass with an optional KV cache and left padding (shared by
every model class)."""

from __future__ import annotations

import torch


def positions_for(B: int, T: int, past: int, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if position_ids is not None:
        if position_ids.shape[-1] != T or position_ids.dim() not in (1, 2):
            raise ValueError(f"position_ids must be [T] or [B, T] with T={T}, got {tuple(position_ids.shape)}")
        return position_ids.to(device)
    if attention_mask is not None:
        # number of real tokens before each position: correct RoPE positions under left padding
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp_min(0)[:, -T:]
    return torch.arange(past, past + T, device=device)


def attention_mask_for(B: int, T: int, past: int, attention_mask: torch.Tensor | None,
                    device: torch.device) -> torch.Tensor | None:
    """Boolean ``[T, S]`` or ``[B, 1, T, S]`` mask (True = may attend), or None for plain causal."""
    if attention_mask is None and past == 0:
        return None
    S = past + T
    q_pos = torch.arange(past, S, device=device).unsqueeze(-1)
    k_pos = torch.arange(S, device=device)
    allowed = k_pos <= q_pos  # causal over absolute positions, [T, S]
    if attention_mask is None:
        return allowed
    if tuple(attention_mask.shape) != (B, S):
        raise ValueError(f"attention_mask must be [batch, cached + new tokens] = {(B, S)}, "
                         f"got {tuple(attention_mask.shape)}")
    allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
    # a padding query would attend to nothing (NaN); let every query see itself
    allowed = allowed | (k_pos == q_pos)
    return allowed.unsqueeze(1)
