"""The one error base of moeut.

Every error whose message already names the bad input and the fix derives from :class:`MoeutError`; the
command line prints such errors as ``moeut VERB: error: …`` lines without a traceback. The concrete
classes live next to the code that raises them (``DataError`` in :mod:`moeut.data.errors`,
``CheckpointError`` in :mod:`moeut.run.checkpoint`, ``ConfigError`` in :mod:`moeut.model.config`, …).
"""

from __future__ import annotations


class MoeutError(Exception):
    """Base class of every user-facing moeut error (bad input, missing file, incompatible run, …)."""


class MissingDependency(MoeutError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""
