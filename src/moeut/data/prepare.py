"""``moeut prepare``: documents -> tokenizer -> train/validation token shards.

Steps:

1. **scan** the inputs once: count documents, hash each one (for the split), and keep a bounded,
   deterministic sample for tokenizer training;
2. **split by document**: the ``n_val = max(ceil(val_fraction * N), min_val_docs)`` documents with the
   smallest keyed hash ``blake2b(content, key=seed)`` (ties by position) go to validation. The split
   depends on document contents and the seed, not on input order: adding documents moves few others
   (see :mod:`moeut.data.split`);
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

Both modes differ only in how they split and where the tokenizer's text comes from; they share the
tokenization loop, the shard writers and the output directory handling (staging, atomic install,
refusing a foreign ``out``: see :mod:`moeut.data.outdir`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
import warnings
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeut.data.corpus import default_corpus_sources
from moeut.data.errors import DataError, EmptyCorpusError
from moeut.data.outdir import check_out_dir, install, staging
from moeut.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, SplitMeta
from moeut.data.sources import DocumentSource, Errors, SourceOptions, iter_documents, resolve_inputs
from moeut.data.split import EXACT, ON_THE_FLY, SplitRule, doc_hash, split_documents, split_key, val_threshold
from moeut.data.tokenizer import (TOKENIZER_JSON, TOKENIZER_MODEL, Tokenizer, TokenizerConfig, TrainingSample,
                                  train_tokenizer)
from moeut.runtime import progress as progress_bar

Inputs = Sequence[str | os.PathLike[str] | DocumentSource]
Labelled = tuple[str, bool]  # a document and whether it goes to validation

# a tokenization batch: enough documents to keep SentencePiece's threads busy, few enough bytes to bound memory
_BATCH_DOCS = 512
_BATCH_CHARS = 8 << 20


@dataclass(frozen=True)
class PrepareOptions:
    """Every setting of :func:`prepare`; ``moeut prepare`` builds one from its flags."""

    #: an existing ``tokenizer.model`` (or its directory) to use instead of training one
    tokenizer: str | os.PathLike[str] | None = None
    #: vocabulary of the tokenizer to train
    vocab_size: int = 8000
    #: every tokenizer training option; when given, ``vocab_size``, ``seed`` and ``max_tokenizer_bytes``
    #: do not shape the tokenizer
    tokenizer_config: TokenizerConfig | None = None
    #: fraction of the documents that goes to validation, in [0, 1)
    val_fraction: float = 0.01
    #: at least this many validation documents (a single pass can only warn when it has fewer)
    min_val_docs: int = 1
    #: seed of the split and of the tokenizer sample
    seed: int = 0
    #: JSON field / Parquet column holding the text
    text_field: str = "text"
    #: how text files split into documents (see :mod:`moeut.data.sources`); ``None``: one document per file
    doc_separator: str | None = None
    #: undecodable input bytes: ``"strict"`` fails naming the file and offset, ``"replace"`` substitutes U+FFFD
    errors: Errors = "strict"
    #: tokens per shard file
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    #: text sampled for tokenizer training; ``None``: :class:`~moeut.data.tokenizer.TokenizerConfig`'s 64 MiB
    max_tokenizer_bytes: int | None = None
    #: tokenizer threads; ``None``: all cores
    num_threads: int | None = None
    #: write into a non-empty ``out_dir`` that is not a previous output of the same inputs
    overwrite: bool = False
    #: show progress bars
    progress: bool = True
    #: 1: read the inputs once; 2: scan, then tokenize; ``None``: 1 when an input is a stream, else 2
    passes: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_val_docs < 0:
            raise ValueError(f"min_val_docs must be >= 0, got {self.min_val_docs}")
        if self.passes not in (None, 1, 2):
            raise ValueError(f"passes must be 1 or 2, got {self.passes}")

    def tokenizer_training(self) -> TokenizerConfig:
        """How to train the tokenizer when none is given."""
        sample_bytes = {"max_sample_bytes": self.max_tokenizer_bytes} if self.max_tokenizer_bytes else {}
        return self.tokenizer_config or TokenizerConfig(vocab_size=self.vocab_size, seed=self.seed, **sample_bytes)

    def recorded(self) -> dict[str, Any]:
        """The reading and sharding options, as ``prepare.json`` records them."""
        return {"text_field": self.text_field, "doc_separator": self.doc_separator, "errors": self.errors,
                "shard_tokens": self.shard_tokens}


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


def prepare(inputs: Inputs | None, out_dir: str | os.PathLike[str], options: PrepareOptions | None = None,
            **settings: Any) -> PrepareResult:
    """Tokenize ``inputs`` into ``out_dir/train`` and ``out_dir/val`` shards (see the module docstring).

    ``inputs``: paths, Hugging Face dataset specs, or :class:`~moeut.data.sources.DocumentSource`
    objects; ``None`` means the default corpus (:mod:`moeut.data.corpus`). ``options`` holds the settings
    (:class:`PrepareOptions`); keyword ``settings`` are :class:`PrepareOptions` fields that override it,
    so ``prepare(inputs, out, vocab_size=400)`` needs no options object.
    """
    t_start = time.perf_counter()
    run = _Run.resolve(inputs, Path(out_dir).expanduser(), dataclasses.replace(options or PrepareOptions(), **settings))
    result = _one_pass(run) if run.passes == 1 else _two_pass(run)
    result.seconds["total"] = time.perf_counter() - t_start
    return result


@dataclass
class _Run:
    """One call of :func:`prepare`: its options and what they resolve to, all checked before any long pass."""

    options: PrepareOptions
    out_dir: Path
    sources: list[DocumentSource]
    described: list[str]  # each source's description: recorded, compared on a rerun, named in errors
    given: Tokenizer | None  # the tokenizer to use, or None to train one
    tokenizer_config: TokenizerConfig
    key: bytes  # the split's hash key

    @classmethod
    def resolve(cls, inputs: Inputs | None, out_dir: Path, options: PrepareOptions) -> _Run:
        """Open the inputs, vet ``out_dir`` and load a given tokenizer, so bad arguments fail in seconds."""
        if inputs is None:
            sources = default_corpus_sources(options.errors)
        else:
            sources = resolve_inputs(inputs, SourceOptions(options.text_field, options.doc_separator, options.errors))
        described = [s.describe() for s in sources]
        check_out_dir(out_dir, described, options.overwrite)
        given = Tokenizer.load(options.tokenizer) if options.tokenizer is not None else None
        return cls(options, out_dir, sources, described, given, options.tokenizer_training(), split_key(options.seed))

    @property
    def passes(self) -> int:
        """The asked number of passes; by default one when an input is a stream (it cannot be read twice)."""
        if self.options.passes is not None:
            return self.options.passes
        return 1 if any(getattr(s, "is_stream", False) for s in self.sources) else 2


# --------------------------------------------------------------------------- the two pipelines


@dataclass
class _Scan:
    """What the first of two passes learnt about the documents."""

    hashes: np.ndarray  # uint64 content hash per document, in input order
    is_val: np.ndarray  # bool per document: the exact split
    sample: TrainingSample | None  # the tokenizer's text, None when a tokenizer is given


def _two_pass(run: _Run) -> PrepareResult:
    """Scan, split exactly, then read again to tokenize: the tokenizer sample comes from the whole corpus."""
    seconds: dict[str, float] = {}
    with _timed(seconds, "scan"):
        scan = _scan(run)
    n_docs = len(scan.hashes)
    with staging(run.out_dir) as stage:
        with _timed(seconds, "tokenizer"):
            tok = _tokenizer_for_exact_split(run, scan, stage)
        with _timed(seconds, "tokenize"):
            writers, n_bytes = _tokenize(run, stage, tok, _reread(run, scan), "tokenize", n_docs)
            if writers.documents != n_docs:
                raise DataError(f"the inputs changed between two reads ({n_docs} documents, then "
                                f"{writers.documents}): {run.described}")
            metas = writers.close(EXACT, run.options.seed)
        install(stage, run.out_dir, _manifest(run, EXACT, tok, metas, n_bytes))
    return _result(run, EXACT, metas, n_bytes, seconds)


def _one_pass(run: _Run) -> PrepareResult:
    """Read the inputs once (a stream cannot be read twice): split on the fly, tokenizer from the first documents."""
    seconds: dict[str, float] = {}
    threshold = val_threshold(run.options.val_fraction)
    with staging(run.out_dir) as stage:
        docs = ((doc, doc_hash(doc, run.key) < threshold) for doc in iter_documents(run.sources))
        with _timed(seconds, "tokenizer"):
            tok, buffered = _tokenizer_from_first_documents(run, docs, stage)
        with _timed(seconds, "tokenize"):
            stream = itertools.chain(_drain(buffered), docs)
            writers, n_bytes = _tokenize(run, stage, tok, stream, "tokenize (one pass)", None)
            _check_split_on_the_fly(run, writers)
            metas = writers.close(ON_THE_FLY, run.options.seed)
        install(stage, run.out_dir, _manifest(run, ON_THE_FLY, tok, metas, n_bytes))
    return _result(run, ON_THE_FLY, metas, n_bytes, seconds)


def _scan(run: _Run) -> _Scan:
    """First pass: every document's hash (the split needs all of them) and the tokenizer sample."""
    hashes = array("Q")
    sample = TrainingSample(run.tokenizer_config.max_sample_bytes, run.tokenizer_config.seed) \
        if run.given is None else None
    with progress_bar(enabled=run.options.progress, desc="scan", unit=" doc") as bar:
        for i, doc in enumerate(iter_documents(run.sources)):
            hashes.append(doc_hash(doc, run.key))
            if sample is not None:
                sample.add(i, doc)
            bar.update()
    if not hashes:
        raise _no_text(run)
    hash_arr = np.frombuffer(hashes, dtype=np.uint64)
    opts = run.options
    is_val = split_documents(hash_arr, opts.val_fraction, opts.min_val_docs)
    if not is_val.any() and (opts.val_fraction > 0 or opts.min_val_docs > 0):
        _warn(f"only {len(hash_arr)} document(s): the validation split is empty")
    return _Scan(hash_arr, is_val, sample)


