"""Command-line flags generated from a configuration dataclass's :func:`moeut.settings.setting` fields.

A small generator of our own rather than jsonargparse or tyro: the verbs are plain argparse (one parser, one
style of ``--help`` for every verb), flags keep their established spellings through aliases, and a flag left
out must stay distinguishable from one given with its default (a ``--config`` file or a resumed run's saved
settings fill it then) — every generated flag therefore defaults to None.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from moeut.settings import Setting, field_default, settings_of


def add_setting_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls`` that has a Setting with ``cli=True``: ``--field-name`` (and its aliases)."""
    hints = typing.get_type_hints(cls)
    for f, s in settings_of(cls):
        if not s.cli:
            continue
        names = ["--" + f.name.replace("_", "-"), *("--" + a for a in s.aliases)]
        kind = _base_type(hints[f.name])
        help_text = f"{s.help} ({_default_text(f, s, kind)})" if _default_text(f, s, kind) else s.help
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", default=None, help=help_text)
            continue
        kw: dict[str, Any] = dict(dest=f.name, default=None, help=help_text, metavar=s.metavar)
        if s.choices:
            kw["choices"] = list(s.choices)
        if s.const is not None:
            kw.update(nargs="?", const=s.const)
        if kind is tuple:
            item = typing.get_args(hints[f.name])
            kw.update(nargs=len(item), type=item[0])
        else:
            kw["type"] = kind
        parser.add_argument(*names, **kw)


def given_settings(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` whose flags were given (flags left out are not in the result)."""
    out = {}
    for f, s in settings_of(cls):
        value = getattr(args, f.name, None)
        if s.cli and value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def _base_type(hint: Any) -> type:
    """``int | None`` → int, ``tuple[float, float]`` → tuple, ``bool`` → bool."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _default_text(f, s: Setting, kind: type) -> str:
    if s.default_text is not None:
        return f"default: {s.default_text}" if s.default_text else ""
    default = field_default(f)
    if kind is bool or default is None or default == "":
        return ""
    if isinstance(default, tuple):
        default = " ".join(map(str, default))
    return f"default: {default}"
