"""``moeut train``: train (or resume) a model on data written by ``moeut prepare``, with the paper's recipe."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moeut.cli.common import UsageError
from moeut.cli.settings_flags import add_setting_flags, given_settings
from moeut.model.config import parse_overrides
from moeut.run import load_run
from moeut.run.layout import TRAIN_CONFIG
from moeut.train import TrainConfig, TrainingError, TrainingStopped, train

HELP = "train a model on data written by `moeut prepare` (the paper's recipe)"

def add_arguments(tr: argparse.ArgumentParser) -> None:
    tr.add_argument("--config", help="JSON file with TrainConfig fields; command-line flags override it")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its newest checkpoint, with the settings saved in "
                         "--out/train_config.json (flags given with it override those that may change on resume)")
    tr.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a ModelConfig field, e.g. --model d_model=256 (repeatable)")
    tr.add_argument("--data", action="append", metavar="DIR[:WEIGHT]",
                    help="directory written by `moeut prepare`; repeat it for a mixture, each drawn in proportion "
                         "to its WEIGHT (default 1), e.g. --data c4:3 --data code:1 (validation: the first one's val)")
    add_setting_flags(tr, TrainConfig)  # every other TrainConfig field, as its definition says
    tr.add_argument("--allow-schedule-change", action="store_true",
                    help="with --resume: accept other --steps / schedule settings even though the steps already "
                         "taken would have had other learning rates")
    tr.add_argument("--allow-tokenizer-mismatch", action="store_true",
                    help="with --init-from: train on data whose tokenizer is not the source run's (a warning)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")


# the base preset per architecture when the whole model configuration comes from --init-from's source
_BASE_PRESET = {"moeut": "moeut-tiny", "dense": "dense-tiny", "sut": "sut-tiny"}


def _model_of(source: str, allow_tokenizer_mismatch: bool) -> dict:
    """``--init-from`` without ``--preset``/``--model``: the source's model configuration, as every field
    written over its architecture's tiny preset (vocab_size still follows the data)."""
    src = load_run(source, device="cpu", require_tokenizer=False,
                   allow_tokenizer_mismatch=allow_tokenizer_mismatch).config
    overrides = {k: v for k, v in src.to_dict().items() if k != "vocab_size"}
    return {"preset": _BASE_PRESET[src.arch], "model_overrides": overrides}


def run(args: argparse.Namespace) -> int:
    given = given_settings(args, TrainConfig)
    if args.data:  # one directory stays a plain string (as in older train_config.json files)
        given["data"] = args.data[0] if len(args.data) == 1 else list(args.data)
    if args.model:
        given["model_overrides"] = parse_overrides(args.model)
    if args.init_from and not (args.preset or args.model or args.config):
        given.update(_model_of(args.init_from, args.allow_tokenizer_mismatch))
    saved = _saved_run_config(args) if args.resume and not args.config else None
    if saved is not None:  # the run's own settings, then what this command line changes
        if "model_overrides" in given:
            given["model_overrides"] = {**saved.get("model_overrides", {}), **given["model_overrides"]}
        cfg = TrainConfig.from_dict({**saved, **given})
    else:
        cfg = TrainConfig.from_file(args.config, **given) if args.config else TrainConfig.from_dict(given)
    for name in ("data", "out"):
        if not getattr(cfg, name):
            raise UsageError(f"--{name} is required (on the command line or in the --config file)")
    try:
        train(cfg, resume=args.resume, show_progress=not args.no_progress,
              allow_schedule_change=args.allow_schedule_change,
              allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    except TrainingError as e:
        print(f"moeut train: error: {e}", file=sys.stderr)
        return 1
    except TrainingStopped as e:
        if not e.quiet:
            print(f"moeut train: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def _saved_run_config(args: argparse.Namespace) -> dict | None:
    """``--resume --out RUN`` without ``--config``: the settings saved in ``RUN/train_config.json`` (None for a
    directory without one). ``out`` is the directory given, so a moved or copied run resumes where it is now."""
    if not args.out:
        raise UsageError("--resume needs --out RUN, the run directory to continue")
    path = Path(args.out) / TRAIN_CONFIG
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}): restore it, or pass every setting with --config "
                         f"FILE.json or flags") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{path} does not hold a training configuration (a JSON object)")
    return {**saved, "out": args.out}
