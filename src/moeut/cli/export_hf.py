"""``moeut export-hf``: write a Hugging Face model directory from a run, or (``--to-run``) turn one back into a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeut.cli.common import add_run_flags
from moeut.integrations.hf.export import export_hf, import_hf_run
from moeut.run import LoadedRun
from moeut.run.checkpoint import CorruptCheckpointError

HELP = "write a Hugging Face transformers model directory (safetensors)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Write a Hugging Face transformers model directory (config.json, model.safetensors, "
                          "self-contained modeling code, tokenizer files) from a moeut run; or, with "
                          "--to-run, turn such a directory back into a moeut run directory.")
    add_run_flags(parser, device=False, checkpoint_help="run directory (its newest checkpoint), a checkpoint file, "
                  "or — with --to-run — an exported directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="storage type of the weights (default float32, the trained weights exactly)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip loading the export back to compare logits and tokenizer with moeut's")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--to-run", action="store_true",
                        help="import: --checkpoint is an exported directory, --out the moeut run directory to write")


def run(args: argparse.Namespace) -> int:
    if args.to_run:
        path = import_hf_run(args.checkpoint, args.out)
        print(f"wrote the moeut run {args.out} (checkpoint {path}); use it with "
              f"`moeut generate --checkpoint {args.out}`")
        return 0
    try:
        out = export_hf(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                        verify=not args.no_verify, overwrite=args.force,
                        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch, on_load=_say_what_is_exported)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{e}; to export another checkpoint, pass its file "
                                     f"(RUN/checkpoints/ckpt_*.pt) with --checkpoint") from e
    checked = "" if args.no_verify else " (verified: logits match moeut's, tokenizer round-trips)"
    print(f"wrote the Hugging Face model directory {out}{checked}\n"
          f"load it with transformers (no moeut needed; the model's code ships in the directory):\n"
          f"{load_hint(out)}")
    return 0


def _say_what_is_exported(run: LoadedRun) -> None:
    print(f"moeut export-hf: exporting {run.describe()}", flush=True)
    note = run.not_newest()
    if note:
        print(f"moeut export-hf: {note}", flush=True)


def load_hint(out: str | Path) -> str:
    """Python that loads the export as pasted: ``trust_remote_code=True`` for the model and the tokenizer too
    (without it ``AutoTokenizer`` asks interactively whether to run the directory's code, then reads the
    config as an unknown model type)."""
    path = str(Path(out).resolve())
    return (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True)\n"
            f"tokenizer = AutoTokenizer.from_pretrained({path!r}, trust_remote_code=True)")
