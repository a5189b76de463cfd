"""Learning-rate schedule of the paper: linear warmup, then cosine decay to a fraction of the peak."""

from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, total_steps: int, warmup: int, final_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warmup: ``peak · (step + 1) / warmup`` for the first ``warmup`` steps. Then cosine from ``peak`` at
    the end of warmup to ``final_ratio · peak`` at ``total_steps``.
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
