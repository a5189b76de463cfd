"""Adaptive computation time by stick-breaking halting, as in the SUT authors' code (Tan et al., 2023).

After layer application 0, before every further application t = 1 … n−1 a gate reads the token's previous
layer output ``h_{t−1}``:

    log g_t          = log_softmax(W₂ · GELU(W₁ · h_{t−1} + b₁))     (continue, halt); W₂ = 0 at init
    log q_t          = log q_{t−1} + log g_t[continue]               q = probability of never having halted, q₀ = 1
    p_t              = q_{t−1} · g_t[halt]                           probability of halting before application t
    acc_t            = acc_{t−1} + p_t · h_{t−1}
    state_t          = acc_t + q_t · h_t                              what attention reads and the model outputs
    E[depth]_t       = Σ_{s ≤ t} (s − 1) · p_s + q_t · t              ACT loss: Σ_{t ≥ 1} mean_tokens E[depth]_t

Once ``q_t < 1 − threshold`` a token is frozen: q is set to 0, its state no longer changes (attention reads
its final state) and its routers give it zero gates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class HaltingGate(nn.Module):
    """``Linear(d, d) → GELU → Linear(d, 2, bias=False)`` with the last layer zero-initialised; log-softmax."""

    def __init__(self, d_model: int):
        super().__init__()
        self.hidden = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, 2, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.hidden.reset_parameters()
        nn.init.zeros_(self.out.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``log (g[continue], g[halt])`` ``[..., 2]`` in fp32."""
        return F.log_softmax(self.out(F.gelu(self.hidden(h))).float(), dim=-1)


@dataclass
class ACTState:
    """Per-token halting bookkeeping after ``step`` further applications (all fp32 except ``acc``)."""

    log_never: torch.Tensor  # [B, T] log q
    acc: torch.Tensor  # [B, T, d] Σ p_s · h_{s−1}
    expected_depth: torch.Tensor  # [B, T] Σ (s − 1) · p_s
    step: int = 0

    @classmethod
    def start(cls, h0: torch.Tensor) -> "ACTState":
        zeros = torch.zeros(h0.shape[:-1], device=h0.device, dtype=torch.float32)
        return cls(log_never=zeros, acc=torch.zeros_like(h0), expected_depth=zeros.clone())


def halt_step(state: ACTState, log_g: torch.Tensor, h_prev: torch.Tensor, threshold: float
              ) -> tuple[ACTState, torch.Tensor]:
    """Advance the halting state by one application given the gate ``log_g`` ``[B, T, 2]`` read from
    ``h_prev``. Returns the new state and ``q`` ``[B, T]`` (0 for frozen tokens)."""
    log_halt = state.log_never.unsqueeze(-1) + log_g
    p = log_halt[..., 1].exp()
    acc = state.acc + p.unsqueeze(-1).to(h_prev.dtype) * h_prev
    depth = state.expected_depth + state.step * p
    log_never = log_halt[..., 0]
    q = log_never.exp()
    q = q.masked_fill(q < 1 - threshold, 0.0)
    return ACTState(log_never, acc, depth, state.step + 1), q


def mix_state(state: ACTState, q: torch.Tensor, h: torch.Tensor, previous: torch.Tensor,
              threshold: float) -> torch.Tensor:
    """The new state ``acc + q · h``; frozen tokens keep ``previous``."""
    frozen = (q < 1 - threshold).unsqueeze(-1)
    return torch.where(frozen, previous, state.acc + q.unsqueeze(-1).to(h.dtype) * h)


def expected_depth(state: ACTState, q: torch.Tensor) -> torch.Tensor:
    """``E[depth]`` per token ``[B, T]`` after the latest step (the ACT loss, averaged over tokens)."""
    return state.expected_depth + q * state.step
