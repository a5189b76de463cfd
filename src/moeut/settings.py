"""One definition per setting.

A configuration dataclass declares each field once, with :func:`setting`: its type and default (the field's),
its help text, its command-line flag and whether it may change when a run resumes. The command line
(:mod:`moeut.cli.settings_flags`), ``--config FILE.json``, ``--help`` with the defaults, and the resume rules
(:mod:`moeut.train.resume`) all read these definitions, so a setting cannot be renamed or re-defaulted in one
place and forgotten in another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """What a field means to a user: how to set it, and what it may do on resume."""

    help: str
    aliases: tuple[str, ...] = ()  # further flags for it (older spellings that keep working), without "--"
    resumable: bool = False  # may change when a run resumes: it changes nothing the run computes
    choices: tuple[str, ...] | None = None
    default_text: str | None = None  # how --help states a default that is not the field's literal default
    cli: bool = True  # False: set in a --config file, or by a flag of its own that the verb defines
    metavar: str | None = None
    const: Any = None  # the value of the flag given without one (``--activation-checkpointing`` = 1)


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, help: str, **kw: Any) -> Any:
    """A dataclass field with its :class:`Setting` (``kw``: the Setting's other attributes)."""
    return dataclasses.field(default=default, default_factory=default_factory,  # type: ignore[call-overload]
                             metadata={"setting": Setting(help=help, **kw)})


def settings_of(cls: type) -> list[tuple[dataclasses.Field, Setting]]:
    """The fields of a configuration dataclass that carry a :class:`Setting`, in declaration order."""
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(cls) if "setting" in f.metadata]


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for a default_factory; None when it has none)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None
