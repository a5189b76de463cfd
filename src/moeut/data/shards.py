"""Token shards: writing them (:class:`ShardWriter`) and reading them (:class:`TokenDataset`).

A split directory (``out/train/``, ``out/val/``) holds

* ``{split}-00000.bin``, ``{split}-00001.bin``, ...: raw little-endian token ids, ``uint16`` when the
  vocabulary fits (``vocab_size <= 65536``), else ``uint32``; documents one after the other, each
  followed by the EOS id. Read them with ``numpy.memmap(path, dtype=meta["dtype"], mode="r")``.
  Shards hold at most ``shard_tokens`` tokens (64Mi by default); a document may straddle two shards.
* ``meta.json``: see :class:`SplitMeta`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeut.data.errors import ShardError, TokenizerMismatchError
from moeut.fileio import atomic_write_json, read_json, sha256_file

SHARD_FORMAT = "moeut-tokens"
SHARD_FORMAT_VERSION = 1
META_FILE = "meta.json"
DEFAULT_SHARD_TOKENS = 64 * 2**20
_RERUN = "re-run `moeut prepare` to rebuild it"


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id of the vocabulary fits in it, else ``uint32``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32).newbyteorder("<")


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: its name (relative to the split directory), token count, size in bytes, sha256."""

    file: str
    num_tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitMeta:
    """Contents of a split's ``meta.json``."""

    split: str
    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer_sha256: str
    num_tokens: int
    num_documents: int
    shards: tuple[ShardInfo, ...] = ()
    format: str = SHARD_FORMAT
    format_version: int = SHARD_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards"] = [asdict(s) for s in self.shards]
        extra = d.pop("extra")
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d, **extra}

    @classmethod
    def from_json(cls, d: dict[str, Any], path: Path) -> SplitMeta:
        """Parse and check a ``meta.json`` object; ``path`` is named in errors."""
        if d.get("format") != SHARD_FORMAT:
            raise ShardError(f"{path} is not moeut token-shard metadata (format {d.get('format')!r}); {_RERUN}")
        if not isinstance(d.get("format_version"), int) or d["format_version"] > SHARD_FORMAT_VERSION:
            raise ShardError(f"{path} has format_version {d.get('format_version')!r}, this moeut reads up to "
                             f"{SHARD_FORMAT_VERSION}; upgrade moeut or {_RERUN}")
        known = {"format", "format_version", "split", "dtype", "vocab_size", "eos_id", "tokenizer_sha256",
                 "num_tokens", "num_documents", "shards"}
        try:
            shards = tuple(ShardInfo(str(s["file"]), int(s["num_tokens"]), int(s["bytes"]), str(s["sha256"]))
                           for s in d["shards"])
            meta = cls(split=str(d["split"]), dtype=str(d["dtype"]), vocab_size=int(d["vocab_size"]),
                       eos_id=int(d["eos_id"]), tokenizer_sha256=str(d["tokenizer_sha256"]),
                       num_tokens=int(d["num_tokens"]), num_documents=int(d["num_documents"]), shards=shards,
                       format_version=d["format_version"], extra={k: v for k, v in d.items() if k not in known})
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{path} is missing or has a bad field ({type(e).__name__}: {e}); {_RERUN}") from None
        if meta.dtype not in ("uint16", "uint32"):
            raise ShardError(f"{path}: dtype {meta.dtype!r} is not uint16 or uint32; {_RERUN}")
        if np.iinfo(meta.dtype).max < meta.vocab_size - 1:
            raise ShardError(f"{path}: dtype {meta.dtype} cannot hold ids of a {meta.vocab_size}-token vocabulary; {_RERUN}")
        if sum(s.num_tokens for s in meta.shards) != meta.num_tokens:
            raise ShardError(f"{path}: the shards hold {sum(s.num_tokens for s in meta.shards)} tokens but "
                             f"num_tokens says {meta.num_tokens}; {_RERUN}")
        return meta


