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

SUT halts over single layer applications; MoEUT (:mod:`moeut.model.lm`, ``act=True``) over applications of the
whole group of G shared layers, with a gate that reads ``LN(h)`` (its residual stream is not normalised) and
has a halt-logit bias (``act_halt_bias_init``; negative = "deep start").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import nn


class HaltingGate(nn.Module):
    """``Linear(d, d) → GELU → Linear(d, 2, bias=False)`` with the last layer zero-initialised; log-softmax.

    ``halt_bias`` (MoEUT): the last layer gets a bias, initialised to (0, halt_bias), so at init
    ``g[halt] = σ(halt_bias)``; ``normalize``: the gate reads ``LN(h)`` (a LayerNorm with parameters).
    ``budget`` (MoEUT, ``act_target_depth``): a buffer ``halt_shift`` added to the halt logit, moved by the
    trainer (not the optimizer) so that tokens run the target depth on average — see :meth:`shift_towards`."""

    def __init__(self, d_model: int, halt_bias: float | None = None, normalize: bool = False, budget: bool = False):
        super().__init__()
        self.halt_bias = halt_bias
        self.norm = nn.LayerNorm(d_model) if normalize else None
        self.hidden = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, 2, bias=halt_bias is not None)
        self.halt_shift = nn.Buffer(torch.zeros(())) if budget else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.norm is not None:
            self.norm.reset_parameters()
        self.hidden.reset_parameters()
        nn.init.zeros_(self.out.weight)
        if self.out.bias is not None:
            self.out.bias.copy_(torch.tensor([0.0, float(self.halt_bias)]))
        if self.halt_shift is not None:
            self.halt_shift.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``log (g[continue], g[halt])`` ``[..., 2]`` in fp32."""
        if self.norm is not None:
            h = self.norm(h)
        logits = self.out(F.gelu(self.hidden(h))).float()
        if self.halt_shift is not None:
            logits = logits + torch.stack((torch.zeros_like(self.halt_shift), self.halt_shift)).float()
        return F.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def shift_towards(self, executed_mean: float, target: float, rate: float) -> float:
        """The depth budget, after an optimizer step: ``halt_shift += rate · sign(executed mean depth − target)``
        (too deep: tokens halt more readily). Like loss-free balancing's bias, a fixed step on the sign of the
        error acts at once and stays bounded — a multiplier on a depth penalty, moved the same way, acts through
        the optimizer with a lag and swung the whole batch between depth 1 and the maximum. Returns the shift."""
        self.halt_shift.add_(rate * float((executed_mean > target) - (executed_mean < target)))
        return self.halt_shift.item()


@dataclass
class ACTState:
    """Per-token halting bookkeeping after ``step`` further applications (all fp32 except ``acc``)."""

    log_never: torch.Tensor  # [B, T] log q
    acc: torch.Tensor  # [B, T, d] Σ p_s · h_{s−1}
    expected_depth: torch.Tensor  # [B, T] Σ (s − 1) · p_s
    step: int = 0
    halt_probs: tuple[torch.Tensor, ...] = ()  # p_1 … p_step, each [B, T]: halting before application s

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
    return ACTState(log_never, acc, depth, state.step + 1, (*state.halt_probs, p)), q


def mix_state(state: ACTState, q: torch.Tensor, h: torch.Tensor, previous: torch.Tensor,
              threshold: float) -> torch.Tensor:
    """The new state ``acc + q · h``; frozen tokens keep ``previous``."""
    frozen = frozen_mask(q, threshold).unsqueeze(-1)
    return torch.where(frozen, previous, state.acc + q.unsqueeze(-1).to(h.dtype) * h)


def expected_depth(state: ACTState, q: torch.Tensor) -> torch.Tensor:
    """``E[depth]`` per token ``[B, T]`` after the latest step (the ACT loss, averaged over tokens)."""
    return state.expected_depth + q * state.step


def frozen_mask(q: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[B, T]`` True for the tokens :func:`halt_step` froze (their state no longer changes)."""
    return q < 1 - threshold


def depth_per_token(state: ACTState | None, q: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Expected number of applications per token ``[B, T]`` fp32, counting the first: ``1 + E[depth]``
    (1 everywhere when no halting step ran; ``like`` ``[B, T, d]`` gives shape and device)."""
    if state is None or q is None:
        return torch.ones(like.shape[:-1], device=like.device, dtype=torch.float32)
    return 1 + expected_depth(state, q)


def depth_distribution(state: ACTState, q: torch.Tensor) -> torch.Tensor:
    """Each token's distribution over the number of group applications it runs, ``[B, T, n]``: ``p_k`` for
    halting before application k (k = 1 … n − 1, i.e. k applications run) and ``q`` for running all n."""
    return torch.stack((*state.halt_probs, q), dim=-1)


def depth_entropy(dist: torch.Tensor) -> torch.Tensor:
    """``H(mean_tokens dist)`` (natural log) of per-token depth distributions ``[…, n]``: high when tokens spread
    over the depths (each token may still be sure of its own), 0 when every token runs the same depth."""
    mean = dist.reshape(-1, dist.shape[-1]).mean(0)
    mean = mean / mean.sum().clamp_min(1e-12)
    return -(mean * mean.clamp_min(1e-12).log()).sum()


def forced_log_gate(depth: torch.Tensor, r: int) -> torch.Tensor:
    """The gate output ``log (g[continue], g[halt])`` ``[B, T, 2]`` that halts each token for good before group
    application ``r`` iff its forced ``depth`` ``[B, T]`` (group applications, 1 … n) is at most ``r``: ``(−∞, 0)``
    for those, ``(0, −∞)`` — certain to continue, which leaves an already frozen token as it is — for the rest."""
    halt = (depth <= r).unsqueeze(-1)
    return torch.zeros(*depth.shape, 2, device=depth.device).masked_fill(torch.cat((halt, ~halt), -1), -math.inf)


@contextmanager
def forcing_depth(model: nn.Module, depth: torch.Tensor) -> Iterator[None]:
    """Within the block, the ACT model ``model`` ignores its halting gate: each token runs exactly ``depth``
    ``[B, T]`` group applications (of the batch shape the model is then called with). For measurements (the cost
    of a given depth, :mod:`benchmarks.adaptive_depth`) and tests; the gate gets no gradient meanwhile."""
    model.forced_depth = depth
    try:
        yield
    finally:
        model.forced_depth = None
