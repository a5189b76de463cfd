"""Documents from input files, directories, and Hugging Face datasets.

An *input* is one of:

* a plain text file (any extension other than the ones below, e.g. ``.txt``): **one document per
  file**, unless a document separator is given (``doc_separator``, CLI ``--doc-separator``):

  - ``"blank"``: one or more blank (whitespace-only) lines end a document; ``"blank:N"``: N or more;
  - ``"line"``: every non-blank line is a document;
  - any other string: a line equal to it (after stripping spaces) ends a document, e.g. ``<|endoftext|>``.

  Splitting on blank lines by default would cut code and poetry into fragments, hence one document
  per file unless told otherwise;
* ``.jsonl`` / ``.ndjson``: one JSON object per line, the text in field ``text_field`` (default ``text``);
* ``.parquet``: the string column ``text_field`` (read with pyarrow);
* any of those compressed with gzip (``.txt.gz``, ``.jsonl.gz``, ``.parquet.gz``);
* a directory: every file with a known extension (``.txt .text .md .utf8 .jsonl .ndjson .parquet``,
  plus ``.gz``) below it, recursively, in sorted path order; hidden files are skipped;
* ``.json`` / ``.csv`` files are refused with a pointer to ``hf:json?data_files=...`` (below);
* ``-``: standard input, as JSON lines (field ``text_field``), or as text split by ``doc_separator`` when one
  is given. A stream: ``prepare`` reads it in a single pass;
* anything else that is not an existing path: a Hugging Face dataset loaded with
  ``datasets.load_dataset`` (``pip install 'moeut[data]'``). Options go in a query string:
  ``NAME?name=CONFIG&split=train&data_files=a.jsonl,b.jsonl&streaming=1`` (also ``data_dir``,
  ``revision``, ``cache_dir``); the prefix ``hf:`` forces this reading, e.g.
  ``hf:json?data_files=local/*.jsonl``: the builtin loaders ``json``, ``text``, ``parquet`` and ``csv``
  read local files this way. A missing path that can only be a path (``./x``, ``/x``, ``a/b/c``,
  ``x.txt``, ``dir/x`` with ``dir`` existing...) is an error, never a dataset name.

Text files are UTF-8 (a leading BOM is dropped, CRLF becomes LF). With ``errors="strict"`` an
undecodable byte raises :class:`~moeut.data.errors.DecodeError` naming the file and byte offset;
``errors="replace"`` substitutes U+FFFD. Every document is trimmed (trailing whitespace, leading
blank lines; indentation of the first line is kept) and whitespace-only documents are skipped.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol, runtime_checkable
from urllib.parse import parse_qsl

from moeut.data.errors import DataError, DecodeError, DependencyError, EmptyCorpusError, InputFormatError, MissingInputError

Errors = Literal["strict", "replace"]

TEXT_SUFFIXES = (".txt", ".text", ".md", ".utf8")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_CHUNK = 1 << 20
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t\f\v]*\n)+")
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class SourceOptions:
    """How inputs are read. ``hf_split`` is the split used for Hugging Face datasets without ``?split=``."""

    text_field: str = "text"
    doc_separator: str | None = None
    errors: Errors = "strict"
    hf_split: str = "train"

    def __post_init__(self) -> None:
        if self.errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {self.errors!r}")
        if self.doc_separator is not None:
            _LineSplitter(self.doc_separator)  # validates


@runtime_checkable
class DocumentSource(Protocol):
    """Anything that yields documents (non-empty strings) and describes itself for metadata."""

    def describe(self) -> str: ...

    def __iter__(self) -> Iterator[str]: ...


def clean_document(text: str) -> str:
    """Trim trailing whitespace and leading blank lines (keeping the first line's indentation)."""
    return _LEADING_BLANK_LINES.sub("", text.rstrip())


def _check_str(text: Any, where: str, errors: Errors) -> str:
    """A str from JSON/datasets that UTF-8 can encode (JSON may hold lone surrogates like "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        if errors == "strict":
            raise DecodeError(f"{where}: the text holds an unencodable character ({e.reason} at character {e.start}); "
                              "pass --errors replace to substitute U+FFFD", path=where, offset=e.start) from None
        text = _SURROGATES.sub("\ufffd", text)
    return text


# --------------------------------------------------------------------------- byte streams and decoding

def _open_bytes(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _base_suffix(path: Path) -> str:
    """The extension that says the format: ``a.jsonl.gz`` -> ``.jsonl``."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def _decode_error(path: Path, offset: int, reason: str) -> DecodeError:
    where = " of the decompressed data" if path.name.endswith(".gz") else ""
    return DecodeError(f"{path}: byte {offset}{where} is not valid UTF-8 ({reason}); the file must be UTF-8, "
                       "or pass --errors replace (errors='replace') to substitute U+FFFD", path=str(path), offset=offset)


def iter_text_lines(path: Path, errors: Errors = "strict") -> Iterator[str]:
    """Decoded lines of a (possibly gzipped) UTF-8 file, with ``\\n`` endings; CRLF becomes LF, a BOM is dropped.

    Reads 1 MiB at a time. A strict decoding error reports the absolute byte offset of the bad byte.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    consumed = 0  # bytes handed to the decoder so far
    first = True
    buf = ""
    try:
        with _open_bytes(path) as f:
            while True:
                chunk = f.read(_CHUNK)
                final = not chunk
                buffered = len(decoder.getstate()[0])  # bytes of an incomplete character kept from the last chunk
                try:
                    text = decoder.decode(chunk, final)
                except UnicodeDecodeError as e:
                    raise _decode_error(path, consumed - buffered + e.start, e.reason) from None
                consumed += len(chunk)
                if first and text:
                    text = text.removeprefix("\ufeff")
                    first = False
                buf += text
                if final:
                    complete, buf = buf, ""
                else:
                    cut = buf.rfind("\n")
                    if cut < 0:
                        continue
                    complete, buf = buf[:cut + 1], buf[cut + 1:]  # a trailing "\r" waits for its "\n"
                lines = complete.replace("\r\n", "\n").split("\n")
                last = lines.pop()
                for line in lines:
                    yield line + "\n"
                if last:
                    yield last
                if final:
                    return
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise MissingInputError(f"input {path} does not exist; check the path") from None
        raise InputFormatError(f"{path}: cannot read it ({e}); check that the file is complete and, "
                               "for .gz, a valid gzip stream") from None


# --------------------------------------------------------------------------- document splitting

class _LineSplitter:
    """Groups lines into documents according to a ``doc_separator`` spec (see the module docstring)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.marker: str | None = None
        self.min_blank = 0
        self.per_line = spec == "line"
        if spec == "blank" or spec.startswith("blank:"):
            n = spec.partition(":")[2] or "1"
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"doc_separator {spec!r}: use 'blank' or 'blank:N' with N >= 1")
            self.min_blank = int(n)
        elif not self.per_line:
            self.marker = spec.strip()
            if not self.marker:
                raise ValueError("doc_separator must not be empty or whitespace; use 'blank' for blank lines")

    def split(self, lines: Iterable[str]) -> Iterator[str]:
        if self.per_line:
            for line in lines:
                if doc := clean_document(line):
                    yield doc
            return
        cur: list[str] = []
        blanks: list[str] = []
        for line in lines:
            if self.marker is not None:
                if line.strip() == self.marker:
                    yield from _emit(cur)
                    cur = []
                else:
                    cur.append(line)
                continue
            if not line.strip():
                blanks.append(line)
                continue
            if len(blanks) >= self.min_blank:
                yield from _emit(cur)
                cur = []
            else:
                cur.extend(blanks)
            blanks = []
            cur.append(line)
        yield from _emit(cur)


