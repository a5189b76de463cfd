"""The error of the training package."""

from __future__ import annotations

from moeut.errors import MoeutError


class TrainingError(MoeutError, RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""
