"""The built-in default corpus: real text shipped inside the PyPI package ``exllamav2==0.3.2``.

``exllamav2/conversion/standard_cal_data/`` holds calibration text (about 2.9 MB in the four files
used here). The package is located with :func:`importlib.util.find_spec`, **without importing it**
(importing exllamav2 pulls in heavy extensions). Install it without its dependencies::

    pip install --no-deps exllamav2==0.3.2

Each file has its own layout, so each is split into documents its own way:

* ``wiki.utf8`` (2.09 MB): WikiExtractor output, articles between ``<doc id=... title=...>`` and
  ``</doc>`` lines -> one document per article, markup lines dropped, title line kept. 1254 of the
  2349 articles are title-only stubs and are skipped: **1095 documents**;
* ``c4.utf8`` (0.33 MB): one web page per line -> **118 documents**;
* ``tiny.utf8`` (0.26 MB): TinyStories separated by ``<|endoftext|>`` lines -> **317 documents**;
* ``code.utf8`` (0.25 MB): code snippets and README sections separated by two or more blank lines
  (single blank lines occur inside code) -> **105 documents**.

(``multilingual.utf8`` and ``technical.utf8`` sit in the same folder; they are not part of the
default corpus.)
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from moeut.data.errors import DependencyError
from moeut.data.sources import DocumentSource, Errors, TextFileSource, _emit, iter_text_lines

DEFAULT_CORPUS_PACKAGE = "exllamav2"
DEFAULT_CORPUS_VERSION = "0.3.2"
DEFAULT_CORPUS_SUBDIR = ("conversion", "standard_cal_data")
DEFAULT_CORPUS_FILES = ("wiki", "c4", "tiny", "code")
INSTALL_COMMAND = f"pip install --no-deps {DEFAULT_CORPUS_PACKAGE}=={DEFAULT_CORPUS_VERSION}"

#: doc_separator per file (see :mod:`moeut.data.sources`); ``None`` = WikiExtractor markup
_SEPARATORS: dict[str, str | None] = {"wiki": None, "c4": "line", "tiny": "<|endoftext|>", "code": "blank:2"}


def _missing(detail: str) -> DependencyError:
    return DependencyError(f"the default corpus is not available ({detail}): install it with "
                           f"`{INSTALL_COMMAND}`, or pass --input with your own text")


def default_corpus_dir() -> Path:
    """The folder holding the default corpus files, found without importing exllamav2."""
    try:
        spec = importlib.util.find_spec(DEFAULT_CORPUS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise _missing(f"package {DEFAULT_CORPUS_PACKAGE} is not installed")
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        folder = Path(root).joinpath(*DEFAULT_CORPUS_SUBDIR)
        if folder.is_dir():
            return folder
    raise _missing(f"{DEFAULT_CORPUS_PACKAGE} is installed at {', '.join(roots)} but has no "
                   f"{'/'.join(DEFAULT_CORPUS_SUBDIR)} folder; another version?")


def default_corpus_files() -> list[Path]:
    """Paths of ``wiki.utf8``, ``c4.utf8``, ``tiny.utf8`` and ``code.utf8`` in that order."""
    folder = default_corpus_dir()
    files = [folder / f"{name}.utf8" for name in DEFAULT_CORPUS_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise _missing(f"{folder} lacks {', '.join(missing)}")
    return files


class WikiExtractorSource(TextFileSource):
    """A WikiExtractor dump: articles between ``<doc ...>`` and ``</doc>`` lines; text outside them is ignored."""

    _OPEN = re.compile(r"^<doc(?:\s[^>]*)?>\s*$")

    def describe(self) -> str:
        return f"wikiextractor:{self.path.resolve()}"

    def __iter__(self) -> Iterator[str]:
        yield from split_wikiextractor(self._lines())

    def _lines(self) -> Iterable[str]:
        return iter_text_lines(self.path, self.errors)


def split_wikiextractor(lines: Iterable[str]) -> Iterator[str]:
    """Documents of WikiExtractor output (``<doc ...>`` / ``</doc>`` lines delimit articles).

    The first line of an article is its title; articles with nothing after the title (redirects and
    stubs, about half of ``wiki.utf8``) are skipped.
    """
    cur: list[str] | None = None
    for line in lines:
        stripped = line.strip()
        if WikiExtractorSource._OPEN.match(stripped):
            yield from _article(cur)  # an unclosed article ends at the next one
            cur = []
        elif stripped == "</doc>":
            yield from _article(cur)
            cur = None
        elif cur is not None:
            cur.append(line)
    yield from _article(cur)


def _article(lines: list[str] | None) -> Iterator[str]:
    if lines and "".join(lines).strip().count("\n") > 0:  # more than the title line
        yield from _emit(lines)


def default_corpus_sources(errors: Errors = "strict") -> list[DocumentSource]:
    """Document sources of the default corpus, each file split its own way (see the module docstring)."""
    sources: list[DocumentSource] = []
    for path in default_corpus_files():
        sep = _SEPARATORS[path.stem]
        sources.append(WikiExtractorSource(path, None, errors) if sep is None else TextFileSource(path, sep, errors))
    return sources
