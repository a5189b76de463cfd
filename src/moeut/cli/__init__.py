"""``moeut`` command line: one verb per thing a user does, one module per verb (its flags next to its code).

    moeut info   [--preset NAME] [--context T] [--json]     parameters and compute of a preset
    moeut prepare --input PATH... --out DIR [...]           tokenizer + token shards
    moeut train  --preset NAME --data DIR --out RUN [...]   train (or --resume) a model
    moeut eval   --checkpoint RUN [--tasks ...]            perplexity, zero-shot tasks, lm-eval
    moeut generate --checkpoint RUN --prompt TEXT [...]    sample with the KV cache (streams)
    moeut export-hf --checkpoint RUN --out DIR              Hugging Face transformers directory
    moeut import-paper CHECKPOINT --out RUN                 a checkpoint released with the paper -> a run
    moeut analyze {residual-norm,expert-usage,...} ...      the paper's analyses: tables, JSON, plots
    moeut demo   [--out RUN] [--compare-dense]             the main job: prepare, train, evaluate, sample

Every verb that loads a run takes ``--tokenizer`` and ``--allow-tokenizer-mismatch`` (:mod:`moeut.run.loader`).
Errors derived from :class:`moeut.errors.MoeutError` (and plain ``ValueError``/``FileNotFoundError`` about the
input) print as ``moeut VERB: error: …`` with exit code 2, without a traceback. Ctrl-C exits with 130 and a
closed output pipe with 141, also without one (128 + the signal's number, as a shell reports them).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from moeut.cli import analyze, demo, evaluate, export_hf, generate, import_paper, info, prepare, train
from moeut.errors import MoeutError

VERBS = {"info": info, "prepare": prepare, "train": train, "eval": evaluate, "generate": generate,
         "export-hf": export_hf, "import-paper": import_paper, "analyze": analyze, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeut", description="MoEUT: Mixture-of-Experts Universal Transformers")
    sub = p.add_subparsers(dest="command", required=True)
    for name, module in VERBS.items():
        verb = sub.add_parser(name, help=module.HELP)
        module.add_arguments(verb)
        verb.set_defaults(func=module.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
        return code
    except (MoeutError, ValueError, FileNotFoundError) as e:  # the message names the bad input and the fix
        print(f"moeut {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C (training handles its first one itself: moeut.train.preemption)
        print(f"\nmoeut {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # the reader went away (`moeut generate ... | head`): stop quietly, as `cat` does
        _silence_stdout()
        return 128 + signal.SIGPIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not raise BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
