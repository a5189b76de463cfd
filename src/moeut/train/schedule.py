"""Learning-rate schedule of the paper's runs: linear warmup, then the cosine of the authors' training code.

The training code (``framework/task/task.py`` of ``RobertCsordas/moeut_training_code``) builds
``CosineAnnealingLR(T_max=total_steps, eta_min=min_lr_multiplier · lr)`` and, before every step ``i``,
evaluates it at ``max(0, i − warmup)``; during warmup it overrides the result with ``lr · (i + 1) / warmup``.
The cosine therefore spans ``total_steps`` although only ``total_steps − warmup`` of it are used: with 4000
warmup steps out of 100k the last step runs at ≈ 0.1036 · lr rather than 0.1 · lr (without warmup the two
readings agree).
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, total_steps: int, warmup: int, final_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based), as the authors' training code sets it.

    Warmup: ``peak · (step + 1) / warmup`` for the first ``warmup`` steps. Then the closed form of
    ``CosineAnnealingLR(T_max=total_steps, eta_min=final_ratio · peak)`` at epoch ``step − warmup``:
    ``eta_min + (peak − eta_min) · (1 + cos(π · (step − warmup) / total_steps)) / 2``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps}: the cosine schedule needs a positive number of steps")
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    eta_min = final_ratio * peak
    epoch = max(0, step - warmup)
    return eta_min + (peak - eta_min) * 0.5 * (1 + math.cos(math.pi * epoch / total_steps))
