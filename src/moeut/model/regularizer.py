"""The load-balancing regulariser of MoEUT (Sec. 2.3): entropy of the mean router softmax.

For every *unique* expert module, the router logits of all its applications (every repeat of a shared
layer) are pooled into ``p = mean softmax(logits)`` and the loss is the negative entropy ``-H(p)`` (averaged
over heads for SwitchHead). Minimising it spreads the selection over the experts. Where the mean is taken is
``ModelConfig.entropy_reg_mode``:

* ``"sequence"`` (the paper's): per sequence, over time × repeats; ``-H`` averaged over the batch.
* ``"batch"``: over the whole micro-batch (batch × time × repeats) at once: one marginal per micro-batch.
* ``"global"``: over the micro-batches of every data-parallel rank together. The summed softmax and the token
  count are all-reduced, the sum with the differentiable ``torch.distributed.nn.functional.all_reduce``, so
  every rank gets the same loss and its tokens' share of the gradient, scaled by the world size; the
  data-parallel gradient average (DDP, FSDP) then gives exactly the gradient of one process holding the global
  batch. Without an initialised process group (or with one rank) it equals ``"batch"``. With gradient
  accumulation each micro-step is pooled on its own.

The authors' training code calls these ``moe.perplexity_reg_mode`` ``"layers_time"`` (sequence) and
``"global"`` (batch; across ranks only with its ``sync_distributed`` option: our ``"global"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn import functional as dist_functional

ENTROPY_REG_MODES = ("sequence", "batch", "global")


def entropy_of_mean_softmax(logits: Sequence[torch.Tensor], mode: str = "sequence",
                            masks: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """``-H(mean softmax(logits))`` for logits ``[B, T, *heads, E]`` from R repeats, pooled as ``mode`` says
    (see the module docstring); averaged over the batch (``"sequence"``) and the heads. fp32.

    ``masks``: per entry of ``logits`` None (every token) or ``[B, T]`` bool, the tokens it covers (adaptive
    depth: a halted token is not routed); the mean is over the covered tokens only."""
    x = torch.cat([t.float() for t in logits], dim=1)  # [B, R*T, *heads, E]
    log_sm = F.log_softmax(x, dim=-1)
    valid = None
    if masks is not None and any(m is not None for m in masks):
        valid = torch.cat([torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m
                           for t, m in zip(logits, masks)], dim=1)  # [B, R*T]
    if mode == "sequence":
        if valid is None:
            log_p = log_sm.logsumexp(dim=1) - math.log(x.shape[1])  # [B, *heads, E]
        else:
            per_token = valid.view(*valid.shape, *[1] * (x.dim() - 2))
            count = valid.sum(1).float().view(-1, *[1] * (x.dim() - 2))
            log_p = log_sm.masked_fill(~per_token, -math.inf).logsumexp(dim=1) - count.log()
    elif mode in ("batch", "global"):
        log_sm = log_sm.flatten(0, 1)  # [N, *heads, E]
        if valid is not None:
            log_sm = log_sm[valid.flatten()]
        if mode == "global" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            log_p = _global_log_mean(log_sm)
        else:
            log_p = log_sm.logsumexp(dim=0) - math.log(log_sm.shape[0])  # [*heads, E]
    else:
        raise ValueError(f"entropy_reg_mode={mode!r}: must be one of {', '.join(ENTROPY_REG_MODES)}")
    entropy = -(log_p * log_p.exp()).sum(-1)
    return -entropy.mean()


def _global_log_mean(log_sm: torch.Tensor) -> torch.Tensor:
    """``log mean_{rows of every rank} exp(log_sm)`` ``[*heads, E]``, differentiable through the all-reduce."""
    # every rank takes the same reference point (the global max, a constant for the gradient) for stability
    ref = log_sm.detach().amax(dim=0)
    dist.all_reduce(ref, op=dist.ReduceOp.MAX)
    local = (log_sm - ref).exp().sum(dim=0)
    total = dist_functional.all_reduce(local, op=dist.ReduceOp.SUM)  # its backward all-reduces the gradient
    n = torch.tensor(float(log_sm.shape[0]), device=log_sm.device)
    dist.all_reduce(n)
    return total.log() + ref - n.log()

