"""``moeut prepare``: documents -> tokenizer -> train/validation token shards.

Steps:

1. **scan** the inputs once: count documents, hash each one (for the split), and keep a bounded,
   deterministic sample for tokenizer training;
2. **split by document**: the ``n_val = max(ceil(val_fraction * N), min_val_docs)`` documents with the
   smallest keyed hash ``blake2b(content, key=seed)`` (ties by position) go to validation. The split
   depends on document contents and the seed, not on input order: adding documents moves few others;
3. **tokenizer**: load ``tokenizer`` if given, else train one on the sampled *training* documents
   (see :mod:`moeut.data.tokenizer`);
4. **tokenize** (second pass over the inputs), append EOS after every document, and write
   ``train/`` and ``val/`` shards (see :mod:`moeut.data.shards`).

Output directory::

    out/
      prepare.json               what was prepared from what (written last: marks a complete output)
      tokenizer.model            the SentencePiece model used
      tokenizer.json             its metadata (sha256, vocab size, special ids, sentencepiece version)
      train/meta.json            split metadata
      train/train-00000.bin ...  uint16 (uint32 for vocab > 65536) token ids
      val/meta.json
      val/val-00000.bin ...

**Single pass** (``passes=1``; the default when an input is a stream: standard input ``-``, a Hugging Face
dataset with ``streaming=1``): the inputs are read once. The split is decided per document on the fly: a
document goes to validation when ``blake2b(content, key=seed) < val_fraction * 2**64`` (the same keyed hash,
so the split is still by content, but ``n_val`` is about, not exactly, ``val_fraction * N``, and
``min_val_docs`` is only checked at the end: a warning). Without ``tokenizer``, the first training documents
are buffered up to the tokenizer sample budget (``max_tokenizer_bytes``, default 64 MiB), the tokenizer is
trained on them, then they and the rest of the stream are tokenized. Peak memory: that buffer plus one
tokenization batch, whatever the input size. Files keep the **two-pass** default (``passes=2``), which
samples the tokenizer text from the whole corpus and gives the exact ``n_val``; a huge ``.jsonl.gz`` can
be read once with ``passes=1`` (CLI ``--passes 1``).

Everything is built in ``out/.prepare-tmp-<pid>/`` and renamed into place at the end. A non-empty
``out`` is replaced only when it is a previous output of the same inputs, or with
``overwrite=True`` (which replaces only the entries above and leaves other files alone).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
import warnings
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeut.data.corpus import default_corpus_sources
from moeut.data.errors import DataError, EmptyCorpusError, OutputDirError
from moeut.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, SplitMeta
from moeut.data.sources import DocumentSource, SourceOptions, iter_documents, resolve_inputs
from moeut.data.tokenizer import (TOKENIZER_JSON, TOKENIZER_MODEL, Tokenizer, TokenizerConfig, TrainingSample,
                                  train_tokenizer)
from moeut.fileio import atomic_write_json, read_json
from moeut.runtime import progress as progress_bar

PREPARE_FILE = "prepare.json"
PREPARE_FORMAT = "moeut-prepared"
PREPARE_FORMAT_VERSION = 1
_OUTPUT_ENTRIES = ("train", "val", TOKENIZER_MODEL, TOKENIZER_JSON)
_STAGING_PREFIX = ".prepare-tmp-"


@dataclass
class PrepareResult:
    """What :func:`prepare` wrote, with timings (seconds) per phase."""

    out_dir: Path
    tokenizer: Tokenizer
    train: SplitMeta
    val: SplitMeta
    num_documents: int
    num_bytes: int
    tokenizer_trained: bool
    seconds: dict[str, float] = field(default_factory=dict)
    passes: int = 2  # 1: streamed (split on the fly), 2: scan then tokenize


def _doc_hash(text: str, key: bytes) -> int:
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little")


def _split_key(seed: int) -> bytes:
    return b"moeut-split" + int(seed).to_bytes(16, "little", signed=True)


def split_documents(hashes: np.ndarray, val_fraction: float, min_val_docs: int) -> np.ndarray:
    """Boolean mask of validation documents: the ``n_val`` smallest hashes (ties by position).

    ``n_val = max(ceil(val_fraction * N), min_val_docs)``, at most ``N - 1`` (training keeps one document).
    """
    n = len(hashes)
    n_val = max(math.ceil(val_fraction * n - 1e-9), min_val_docs) if n else 0
    n_val = max(0, min(n_val, n - 1))
    order = np.lexsort((np.arange(n), hashes))
    mask = np.zeros(n, dtype=bool)
    mask[order[:n_val]] = True
    return mask


def _check_out_dir(out_dir: Path, inputs: list[str], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"--out {out_dir} is a file; choose a directory")
    if not out_dir.exists() or overwrite:
        return
    contents = [p for p in out_dir.iterdir() if not p.name.startswith(_STAGING_PREFIX)]
    if not contents:
        return
    manifest = out_dir / PREPARE_FILE
    if not manifest.is_file():
        names = ", ".join(sorted(p.name for p in contents)[:5])
        raise OutputDirError(f"output directory {out_dir} is not empty ({names}{', ...' if len(contents) > 5 else ''}) "
                             f"and holds no {PREPARE_FILE}, so it is not a moeut prepare output; choose another --out, "
                             "or pass --overwrite (overwrite=True) to write train/, val/ and tokenizer files into it")
    try:
        previous = read_json(manifest, "prepare manifest", "", DataError).get("inputs")
    except DataError:
        previous = None
    if previous != inputs:
        raise OutputDirError(f"output directory {out_dir} holds the prepare output of other inputs ({previous}), not "
                             f"of {inputs}; choose another --out, or pass --overwrite (overwrite=True) to replace it")


def _install(stage: Path, out_dir: Path) -> None:
    """Move the staged entries into ``out_dir``, replacing previous ones (``prepare.json`` removed first)."""
    (out_dir / PREPARE_FILE).unlink(missing_ok=True)
    trash = stage / ".old"
    trash.mkdir()
    for name in _OUTPUT_ENTRIES:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            os.replace(target, trash / name)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(stage / name, target)


def prepare(inputs: Sequence[str | os.PathLike[str] | DocumentSource] | None, out_dir: str | os.PathLike[str], *,
            tokenizer: str | os.PathLike[str] | None = None, vocab_size: int = 8000,
            tokenizer_config: TokenizerConfig | None = None, val_fraction: float = 0.01, min_val_docs: int = 1,
            seed: int = 0, text_field: str = "text", doc_separator: str | None = None, errors: str = "strict",
            shard_tokens: int = DEFAULT_SHARD_TOKENS, max_tokenizer_bytes: int | None = None,
            num_threads: int | None = None, overwrite: bool = False, progress: bool = True,
            passes: int | None = None) -> PrepareResult:
    """Tokenize ``inputs`` into ``out_dir/train`` and ``out_dir/val`` shards (see the module docstring).

    ``inputs``: paths, Hugging Face dataset specs, or :class:`~moeut.data.sources.DocumentSource`
    objects; ``None`` means the default corpus (:mod:`moeut.data.corpus`). ``tokenizer``: an existing
    ``tokenizer.model`` (or its directory) to use instead of training one with ``vocab_size``
    (``tokenizer_config`` overrides all training options). ``errors``: ``"strict"`` or ``"replace"``
    for undecodable input bytes. ``passes``: 1 (stream the inputs once), 2 (scan, then tokenize), or ``None``:
    1 when an input is a stream (stdin, a streaming HF dataset), else 2.
    """
    t_start = time.perf_counter()
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_val_docs < 0:
        raise ValueError(f"min_val_docs must be >= 0, got {min_val_docs}")
    out_dir = Path(out_dir).expanduser()
    if inputs is None:
        sources = default_corpus_sources(errors)  # type: ignore[arg-type]
    else:
        sources = resolve_inputs(inputs, SourceOptions(text_field, doc_separator, errors))  # type: ignore[arg-type]
    described = [s.describe() for s in sources]
    _check_out_dir(out_dir, described, overwrite)
    given = Tokenizer.load(tokenizer) if tokenizer is not None else None  # fail before the long passes
    sample_bytes = {"max_sample_bytes": max_tokenizer_bytes} if max_tokenizer_bytes else {}
    tok_cfg = tokenizer_config or TokenizerConfig(vocab_size=vocab_size, seed=seed, **sample_bytes)
    seconds: dict[str, float] = {}
    if passes is None:
        passes = 1 if any(getattr(s, "is_stream", False) for s in sources) else 2
    if passes not in (1, 2):
        raise ValueError(f"passes must be 1 or 2, got {passes}")
    if passes == 1:
        return _prepare_one_pass(sources, described, out_dir, given, tokenizer, tok_cfg, val_fraction, min_val_docs,
                                 seed, shard_tokens, num_threads, progress, t_start,
                                 {"text_field": text_field, "doc_separator": doc_separator, "errors": errors,
                                  "shard_tokens": shard_tokens})

    # 1. scan: hashes for the split, a sample for the tokenizer
    t0 = time.perf_counter()
    key = _split_key(seed)
    hashes = array("Q")
    sample = TrainingSample(tok_cfg.max_sample_bytes, tok_cfg.seed) if tokenizer is None else None
    n_bytes = 0
    with progress_bar(enabled=progress, desc="scan", unit=" doc") as bar:
        for i, doc in enumerate(iter_documents(sources)):
            hashes.append(_doc_hash(doc, key))
            n_bytes += len(doc.encode("utf-8", "surrogatepass"))
            if sample is not None:
                sample.add(i, doc)
            bar.update()
    n_docs = len(hashes)
    if n_docs == 0:
        raise EmptyCorpusError(f"the inputs hold no text (every document is empty or whitespace): {described}; "
                               "check the paths, --text-field and --doc-separator")
    hash_arr = np.frombuffer(hashes, dtype=np.uint64)
    is_val = split_documents(hash_arr, val_fraction, min_val_docs)
    if not is_val.any() and (val_fraction > 0 or min_val_docs > 0):
        warnings.warn(f"only {n_docs} document(s): the validation split is empty", stacklevel=2)
    seconds["scan"] = time.perf_counter() - t0

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = out_dir / f"{_STAGING_PREFIX}{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        # 2. tokenizer
        t0 = time.perf_counter()
        if sample is not None:
            val_idx = set(np.flatnonzero(is_val).tolist())
            tok = train_tokenizer(sample, stage, tok_cfg, exclude=val_idx)
        else:
            assert given is not None
            given.save(stage)
            tok = Tokenizer.load(stage)
        seconds["tokenizer"] = time.perf_counter() - t0

        # 3. tokenize into shards
        t0 = time.perf_counter()
        common = dict(vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer_sha256=tok.sha256, shard_tokens=shard_tokens)
        train_w = ShardWriter(stage / "train", "train", **common)
        val_w = ShardWriter(stage / "val", "val", **common)
        batch: list[tuple[int, str]] = []
        batch_chars = n_tokens = 0

        def flush() -> None:
            nonlocal batch, batch_chars, n_tokens
            ids = tok.encode_batch([d for _, d in batch], num_threads)
            for (i, _), doc_ids in zip(batch, ids, strict=True):
                (val_w if is_val[i] else train_w).add_document(doc_ids)
                n_tokens += len(doc_ids) + 1
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
            batch, batch_chars = [], 0

        with progress_bar(enabled=progress, desc="tokenize", unit=" doc", total=n_docs) as bar:
            for i, doc in enumerate(iter_documents(sources)):
                if i >= n_docs or _doc_hash(doc, key) != hash_arr[i]:
                    raise DataError(f"the inputs changed between two reads (document {i} differs): {described}; "
                                    "make sure nothing writes to them while prepare runs, and that dataset "
                                    "iteration is deterministic")
                batch.append((i, doc))
                batch_chars += len(doc)
                if len(batch) >= 512 or batch_chars >= 8 << 20:
                    flush()
            if batch:
                flush()
        if train_w.num_documents + val_w.num_documents != n_docs:
            raise DataError(f"the inputs changed between two reads ({n_docs} documents, then "
                            f"{train_w.num_documents + val_w.num_documents}): {described}")
        train_meta, val_meta = _finish(
            stage, out_dir, train_w, val_w, seconds, t0, passes=2, described=described, n_docs=n_docs,
            n_bytes=n_bytes, tok=tok, trained=sample is not None, tokenizer=tokenizer, seed=seed,
            val_fraction=val_fraction, min_val_docs=min_val_docs,
            split_method="smallest blake2b(document, key=seed) hashes go to val",
            method="the n_val documents with the smallest blake2b(document, key=seed) go to val, "
                   "n_val = max(ceil(val_fraction * documents), min_val_docs)",
            options={"text_field": text_field, "doc_separator": doc_separator, "errors": errors,
                     "shard_tokens": shard_tokens})
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    seconds["total"] = time.perf_counter() - t_start
    return PrepareResult(out_dir=out_dir, tokenizer=Tokenizer.load(out_dir), train=train_meta, val=val_meta,
                         num_documents=n_docs, num_bytes=n_bytes, tokenizer_trained=sample is not None, seconds=seconds,
                         passes=2)


def _prepare_one_pass(sources: list[DocumentSource], described: list[str], out_dir: Path, given: Tokenizer | None,
                      tokenizer: str | os.PathLike[str] | None, tok_cfg: TokenizerConfig, val_fraction: float,
                      min_val_docs: int, seed: int, shard_tokens: int, num_threads: int | None, progress: bool,
                      t_start: float, options: dict) -> PrepareResult:
    """The single-pass variant (see the module docstring): split on the fly, tokenizer from the first documents."""
    key = _split_key(seed)
    threshold = min(int(val_fraction * 2.0 ** 64), (1 << 64) - 1)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = out_dir / f"{_STAGING_PREFIX}{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    seconds: dict[str, float] = {}
    try:
        docs = iter_documents(sources)
        n_docs = n_bytes = n_tokens = 0
        buffered: list[tuple[str, bool]] = []  # documents read before the tokenizer exists
        t0 = time.perf_counter()
        if given is None:
            sample = TrainingSample(tok_cfg.max_sample_bytes, tok_cfg.seed)
            kept = 0
            for doc in docs:
                is_val = _doc_hash(doc, key) < threshold
                buffered.append((doc, is_val))
                if not is_val:
                    sample.add(len(buffered) - 1, doc)
                    kept += len(doc.encode("utf-8", "surrogatepass"))
                    if kept >= tok_cfg.max_sample_bytes:
                        break
            if not buffered:
                raise EmptyCorpusError(f"the inputs hold no text (every document is empty or whitespace): {described}")
            if len(sample) == 0:  # every buffered document went to validation
                raise EmptyCorpusError(f"the inputs hold no training document to train the tokenizer on: {described}")
            tok = train_tokenizer(sample, stage, tok_cfg)
            del sample
        else:
            given.save(stage)
            tok = Tokenizer.load(stage)
        seconds["tokenizer"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        common = dict(vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer_sha256=tok.sha256, shard_tokens=shard_tokens)
        train_w = ShardWriter(stage / "train", "train", **common)
        val_w = ShardWriter(stage / "val", "val", **common)
        batch: list[tuple[str, bool]] = []
        batch_chars = 0
        with progress_bar(enabled=progress, desc="tokenize (one pass)", unit=" doc") as bar:
            def flush() -> None:
                nonlocal batch, batch_chars, n_tokens
                ids = tok.encode_batch([d for d, _ in batch], num_threads)
                for (_, is_val), doc_ids in zip(batch, ids, strict=True):
                    (val_w if is_val else train_w).add_document(doc_ids)
                    n_tokens += len(doc_ids) + 1
                bar.update(len(batch))
                bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
                batch, batch_chars = [], 0

            buffered.reverse()
            for doc, is_val in _drain_reversed(buffered, docs, key, threshold):
                n_docs += 1
                n_bytes += len(doc.encode("utf-8", "surrogatepass"))
                batch.append((doc, is_val))
                batch_chars += len(doc)
                if len(batch) >= 512 or batch_chars >= 8 << 20:
                    flush()
            if batch:
                flush()
        if n_docs == 0:
            raise EmptyCorpusError(f"the inputs hold no text (every document is empty or whitespace): {described}; "
                                   "check the paths, --text-field and --doc-separator")
        if val_w.num_documents < min_val_docs:
            warnings.warn(f"single pass: {val_w.num_documents} validation document(s) of {n_docs}, fewer than "
                          f"min_val_docs={min_val_docs} (the split is decided per document; raise --val-fraction, "
                          "or use two passes for files)", stacklevel=3)
        train_meta, val_meta = _finish(
            stage, out_dir, train_w, val_w, seconds, t0, passes=1, described=described, n_docs=n_docs,
            n_bytes=n_bytes, tok=tok, trained=given is None, tokenizer=tokenizer, seed=seed,
            val_fraction=val_fraction, min_val_docs=min_val_docs,
            split_method="blake2b(document, key=seed) < val_fraction * 2**64 goes to val",
            method="single pass: a document goes to val when blake2b(document, key=seed) < val_fraction * 2**64",
            options=options)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created and out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    seconds["total"] = time.perf_counter() - t_start
    return PrepareResult(out_dir=out_dir, tokenizer=Tokenizer.load(out_dir), train=train_meta, val=val_meta,
                         num_documents=n_docs, num_bytes=n_bytes, tokenizer_trained=given is None, seconds=seconds,
                         passes=1)


def _finish(stage: Path, out_dir: Path, train_w, val_w, seconds: dict[str, float], t0: float, *, passes: int,
            described: list[str], n_docs: int, n_bytes: int, tok: Tokenizer, trained: bool, tokenizer, seed: int,
            val_fraction: float, min_val_docs: int, split_method: str, method: str, options: dict):
    """Close both split writers, move the staged output into place and write ``prepare.json`` (both modes)."""
    extra = {"seed": seed, "split_method": split_method}
    train_w.extra.update(extra)
    val_w.extra.update(extra)
    train_meta, val_meta = train_w.close(), val_w.close()
    seconds["tokenize"] = time.perf_counter() - t0
    _install(stage, out_dir)
    manifest = {
        "format": PREPARE_FORMAT, "format_version": PREPARE_FORMAT_VERSION,
        "inputs": described, "passes": passes,
        "documents": n_docs, "bytes": n_bytes,
        "tokenizer": {"file": TOKENIZER_MODEL, "metadata": TOKENIZER_JSON, "sha256": tok.sha256,
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "trained": trained,
                      "source": None if tokenizer is None else str(Path(tokenizer).resolve())},
        "split": {"seed": seed, "val_fraction": val_fraction, "min_val_docs": min_val_docs, "method": method},
        "splits": {m.split: {"dir": m.split, "tokens": m.num_tokens, "documents": m.num_documents,
                             "shards": len(m.shards)} for m in (train_meta, val_meta)},
        "options": options,
    }
    atomic_write_json(out_dir / PREPARE_FILE, manifest)
    return train_meta, val_meta


def _drain_reversed(buffered: list[tuple[str, bool]], docs, key: bytes, threshold: int):
    """The buffered documents (stored in reverse, popped from the end so each is freed once handed out), then
    the rest of the stream with its split decided on the fly."""
    while buffered:
        yield buffered.pop()
    for doc in docs:
        yield doc, _doc_hash(doc, key) < threshold


# --------------------------------------------------------------------------- command line
