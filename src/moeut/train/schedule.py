"""Learning-rate schedules: the paper's (linear warmup, then the cosine of the authors' training code) and
warmup-stable-decay (WSD).

The training code (``framework/task/task.py`` of ``RobertCsordas/moeut_training_code``) builds
``CosineAnnealingLR(T_max=total_steps, eta_min=min_lr_multiplier · lr)`` and, before every step ``i``,
evaluates it at ``max(0, i − warmup)``; during warmup it overrides the result with ``lr · (i + 1) / warmup``.
The cosine therefore spans ``total_steps`` although only ``total_steps − warmup`` of it are used: with 4000
warmup steps out of 100k the last step runs at ≈ 0.1036 · lr rather than 0.1 · lr (without warmup the two
readings agree).

WSD (``--schedule wsd``): the same linear warmup, then the peak ``lr`` held constant, then a decay over the
last ``D`` steps to ``final_ratio · lr`` (linear or half-cosine), reaching the floor exactly at the last
step. Only the decay depends on the total, so a run can be extended as long as its decay has not started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine")
DEFAULT_DECAY_FRACTION = 0.2  # WSD without --decay-steps / --decay-fraction: the last 20 % of the steps


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


def wsd_lr_at(step: int, *, peak: float, total_steps: int, warmup: int, decay_steps: int,
              final_ratio: float = 0.1, shape: str = "linear") -> float:
    """Warmup-stable-decay: ``peak · (step + 1) / warmup`` during warmup, ``peak`` until the decay starts at
    ``total_steps − decay_steps``, then from ``peak`` towards ``final_ratio · peak`` with progress
    ``p = (step − start + 1) / decay_steps`` (``p = 1`` at the last step): linear ``1 − p`` or cosine
    ``(1 + cos(π·p)) / 2`` of the way between the floor and the peak."""
    if not 0 < decay_steps <= total_steps:
        raise ValueError(f"decay_steps={decay_steps} must be in 1 … total_steps={total_steps}")
    if shape not in DECAY_SHAPES:
        raise ValueError(f"decay shape {shape!r}: must be one of {list(DECAY_SHAPES)}")
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    start = total_steps - decay_steps
    if step < start:
        return peak
    p = min(1.0, (step - start + 1) / decay_steps)
    frac = 1 - p if shape == "linear" else 0.5 * (1 + math.cos(math.pi * p))
    floor = final_ratio * peak
    return floor + (peak - floor) * frac


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate schedule, resolved from the training settings (:meth:`TrainConfig.lr_schedule`)."""

    kind: str  # "cosine" or "wsd"
    peak: float
    total_steps: int
    warmup: int
    final_ratio: float = 0.1
    decay_steps: int = 0  # wsd only
    decay_shape: str = "linear"  # wsd only

    def lr(self, step: int) -> float:
        if self.kind == "cosine":
            return lr_at(step, peak=self.peak, total_steps=self.total_steps, warmup=self.warmup,
                         final_ratio=self.final_ratio)
        return wsd_lr_at(step, peak=self.peak, total_steps=self.total_steps, warmup=self.warmup,
                         decay_steps=self.decay_steps, final_ratio=self.final_ratio, shape=self.decay_shape)

    @property
    def decay_start(self) -> int:
        """First step whose learning rate depends on the total number of steps."""
        return self.warmup if self.kind == "cosine" else self.total_steps - self.decay_steps

    def first_difference(self, other: "LRSchedule", before: int) -> int | None:
        """The first step < ``before`` at which the two schedules set different learning rates, or None."""
        for step in range(before):
            a, b = self.lr(step), other.lr(step)
            if not math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0):
                return step
        return None

    def describe(self) -> str:
        if self.kind == "cosine":
            return f"cosine (T_max {self.total_steps}, min {self.final_ratio:g}×)"
        return (f"wsd (stable to step {self.decay_start}, {self.decay_shape} decay over {self.decay_steps} steps "
                f"to {self.final_ratio:g}×)")