def _emit(lines: list[str]) -> Iterator[str]:
    if doc := clean_document("".join(lines)):
        yield doc


# --------------------------------------------------------------------------- sources

class TextFileSource:
    """A UTF-8 text file (optionally gzipped): one document, or several split by ``doc_separator``."""

    def __init__(self, path: str | os.PathLike[str], doc_separator: str | None = None, errors: Errors = "strict") -> None:
        self.path = Path(path)
        self.doc_separator = doc_separator
        self.errors = errors
        self._splitter = _LineSplitter(doc_separator) if doc_separator is not None else None

    def describe(self) -> str:
        sep = f" (documents split on {self.doc_separator!r})" if self.doc_separator is not None else ""
        return f"text:{self.path.resolve()}{sep}"

    def __iter__(self) -> Iterator[str]:
        lines = iter_text_lines(self.path, self.errors)
        if self._splitter is None:
            yield from _emit(list(lines))
        else:
            yield from self._splitter.split(lines)


class JsonlSource:
    """JSON lines (optionally gzipped): one object per line, the document in ``text_field``."""

    def __init__(self, path: str | os.PathLike[str], text_field: str = "text", errors: Errors = "strict") -> None:
        self.path = Path(path)
        self.text_field = text_field
        self.errors = errors

    def describe(self) -> str:
        return f"jsonl:{self.path.resolve()}[{self.text_field}]"

    def __iter__(self) -> Iterator[str]:
        offset = 0
        try:
            with self._open() as f:
                for lineno, raw in enumerate(f, 1):
                    start, offset = offset, offset + len(raw)
                    if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                        raw, start = raw[3:], start + 3
                    try:
                        line = raw.decode("utf-8", self.errors)
                    except UnicodeDecodeError as e:
                        raise _decode_error(self.path, start + e.start, e.reason) from None
                    if not line.strip():
                        continue
                    yield from self._document(line, lineno)
        except (OSError, EOFError) as e:
            raise InputFormatError(f"{self.path}: cannot read it ({e}); check that the file is complete and, "
                                   "for .gz, a valid gzip stream") from None

    def _open(self) -> IO[bytes]:
        return _open_bytes(self.path)

    def _document(self, line: str, lineno: int) -> Iterator[str]:
        where = f"{self.path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); a .jsonl file holds "
                                   "one JSON object per line") from None
        if not isinstance(obj, dict):
            raise InputFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if self.text_field not in obj:
            keys = ", ".join(map(repr, list(obj)[:20]))
            raise InputFormatError(f"{where}: no field {self.text_field!r} (fields: {keys}); pass --text-field NAME")
        text = obj[self.text_field]
        if text is None:
            return
        if not isinstance(text, str):
            raise InputFormatError(f"{where}: field {self.text_field!r} holds a {type(text).__name__}, not a string; "
                                   "pass --text-field with the field holding the text")
        if doc := clean_document(_check_str(text, where, self.errors)):
            yield doc


