"""Rotary position embedding (Su et al., 2021) on the first ``n_rotate`` channels of each head.

GPT-NeoX "rotate-half" convention, as in the MoEUT reference: the rotated channels are split in two
halves ``(x1, x2)`` and ``x · cos + (-x2, x1) · sin``; the remaining channels are left untouched.
"""

from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, n_rotate: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` for integer ``positions`` (``[T]`` or ``[B, T]``), shaped ``[..., T, n_rotate]``.

    Computed in fp32; positions are absolute (with a KV cache, the cached length is already added).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, n_rotate, 2, device=positions.device).float() / n_rotate))
    angles = positions.float().unsqueeze(-1) * inv_freq  # [..., T, n_rotate/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` ``[B, H, T, d_h]``.

    ``cos``/``sin`` are ``[T, n]`` (same positions for every row) or ``[B, T, n]`` (per-row positions).
    """
    n = cos.shape[-1]
    if n == 0:
        return x
    if cos.dim() == 3:  # per-row positions: broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if n == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :n], x[..., n:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)
