"""The load-balancing regulariser of MoEUT (Sec. 2.3): entropy of the mean router softmax.

For every *unique* expert module, the router logits of all its applications (every repeat of a shared
layer) are pooled; per sequence, ``p = mean_{time × repeats} softmax(logits)``; the loss is the negative
entropy ``-H(p)``, averaged over the batch (and over heads for SwitchHead). Minimising it spreads the
selection over the experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def entropy_of_mean_softmax(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``-mean_batch H(mean_{t, r} softmax(logits))`` for logits ``[B, T, *heads, E]`` from R repeats.

    Computed in fp32 and in log space: ``log p = logsumexp_{t,r}(log_softmax) - log(T·R)``.
    """
    x = torch.cat([t.float() for t in logits], dim=1)  # [B, R*T, *heads, E]
    log_p = F.log_softmax(x, dim=-1).logsumexp(dim=1) - math.log(x.shape[1])  # [B, *heads, E]
    entropy = -(log_p * log_p.exp()).sum(-1)  # [B, *heads]
    return -entropy.mean()