class ShardWriter:
    """Appends documents (token ids + EOS) to size-bounded shard files of one split, then writes ``meta.json``.

    Shard files are written as ``*.tmp`` and renamed when complete; ``meta.json`` is written last
    (atomically), so a directory with a ``meta.json`` is always complete. Use as a context manager,
    or call :meth:`close` (returns the :class:`SplitMeta`); on an exception the partial files are removed.
    """

    def __init__(self, directory: str | os.PathLike[str], split: str, *, vocab_size: int, eos_id: int,
                 tokenizer_sha256: str, shard_tokens: int = DEFAULT_SHARD_TOKENS, buffer_tokens: int = 1 << 20,
                 extra: dict[str, Any] | None = None) -> None:
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
        self.directory = Path(directory)
        self.split = split
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.tokenizer_sha256 = tokenizer_sha256
        self.shard_tokens = shard_tokens
        self.buffer_tokens = buffer_tokens
        self.dtype = token_dtype(vocab_size)
        self.extra = dict(extra or {})
        self.num_tokens = 0
        self.num_documents = 0
        self.shards: list[ShardInfo] = []
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._file: Any = None
        self._hash: Any = None
        self._in_shard = 0
        self._closed = False
        self.directory.mkdir(parents=True, exist_ok=True)

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document's ids followed by EOS."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"a document's ids must be 1-D, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): min {arr.min()}, max {arr.max()}")
        self._buffer.append(arr.astype(self.dtype))
        self._buffer.append(np.array([self.eos_id], dtype=self.dtype))
        self._buffered += arr.size + 1
        self.num_documents += 1
        if self._buffered >= self.buffer_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        data = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        while data.size:
            if self._file is None:
                self._open_shard()
            take = min(data.size, self.shard_tokens - self._in_shard)
            chunk = data[:take].tobytes()
            self._file.write(chunk)
            self._hash.update(chunk)
            self._in_shard += take
            self.num_tokens += take
            data = data[take:]
            if self._in_shard == self.shard_tokens:
                self._finish_shard()

    def _shard_name(self, k: int) -> str:
        return f"{self.split}-{k:05d}.bin"

    def _open_shard(self) -> None:
        name = self._shard_name(len(self.shards))
        self._file = open(self.directory / (name + ".tmp"), "wb")
        self._hash = hashlib.sha256()
        self._in_shard = 0

    def _finish_shard(self) -> None:
        name = self._shard_name(len(self.shards))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.directory / (name + ".tmp"), self.directory / name)
        self.shards.append(ShardInfo(name, self._in_shard, self._in_shard * self.dtype.itemsize, self._hash.hexdigest()))
        self._in_shard = 0

    def close(self) -> SplitMeta:
        """Flush, finish the last shard, write ``meta.json``; returns the split's metadata."""
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        self._flush()
        if self._file is not None:
            self._finish_shard()
        self._closed = True
        meta = SplitMeta(split=self.split, dtype=self.dtype.name, vocab_size=self.vocab_size, eos_id=self.eos_id,
                         tokenizer_sha256=self.tokenizer_sha256, num_tokens=self.num_tokens,
                         num_documents=self.num_documents, shards=tuple(self.shards), extra=self.extra)
        atomic_write_json(self.directory / META_FILE, meta.to_json())
        return meta

    def abort(self) -> None:
        """Remove the shard files written so far (and the open ``.tmp``)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in [self.directory / (self._shard_name(len(self.shards)) + ".tmp")] + \
                    [self.directory / s.file for s in self.shards]:
            path.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


class TokenDataset:
    """Read-only view of a split's token shards: total length and contiguous windows across shard boundaries.

    Shards are memory-mapped on first access (nothing is loaded into RAM); pickling (e.g. into
    DataLoader workers) sends only the path and metadata.
    """

    def __init__(self, directory: Path, meta: SplitMeta) -> None:
        self.directory = directory
        self.meta = meta
        self.dtype = np.dtype(meta.dtype).newbyteorder("<")
        self._offsets = np.cumsum([0] + [s.num_tokens for s in meta.shards], dtype=np.int64)
        self._maps: list[np.memmap | None] = [None] * len(meta.shards)

    @classmethod
    def open(cls, path: str | os.PathLike[str], split: str | None = None, *,
             expected_tokenizer_sha256: str | None = None, verify_checksums: bool = False) -> TokenDataset:
        """Open a split directory (or its ``meta.json``; or a ``prepare`` output directory with ``split``).

        Checks the metadata, that every shard exists with the recorded size (a truncated shard is an
        error), the tokenizer hash against ``expected_tokenizer_sha256`` when given, and with
        ``verify_checksums`` every shard's sha256 (reads all data).
        """
        path = Path(path)
        if path.is_file() or path.suffix == ".json":
            meta_path = path
        elif split is not None and not (path / META_FILE).exists():
            meta_path = path / split / META_FILE
        else:
            meta_path = path / META_FILE
        if not meta_path.exists():
            raise ShardError(f"no token shards at {path}: {meta_path} does not exist; run `moeut prepare --out DIR` "
                             "and pass DIR/train or DIR/val (or DIR with a split)")
        meta = SplitMeta.from_json(read_json(meta_path, "shard metadata", _RERUN, ShardError), meta_path)
        if split is not None and meta.split != split:
            raise ShardError(f"{meta_path} describes split {meta.split!r}, not {split!r}; pass the {split!r} directory")
        if expected_tokenizer_sha256 is not None and expected_tokenizer_sha256 != meta.tokenizer_sha256:
            raise TokenizerMismatchError(
                f"{meta_path} was made with tokenizer sha256 {meta.tokenizer_sha256}, but the expected tokenizer has "
                f"sha256 {expected_tokenizer_sha256}; use the tokenizer.model saved next to the shards, or re-run "
                "`moeut prepare --tokenizer FILE` with the tokenizer you want")
        directory = meta_path.parent
        itemsize = np.dtype(meta.dtype).itemsize
        for shard in meta.shards:
            f = directory / shard.file
            if not f.is_file():
                raise ShardError(f"shard {f} is missing; {_RERUN}")
            size = f.stat().st_size
            if size != shard.num_tokens * itemsize or size != shard.bytes:
                raise ShardError(f"shard {f} has {size} bytes but {meta_path} says {shard.num_tokens} tokens "
                                 f"({shard.num_tokens * itemsize} bytes): it is truncated or was changed; {_RERUN}")
            if verify_checksums and sha256_file(f) != shard.sha256:
                raise ShardError(f"shard {f} has a different sha256 than {meta_path} records: it is corrupt; {_RERUN}")
        return cls(directory, meta)

    @property
    def num_tokens(self) -> int:
        return self.meta.num_tokens

    @property
    def num_documents(self) -> int:
        return self.meta.num_documents

    @property
    def vocab_size(self) -> int:
        return self.meta.vocab_size

    @property
    def eos_id(self) -> int:
        return self.meta.eos_id

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta.tokenizer_sha256

    def __len__(self) -> int:
        return self.meta.num_tokens

    def _map(self, k: int) -> np.memmap:
        m = self._maps[k]
        if m is None:
            m = np.memmap(self.directory / self.meta.shards[k].file, dtype=self.dtype, mode="r")
            self._maps[k] = m
        return m

    def window(self, start: int, length: int) -> np.ndarray:
        """A copy of tokens ``[start, start + length)``, read across shard boundaries (stored dtype)."""
        if length < 0 or start < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) is outside the {self.num_tokens} tokens of "
                             f"{self.directory}")
        out = np.empty(length, dtype=self.dtype)
        pos, k = 0, int(np.searchsorted(self._offsets, start, side="right")) - 1
        while pos < length:
            local = start + pos - int(self._offsets[k])
            n = min(length - pos, self.meta.shards[k].num_tokens - local)
            if n > 0:
                out[pos:pos + n] = self._map(k)[local:local + n]
                pos += n
            k += 1
        return out

    def __getitem__(self, index: int | slice) -> np.ndarray | int:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.num_tokens)
            if step != 1:
                raise IndexError("only contiguous slices (step 1) are supported")
            return self.window(start, max(0, stop - start))
        i = index + self.num_tokens if index < 0 else index
        return int(self.window(i, 1)[0])

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["meta"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.directory)!r}, split={self.meta.split!r}, tokens={self.num_tokens}, "
                f"documents={self.num_documents}, shards={len(self.meta.shards)}, dtype={self.meta.dtype})")