def _reread(run: _Run, scan: _Scan) -> Iterator[Labelled]:
    """Second pass: the documents with their split, each checked against its scanned hash (the split and the
    tokenizer sample came from the first read: changed inputs must fail, not be silently mislabelled)."""
    for i, doc in enumerate(iter_documents(run.sources)):
        if i >= len(scan.hashes) or doc_hash(doc, run.key) != scan.hashes[i]:
            raise DataError(f"the inputs changed between two reads (document {i} differs): {run.described}; "
                            "make sure nothing writes to them while prepare runs, and that dataset "
                            "iteration is deterministic")
        yield doc, scan.is_val[i]


def _tokenizer_for_exact_split(run: _Run, scan: _Scan, stage: Path) -> Tokenizer:
    """The given tokenizer, or one trained on the scanned sample less its validation documents."""
    if run.given is not None:
        return _stage_given(run.given, stage)
    assert scan.sample is not None
    val_idx = set(np.flatnonzero(scan.is_val).tolist())
    return train_tokenizer(scan.sample, stage, run.tokenizer_config, exclude=val_idx)


def _tokenizer_from_first_documents(run: _Run, docs: Iterator[Labelled],
                                    stage: Path) -> tuple[Tokenizer, list[Labelled]]:
    """The given tokenizer, or one trained on the first training documents of a single pass. Also returns the
    documents read for it, which still have to be tokenized (reversed: see :func:`_drain`)."""
    if run.given is not None:
        return _stage_given(run.given, stage), []
    buffered, sample = _buffer_sample(run, docs)
    tok = train_tokenizer(sample, stage, run.tokenizer_config)
    buffered.reverse()
    return tok, buffered


