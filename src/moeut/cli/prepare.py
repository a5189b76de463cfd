"""``moeut prepare``: train a tokenizer (or take one) and write token shards, split by document."""

from __future__ import annotations

import argparse
import sys

from moeut.data.errors import DataError
from moeut.data.prepare import PrepareOptions, prepare

HELP = "train a tokenizer and write token shards (train/val split)"
_DEFAULTS = PrepareOptions()  # the flags' defaults are the options' own


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _fraction(s: str) -> float:
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", action="extend", metavar="PATH", default=None,
                        help="text/.jsonl/.parquet files (optionally .gz), directories, or Hugging Face dataset names "
                             "(NAME[?name=CONFIG&split=S&data_files=F,...], hf: forces it), or - for standard "
                             "input (JSON lines, or text split by --doc-separator). Default: the built-in "
                             "corpus (pip install --no-deps exllamav2==0.3.2)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--vocab-size", type=_positive_int, default=_DEFAULTS.vocab_size, metavar="N",
                        help=f"vocabulary of the tokenizer to train (default {_DEFAULTS.vocab_size})")
    parser.add_argument("--tokenizer", metavar="FILE", default=_DEFAULTS.tokenizer,
                        help="use this tokenizer.model (or its directory) instead of training one")
    parser.add_argument("--text-field", default=_DEFAULTS.text_field, metavar="F",
                        help=f"JSON field / column with the text (default {_DEFAULTS.text_field})")
    parser.add_argument("--doc-separator", default=_DEFAULTS.doc_separator, metavar="SEP",
                        help="split text files into documents: 'blank' (blank lines), 'blank:N', 'line', or a "
                             "separator line such as '<|endoftext|>' (default: one document per file)")
    parser.add_argument("--val-fraction", type=_fraction, default=_DEFAULTS.val_fraction, metavar="X",
                        help=f"fraction of documents for validation (default {_DEFAULTS.val_fraction})")
    parser.add_argument("--min-val-docs", type=_non_negative_int, default=_DEFAULTS.min_val_docs, metavar="N",
                        help=f"at least this many validation documents (default {_DEFAULTS.min_val_docs})")
    parser.add_argument("--errors", choices=("strict", "replace"), default=_DEFAULTS.errors,
                        help="undecodable bytes: fail (strict, default) or substitute U+FFFD (replace)")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, metavar="S",
                        help=f"seed of the split and tokenizer sample (default {_DEFAULTS.seed})")
    parser.add_argument("--shard-tokens", type=_positive_int, default=_DEFAULTS.shard_tokens, metavar="N",
                        help=f"tokens per shard file (default {_DEFAULTS.shard_tokens})")
    parser.add_argument("--max-tokenizer-bytes", type=_positive_int, default=_DEFAULTS.max_tokenizer_bytes,
                        metavar="N",
                        help="text sampled for tokenizer training (default 64 MiB)")
    parser.add_argument("--threads", type=_positive_int, default=_DEFAULTS.num_threads, metavar="N",
                        help="tokenizer threads (default: all cores)")
    parser.add_argument("--passes", type=int, choices=(1, 2), default=_DEFAULTS.passes,
                        help="1: read the inputs once (split on the fly, tokenizer trained on the first documents); "
                             "2: scan, then tokenize (exact split size, tokenizer sample from the whole corpus). "
                             "Default: 1 when an input is a stream (- for stdin, an HF dataset with streaming=1), else 2")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out that holds other things")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def options(args: argparse.Namespace) -> PrepareOptions:
    """The :class:`~moeut.data.prepare.PrepareOptions` that the parsed flags ask for."""
    return PrepareOptions(tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                          min_val_docs=args.min_val_docs, seed=args.seed, text_field=args.text_field,
                          doc_separator=args.doc_separator, errors=args.errors, shard_tokens=args.shard_tokens,
                          max_tokenizer_bytes=args.max_tokenizer_bytes, num_threads=args.threads,
                          overwrite=args.overwrite, progress=not args.quiet, passes=args.passes)


def run(args: argparse.Namespace) -> int:
    """Run ``moeut prepare`` from parsed arguments; prints a summary. Returns 0, or 1 after printing an error."""
    try:
        res = prepare(args.input, args.out, options(args))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok = res.tokenizer
    how = "trained" if res.tokenizer_trained else "given"
    how_read = "one pass (streamed; split on the fly)" if res.passes == 1 else "two passes (scan, then tokenize)"
    print(f"{res.num_documents:,} documents, {res.num_bytes:,} bytes -> {res.out_dir}; read in {how_read}")
    print(f"tokenizer ({how}): vocab {tok.vocab_size}, eos {tok.eos_id}, sha256 {tok.sha256[:16]}...")
    for m in (res.train, res.val):
        print(f"{m.split:>5}: {m.num_documents:,} documents, {m.num_tokens:,} tokens ({m.dtype}) "
              f"in {len(m.shards)} shard(s)")
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items()))
    return 0
