"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption notice).

The first signal only sets a flag: the trainer finishes the step in progress, writes a checkpoint and exits
with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), the shell's convention for "killed by it".
A second SIGINT aborts at once (``KeyboardInterrupt``); the last good checkpoint is untouched, since a
checkpoint is only ever replaced by an atomic rename. Under torchrun, Ctrl-C reaches a worker twice — from
the terminal and again from the agent, which forwards the signal it got — so there a second SIGINT within
:data:`FORWARDED_WITHIN_S` of the first counts as the same one.

Ranks agree on when to stop and when to save (:func:`agree`): a signal may reach one rank only, or reach
ranks during different steps, and a checkpoint needs every rank at the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

FORWARDED_WITHIN_S = 2.0
_HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager that turns SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self, *, quiet: bool = False):
        self.signum: int | None = None
        self._first_at = 0.0
        self._quiet = quiet
        self._previous: dict[int, object] = {}
        self._under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from there
            for sig in _HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if not self._quiet:
                print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                      f"(Ctrl-C again aborts at once)", file=sys.stderr, flush=True)
            return
        forwarded = self._under_torchrun and now - self._first_at < FORWARDED_WITHIN_S
        if signum == signal.SIGINT and not forwarded:
            raise KeyboardInterrupt  # the user insists: stop now, the last good checkpoint stays as it is


def agree(values: list[int | bool], device: torch.device, distributed: bool) -> list[int]:
    """Every rank gets the largest of each value over the ranks (one small all-reduce; none in one process):
    a signal number or a "checkpoint due" flag seen by any rank is acted on by all, after the same step."""
    if not distributed:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]