def _buffer_sample(run: _Run, docs: Iterator[Labelled]) -> tuple[list[Labelled], TrainingSample]:
    """Read documents until the training ones fill the tokenizer sample budget. Returns every document read
    (validation ones included: they are tokenized later) and the sample of the training ones."""
    budget = run.tokenizer_config.max_sample_bytes
    sample = TrainingSample(budget, run.tokenizer_config.seed)
    buffered: list[Labelled] = []
    kept = 0
    for doc, is_val in docs:
        buffered.append((doc, is_val))
        if not is_val:
            sample.add(len(buffered) - 1, doc)
            kept += _utf8_len(doc)
            if kept >= budget:
                break
    if not buffered:
        raise _no_text(run)
    if len(sample) == 0:  # every buffered document went to validation
        raise EmptyCorpusError(f"the inputs hold no training document to train the tokenizer on: {run.described}; "
                               "lower --val-fraction, or pass --tokenizer")
    return buffered, sample


def _drain(buffered: list[Labelled]) -> Iterator[Labelled]:
    """The buffered documents in reading order: stored reversed and popped from the end, so each is freed as
    it is handed out and a single pass never holds the buffer twice."""
    while buffered:
        yield buffered.pop()


def _check_split_on_the_fly(run: _Run, writers: _SplitWriters) -> None:
    """A single pass learns only at the end whether it read anything, and how many documents went to val."""
    if writers.documents == 0:
        raise _no_text(run)
    if writers.val.num_documents < run.options.min_val_docs:
        _warn(f"single pass: {writers.val.num_documents} validation document(s) of {writers.documents}, fewer than "
              f"min_val_docs={run.options.min_val_docs} (the split is decided per document; raise --val-fraction, "
              "or use two passes for files)")


def _no_text(run: _Run) -> EmptyCorpusError:
    """The error of inputs that yield no document, whichever pipeline finds out."""
    return EmptyCorpusError(f"the inputs hold no text (every document is empty or whitespace): {run.described}; "
                            "check the paths, --text-field and --doc-separator")


def _stage_given(given: Tokenizer, stage: Path) -> Tokenizer:
    """Copy the given tokenizer into the output, so the output names the tokenizer its shards were made with."""
    given.save(stage)
    return Tokenizer.load(stage)


