"""``moeut import-paper``: a checkpoint released with the MoEUT paper → a moeut run directory."""

from __future__ import annotations

import argparse

from moeut.integrations.paper.load import import_paper_run

HELP = "a checkpoint released with the MoEUT paper -> a moeut run directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Turn a checkpoint of the MoEUT paper's training code (the released "
                          "checkpoints/C4_44M.ckpt etc. of robertcsordas/moeut_training_checkpoints, downloaded by "
                          "hand) into a moeut run directory that `moeut eval`, `generate`, `analyze` and "
                          "`export-hf` read. The file is read without running any pickled code.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="the .ckpt file")
    parser.add_argument("--tokenizer", default=None, metavar="SPM_MODEL",
                        help="the release's SentencePiece model, cache/<Dataset>/<Dataset>-en-8000/"
                             "tokenizer.model.model (default: found next to CHECKPOINT in the release layout)")
    parser.add_argument("--out", required=True, metavar="RUN", help="run directory to write")


def run(args: argparse.Namespace) -> int:
    path = import_paper_run(args.checkpoint, args.out, tokenizer=args.tokenizer)
    print(f"wrote the moeut run {args.out} (checkpoint {path.name}); try `moeut eval --checkpoint {args.out}` or "
          f"`moeut generate --checkpoint {args.out} --prompt TEXT`")
    return 0
