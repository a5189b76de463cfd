"""Exceptions of the data layer.

Every message names the file (or input) at fault and says what to do about it. All of them derive from
:class:`DataError`, so a command line can catch one type and print ``str(err)``.
"""

from __future__ import annotations

from moeut.errors import MissingDependency, MoeutError


class DataError(MoeutError):
    """Base class of every error raised by :mod:`moeut.data`."""


class MissingInputError(DataError, FileNotFoundError):
    """An input path (or dataset name) does not exist."""


class EmptyCorpusError(DataError, ValueError):
    """The inputs hold no document with non-whitespace text."""


class InputFormatError(DataError, ValueError):
    """An input file is malformed: bad JSON, a missing text field, undecodable bytes..."""


class DecodeError(InputFormatError, UnicodeError):
    """An input file holds bytes that are not valid UTF-8 (``errors="strict"``)."""

    def __init__(self, message: str, *, path: str, offset: int) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class DependencyError(DataError, MissingDependency):
    """An optional dependency (``datasets``, ``pyarrow``, ``sentencepiece``, the default corpus) is missing."""


class TokenizerError(DataError, ValueError):
    """A tokenizer file is missing, corrupt, or unusable."""


class TokenizerMismatchError(TokenizerError):
    """Token shards were made with a different tokenizer than the one expected."""


class ShardError(DataError, ValueError):
    """A token shard or its metadata is missing, truncated, or inconsistent."""


class OutputDirError(DataError, FileExistsError):
    """The output directory holds something that ``prepare`` will not overwrite."""