# --------------------------------------------------------------------------- shared by both pipelines


class _SplitWriters:
    """The train and val shard writers of one run (same tokenizer, same shard size), fed document by document."""

    def __init__(self, stage: Path, tok: Tokenizer, shard_tokens: int) -> None:
        common: dict[str, Any] = dict(vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer_sha256=tok.sha256,
                                      shard_tokens=shard_tokens)
        self.train = ShardWriter(stage / "train", "train", **common)
        self.val = ShardWriter(stage / "val", "val", **common)
        self.tokens = 0  # added so far, EOS included (for the progress bar: the writers count only flushed ones)

    @property
    def documents(self) -> int:
        return self.train.num_documents + self.val.num_documents

    def add(self, ids: list[int], is_val: bool) -> None:
        (self.val if is_val else self.train).add_document(ids)
        self.tokens += len(ids) + 1

    def close(self, rule: SplitRule, seed: int) -> tuple[SplitMeta, SplitMeta]:
        """Finish both splits, each recording how it was split; returns their metadata."""
        for writer in (self.train, self.val):
            writer.extra.update({"seed": seed, "split_method": rule.split_method})
        return self.train.close(), self.val.close()


def _tokenize(run: _Run, stage: Path, tok: Tokenizer, docs: Iterable[Labelled], desc: str,
              total: int | None) -> tuple[_SplitWriters, int]:
    """The tokenization loop of both pipelines: encode ``docs`` in batches into new train/val shard writers.

    Returns the (still open) writers and the UTF-8 size of the documents. Only one batch of documents is
    held at a time, which is what bounds a single pass's memory.
    """
    writers = _SplitWriters(stage, tok, run.options.shard_tokens)
    n_bytes = n_chars = 0
    batch: list[Labelled] = []
    with progress_bar(enabled=run.options.progress, desc=desc, unit=" doc", total=total) as bar:
        for doc, is_val in docs:
            n_bytes += _utf8_len(doc)
            batch.append((doc, is_val))
            n_chars += len(doc)
            if len(batch) >= _BATCH_DOCS or n_chars >= _BATCH_CHARS:
                _encode_batch(batch, tok, writers, run.options.num_threads, bar)
                batch, n_chars = [], 0
        if batch:
            _encode_batch(batch, tok, writers, run.options.num_threads, bar)
    return writers, n_bytes


def _encode_batch(batch: list[Labelled], tok: Tokenizer, writers: _SplitWriters, num_threads: int | None,
                  bar: Any) -> None:
    """Encode a batch with the tokenizer's threads and append each document to its split, in input order."""
    ids = tok.encode_batch([doc for doc, _ in batch], num_threads)
    for (_, is_val), doc_ids in zip(batch, ids, strict=True):
        writers.add(doc_ids, is_val)
    bar.update(len(batch))
    bar.set_postfix(tokens=f"{writers.tokens:,}", refresh=False)


def _manifest(run: _Run, rule: SplitRule, tok: Tokenizer, metas: tuple[SplitMeta, SplitMeta],
              n_bytes: int) -> dict[str, Any]:
    """``prepare.json`` (less its format header): what was prepared from what, and how."""
    opts = run.options
    return {
        "inputs": run.described, "passes": rule.passes,
        "documents": sum(m.num_documents for m in metas), "bytes": n_bytes,
        "tokenizer": {"file": TOKENIZER_MODEL, "metadata": TOKENIZER_JSON, "sha256": tok.sha256,
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "trained": run.given is None,
                      "source": None if opts.tokenizer is None else str(Path(opts.tokenizer).resolve())},
        "split": {"seed": opts.seed, "val_fraction": opts.val_fraction, "min_val_docs": opts.min_val_docs,
                  "method": rule.method},
        "splits": {m.split: {"dir": m.split, "tokens": m.num_tokens, "documents": m.num_documents,
                             "shards": len(m.shards)} for m in metas},
        "options": opts.recorded(),
    }


def _result(run: _Run, rule: SplitRule, metas: tuple[SplitMeta, SplitMeta], n_bytes: int,
            seconds: dict[str, float]) -> PrepareResult:
    """The result of an installed run (its tokenizer loaded from the output, where later runs will find it)."""
    train, val = metas
    return PrepareResult(out_dir=run.out_dir, tokenizer=Tokenizer.load(run.out_dir), train=train, val=val,
                         num_documents=train.num_documents + val.num_documents, num_bytes=n_bytes,
                         tokenizer_trained=run.given is None, seconds=seconds, passes=rule.passes)


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Record the wall time of a phase that completes (a failing one raises out of :func:`prepare` anyway)."""
    t0 = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - t0


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _warn(message: str) -> None:
    """Warn at the line that called :func:`prepare` (the call a user can change), however deep in the
    pipeline the condition was found."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
