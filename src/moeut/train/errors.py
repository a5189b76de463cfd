"""The exceptions of the training package."""

from __future__ import annotations

import signal
from pathlib import Path

from moeut.errors import MoeutError


class TrainingError(MoeutError, RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


class TrainingStopped(Exception):
    """A signal stopped training after a step; its checkpoint is written. Not an error: the run resumes."""

    def __init__(self, signum: int, step: int, steps: int, checkpoint: Path, run_dir: Path, *, distributed: bool,
                 quiet: bool):
        self.signum, self.step, self.checkpoint, self.quiet = signum, step, checkpoint, quiet
        name = signal.Signals(signum).name
        again = f"moeut train --resume --out {run_dir}"
        if distributed:
            again = f"torchrun [the same torchrun options] -m moeut.cli train --resume --out {run_dir}"
        super().__init__(f"stopped by {name} after step {step} of {steps}; checkpoint {checkpoint}. "
                         f"Resume with: {again}")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: what a shell reports for a process that the signal ended."""
        return 128 + self.signum