class StdinSource(JsonlSource):
    """Standard input (``--input -``): JSON lines (the document in ``text_field``), or, when ``doc_separator``
    is given, UTF-8 text split by it. A stream: it can be read once, so ``prepare`` reads it in one pass."""

    is_stream = True

    def __init__(self, text_field: str = "text", doc_separator: str | None = None, errors: Errors = "strict",
                 stream: IO[bytes] | None = None) -> None:
        super().__init__("<stdin>", text_field, errors)
        self.doc_separator = doc_separator
        self._stream = stream
        self._read = False

    def describe(self) -> str:
        how = f"text split on {self.doc_separator!r}" if self.doc_separator is not None else f"jsonl[{self.text_field}]"
        return f"stdin:{how}"

    def _open(self) -> IO[bytes]:
        if self._read:
            raise DataError("standard input was already read; a stream can be read only once (prepare reads it in "
                            "a single pass)")
        self._read = True
        return contextlib.nullcontext(self._stream if self._stream is not None else sys.stdin.buffer)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[str]:
        if self.doc_separator is None:
            yield from super().__iter__()
            return
        with self._open() as raw:
            lines = io.TextIOWrapper(raw, encoding="utf-8-sig", errors=self.errors, newline=None)
            try:
                yield from _LineSplitter(self.doc_separator).split(lines)
            except UnicodeDecodeError as e:
                raise DecodeError(f"standard input is not valid UTF-8 ({e.reason}); pass --errors replace",
                                  path="<stdin>", offset=e.start) from None
            finally:
                lines.detach()


