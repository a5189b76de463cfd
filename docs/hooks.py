"""MkDocs hook: show moeut's reST-flavoured docstrings cleanly in the API reference.

The docstrings cross-reference with Sphinx roles (``:func:`x```, ``:class:`~moeut.a.B```) and end a sentence
before a code block with ``::``. mkdocstrings renders them as Markdown, which leaves ``:func:`` in front of the
code span and ``~`` inside it; this drops the role, shortens ``~a.b.C`` to ``C`` as Sphinx does, and turns a
trailing ``::`` into ``:``.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const):(<code>)")
_TILDE = re.compile(r"<code>~(?:[\w]+\.)*([\w]+)</code>")
_DOUBLE_COLON = re.compile(r"::(</p>)")


def on_page_content(html: str, **_: object) -> str:
    html = _ROLE.sub(r"\1", html)
    html = _TILDE.sub(r"<code>\1</code>", html)
    return _DOUBLE_COLON.sub(r":\1", html)