class ParquetSource:
    """A Parquet file (optionally gzipped) with a string (or binary) column ``text_field``, read with pyarrow."""

    def __init__(self, path: str | os.PathLike[str], text_field: str = "text", errors: Errors = "strict") -> None:
        self.path = Path(path)
        self.text_field = text_field
        self.errors = errors

    def describe(self) -> str:
        return f"parquet:{self.path.resolve()}[{self.text_field}]"

    def __iter__(self) -> Iterator[str]:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise DependencyError(f"reading {self.path} needs pyarrow: pip install 'moeut[data]' (or pyarrow)") from None
        try:
            if self.path.name.endswith(".gz"):
                with gzip.open(self.path, "rb") as g:
                    pf = pq.ParquetFile(io.BytesIO(g.read()))
            else:
                pf = pq.ParquetFile(self.path)
        except (OSError, EOFError, pa.ArrowException) as e:
            raise InputFormatError(f"{self.path}: not a readable Parquet file ({e})") from None
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise InputFormatError(f"{self.path}: no column {self.text_field!r} (columns: {', '.join(map(repr, names))}); "
                                   "pass --text-field NAME")
        col_type = pf.schema_arrow.field(self.text_field).type
        is_bytes = pa.types.is_binary(col_type) or pa.types.is_large_binary(col_type)
        if not (is_bytes or pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            raise InputFormatError(f"{self.path}: column {self.text_field!r} has type {col_type}, not string; "
                                   "pass --text-field with the column holding the text")
        row = 0
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    continue
                if is_bytes:
                    try:
                        value = value.decode("utf-8", self.errors)
                    except UnicodeDecodeError as e:
                        raise DecodeError(f"{self.path}: row {row}, byte {e.start} of column {self.text_field!r} is not "
                                          "valid UTF-8; pass --errors replace to substitute U+FFFD",
                                          path=str(self.path), offset=e.start) from None
                if doc := clean_document(value):
                    yield doc


_HF_KEYS = {"name", "split", "data_files", "data_dir", "revision", "streaming", "cache_dir"}


class HFDatasetSource:
    """A Hugging Face dataset, ``datasets.load_dataset(path, **load_kwargs)``, the document in ``text_field``.

    The dataset is loaded on first iteration (and kept, so a second pass does not reload it).
    ``load_dataset("json"|"text"|"parquet"|"csv", data_files=...)`` reads local files this way;
    the ``text`` loader's column is ``text``.
    """

    def __init__(self, path: str, /, *, text_field: str = "text", errors: Errors = "strict", **load_kwargs: Any) -> None:
        self.path = path
        self.text_field = text_field
        self.errors = errors
        self.load_kwargs = {"split": "train", **load_kwargs}
        self._dataset: Any = None

    @classmethod
    def from_spec(cls, spec: str, *, text_field: str = "text", errors: Errors = "strict",
                  default_split: str = "train") -> HFDatasetSource:
        """Parse ``[hf:]NAME[?name=CONFIG&split=S&data_files=a,b&data_dir=D&revision=R&streaming=1]``."""
        body = spec.removeprefix("hf:")
        name, _, query = body.partition("?")
        if not name:
            raise ValueError(f"{spec!r}: no dataset name before '?'")
        kwargs: dict[str, Any] = {"split": default_split}
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            if key not in _HF_KEYS:
                raise ValueError(f"{spec!r}: unknown option {key!r}; allowed: {', '.join(sorted(_HF_KEYS))}")
            if key == "data_files":
                files = [f for f in value.split(",") if f]
                kwargs[key] = files[0] if len(files) == 1 else files
            elif key == "streaming":
                kwargs[key] = value.lower() in ("1", "true", "yes")
            else:
                kwargs[key] = value
        return cls(name, text_field=text_field, errors=errors, **kwargs)

    @property
    def is_stream(self) -> bool:
        """A streaming dataset (``?streaming=1``): iterating it downloads it again, so prepare reads it once."""
        return bool(self.load_kwargs.get("streaming", False))

    def describe(self) -> str:
        opts = "&".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in sorted(self.load_kwargs.items()))
        return f"hf:{self.path}?{opts}[{self.text_field}]"

    def _load(self) -> Any:
        if self._dataset is not None:
            return self._dataset
        datasets = _import_datasets(self.path)
        try:
            ds = datasets.load_dataset(self.path, **self.load_kwargs)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "could not load"
            raise DataError(
                f"could not load Hugging Face dataset {self.path!r} with {self.load_kwargs} ({type(e).__name__}: {e}). "
                f"It is not an existing local path either. Check the name and split, the network (offline? set "
                f"HF_DATASETS_OFFLINE=1 to use the cache), or pass an existing file or directory") from None
        columns = getattr(ds, "column_names", None)
        if isinstance(columns, list) and self.text_field not in columns:
            raise InputFormatError(f"Hugging Face dataset {self.path!r} has no column {self.text_field!r} "
                                   f"(columns: {', '.join(map(repr, columns))}); pass --text-field NAME")
        if isinstance(columns, list) and hasattr(ds, "select_columns"):
            ds = ds.select_columns([self.text_field])
        self._dataset = ds
        return ds

    def __iter__(self) -> Iterator[str]:
        for i, row in enumerate(self._load()):
            if self.text_field not in row:
                raise InputFormatError(f"Hugging Face dataset {self.path!r}, row {i}: no field {self.text_field!r}; "
                                       "pass --text-field NAME")
            text = row[self.text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise InputFormatError(f"Hugging Face dataset {self.path!r}, row {i}: {self.text_field!r} holds a "
                                       f"{type(text).__name__}, not a string; pass --text-field NAME")
            if doc := clean_document(_check_str(text, f"Hugging Face dataset {self.path!r}, row {i}", self.errors)):
                yield doc


def _import_datasets(name: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DependencyError(f"{name!r} is not an existing file or directory, so it was read as a Hugging Face dataset "
                              "name, which needs the `datasets` package: pip install 'moeut[data]' (or datasets); "
                              "or check the path") from None
    return datasets


# --------------------------------------------------------------------------- resolving inputs

def _looks_like_path(s: str) -> bool:
    """True for strings that can only mean a local path (so a missing one is an error, not a dataset name)."""
    if s.startswith(("/", "./", "../", "~", ".\\")) or "\\" in s or "*" in s:
        return True
    name = s.lower().removesuffix(".gz")
    if name.endswith(KNOWN_SUFFIXES + (".json", ".csv", ".gz")) or s.lower().endswith(".gz"):
        return True
    parts = s.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _file_source(path: Path, options: SourceOptions) -> DocumentSource:
    suffix = _base_suffix(path)
    if suffix in JSONL_SUFFIXES:
        return JsonlSource(path, options.text_field, options.errors)
    if suffix in PARQUET_SUFFIXES:
        return ParquetSource(path, options.text_field, options.errors)
    if suffix in (".json", ".csv"):
        loader = suffix[1:]
        raise InputFormatError(f"{path}: {suffix} files are not read directly; convert to .jsonl (one object per "
                               f"line), or pass hf:{loader}?data_files={path} to read it with datasets")
    return TextFileSource(path, options.doc_separator, options.errors)


def _walk(directory: Path) -> Iterator[Path]:
    entries = sorted(os.scandir(directory), key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        p = Path(entry.path)
        if entry.is_dir():
            yield from _walk(p)
        elif entry.is_file() and _base_suffix(p) in KNOWN_SUFFIXES:
            yield p


def resolve_inputs(inputs: Sequence[str | os.PathLike[str] | DocumentSource],
                   options: SourceOptions = SourceOptions()) -> list[DocumentSource]:
    """Turn input specs into document sources, failing early on missing paths and empty directories."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise EmptyCorpusError("no inputs given; pass at least one --input PATH")
    sources: list[DocumentSource] = []
    for item in inputs:
        if isinstance(item, DocumentSource) and not isinstance(item, (str, os.PathLike)):
            sources.append(item)
            continue
        s = os.fspath(item)
        if s == "-":
            sources.append(StdinSource(options.text_field, options.doc_separator, options.errors))
            continue
        if s.startswith("hf:"):
            sources.append(HFDatasetSource.from_spec(s, text_field=options.text_field, errors=options.errors,
                                                     default_split=options.hf_split))
            continue
        path = Path(s).expanduser()
        if path.is_dir():
            files = list(_walk(path))
            if not files:
                raise EmptyCorpusError(f"directory {path} holds no input files (looked for "
                                       f"{' '.join(KNOWN_SUFFIXES)}, optionally .gz); add files or pass other inputs")
            sources.extend(_file_source(f, options) for f in files)
        elif path.exists():
            sources.append(_file_source(path, options))
        elif _looks_like_path(s) or isinstance(item, Path):
            raise MissingInputError(f"input {s} does not exist (looked at {path.absolute()}); check the path")
        else:
            try:
                _import_datasets(s)
            except DependencyError as e:
                raise MissingInputError(f"input {s} does not exist (looked at {path.absolute()}); check the path. "
                                        f"(As a Hugging Face dataset name it needs `datasets`: "
                                        "pip install 'moeut[data]'.)") from e
            sources.append(HFDatasetSource.from_spec(s, text_field=options.text_field, errors=options.errors,
                                                     default_split=options.hf_split))
    return sources


def iter_documents(sources: Iterable[DocumentSource]) -> Iterator[str]:
    """All documents of the sources, in order."""
    for source in sources:
        yield from source
