"""``moeut analyze``: the paper's analyses, one sub-command each.

    moeut analyze residual-norm    --checkpoint RUN [--compare RUN2 ...] --data DATA --out DIR
    moeut analyze expert-usage     --checkpoint RUN --data DATA --out DIR [--kind ffn|att_v|att_o]
    moeut analyze layer-similarity --checkpoint RUN --data DATA --out DIR [--kind ...]
    moeut analyze token-diversity  --checkpoint RUN --data DATA --out DIR [--top-n 6000]
    moeut analyze depth            --checkpoint RUN --data DATA --out DIR [--max-repeats 2×trained]
    moeut analyze sweep            --sweep NAME|FILE --data DATA --out DIR [--only PATTERN ...]
    moeut analyze wallclock        --presets moeut-tiny dense-tiny ... --out DIR
    moeut analyze compute          --checkpoint RUN [RUN ...] [--presets ...] --out DIR
    moeut analyze curves           --checkpoint RUN [RUN ...] --out DIR [--smooth N]

DATA: a directory written by ``moeut prepare`` (its ``val`` split is read), a split directory, or text
files (tokenised with the run's tokenizer); default: the validation split the run was trained on. Each
command prints a table and writes JSON and PNG files into ``--out``. The four analyses of one model take
``--repeats R`` (the shared layers applied R times instead of as trained).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moeut.analysis.compute import run as run_compute
from moeut.analysis.curves import run as run_curves
from moeut.analysis.depth import run as run_depth
from moeut.analysis.expert_usage import run as run_expert_usage
from moeut.analysis.layer_similarity import run as run_layer_similarity
from moeut.analysis.residual_norm import run as run_residual_norm
from moeut.analysis.sweep import run as run_sweep
from moeut.analysis.token_diversity import run as run_token_diversity
from moeut.analysis.common import AnalysisError, model_batches
from moeut.cli.common import add_repeats_flag, add_run_flags, load_run_from_args, positive
from moeut.run import trained_val_split
from moeut.runtime import resolve_device, tune_malloc
from moeut.train.config import OPTIMIZERS, PRECISIONS
from moeut.train.wallclock import run as run_wallclock

HELP = ("the paper's analyses: residual norms, expert usage, layer similarity, token diversity, depth at inference, "
        "sweeps, wall clock and memory, compute, training curves")
_MODEL_ANALYSES = ("residual-norm", "expert-usage", "layer-similarity", "token-diversity", "depth")


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", default=None, metavar="DATA",
                   help="`moeut prepare` directory (val split), split directory, or text files "
                        "(default: the validation split the run was trained on)")
    p.add_argument("--batches", type=int, default=8, help="at most this many batches (default 8; 0 = all)")
    p.add_argument("--max-tokens", type=int, default=None, help="at most this many tokens (default: no limit)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's context)")
    add_run_flags(p, checkpoint=False)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the JSON and PNG files")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "The paper's analyses: a table on the terminal, JSON and PNG plots in --out."
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    _add_model_analyses(sub)
    _add_sweep(sub)
    _add_training_analyses(sub)


def _add_model_analyses(sub: argparse._SubParsersAction) -> None:
    """The analyses of one trained model on data: residual norms, expert usage and similarity, depth."""
    p = sub.add_parser("residual-norm", help="norm of the residual and of each layer's update, per application "
                       "(App. A.2); --compare puts e.g. the dense baseline next to MoEUT")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run directory or checkpoint file")
    p.add_argument("--compare", action="append", default=[], metavar="RUN", help="another run to show alongside "
                   "(repeatable)")
    _data_flags(p)
    add_repeats_flag(p)
    _common(p)

    for name, hlp in (("expert-usage", "how often each expert is selected in each repeat of its shared layer"),
                      ("layer-similarity", "IoU of a token's expert selections between the repeats of a layer"),
                      ("token-diversity", "distinct experts per vocabulary item and layer (Fig. 15)")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--checkpoint", required=True, metavar="RUN", help="run directory or checkpoint file")
        p.add_argument("--kind", default="ffn", choices=("ffn", "att_v", "att_o"),
                       help="σ-MoE MLP experts (default) or SwitchHead value/output experts")
        if name == "token-diversity":
            p.add_argument("--top-n", type=int, default=6000, help="most frequent tokens in the ratio plot "
                           "(default 6000, as the paper)")
        _data_flags(p)
        add_repeats_flag(p)
        _common(p)

    p = sub.add_parser("depth", help="validation perplexity with the shared layers applied R = 1 … 2×trained "
                       "times (depth chosen at inference)")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="run directory or checkpoint file")
    p.add_argument("--max-repeats", type=int, default=None, metavar="R",
                   help="largest R (default: twice the trained n_layers/G)")
    _data_flags(p)
    _common(p)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train and evaluate a list of configurations on one token budget "
                       "(resumable; one run directory each)")
    p.add_argument("--sweep", required=True, metavar="NAME|FILE",
                   help="built-in: expert-size-k, k, group-size, norm-placement, cpu-study, adaptive-depth, "
                   "scale-tiny, scale-small; or a JSON/YAML sweep file")
    p.add_argument("--data", required=True, metavar="DIR", help="directory written by `moeut prepare`")
    p.add_argument("--preset", default="moeut-tiny", help="base preset of the built-in sweeps (default moeut-tiny)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="context (default 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3, the demo's)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: tabulate the finished runs (unfinished ones are listed as not run)")
    p.add_argument("--only", nargs="+", default=[], metavar="PATTERN",
                   help="only the runs whose name matches one of these shell patterns, e.g. 'dense-*' "
                        "(to split a sweep over processes or machines; the report is written to sweep-only.json)")
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)  # accepted for symmetry, unused
    _common(p)


def _add_training_analyses(sub: argparse._SubParsersAction) -> None:
    """The analyses of training itself: step time and memory, compute, curves."""
    p = sub.add_parser("wallclock", help="time per training iteration and peak memory of presets at the same "
                       "effective batch (App. A.7)")
    p.add_argument("--presets", nargs="+", default=["moeut-tiny", "dense-tiny"], metavar="PRESET",
                   help="presets, optionally NAME:field=value,... (default moeut-tiny dense-tiny)")
    p.add_argument("--batch-size", type=int, default=16, help="effective batch in sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="context (default 256)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step to start with (default 1; "
                   "doubled on CUDA out-of-memory)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--iters", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--backend", default=None, help="expert-matmul backend (default: automatic)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="as moeut train --precision: auto (bf16 autocast on CUDA, fp32 on CPUs), bf16, fp32")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="as moeut train --optimizer (default adamw, the paper's)")
    _common(p)

    p = sub.add_parser("compute", help="MACs per token, training MACs, tokens, wall time per run; perplexity vs "
                       "parameters and vs MACs")
    p.add_argument("--checkpoint", nargs="*", default=[], metavar="RUN", help="run directories")
    p.add_argument("--presets", nargs="*", default=[], metavar="PRESET", help="presets to list without a run")
    p.add_argument("--tokens", type=int, default=None, help="token budget for the preset rows' training MACs")
    p.add_argument("--context", type=int, default=None, help="context for the preset rows (default: the preset's)")
    _common(p)

    p = sub.add_parser("curves", help="training loss and validation perplexity of runs against the tokens seen")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="RUN", help="run directories")
    p.add_argument("--smooth", type=int, default=10, help="trailing mean over N logged steps (default 10)")
    _common(p)


def run(args: argparse.Namespace) -> int:
    tune_malloc()
    show = not args.no_progress and sys.stderr.isatty()
    out = Path(args.out)
    a = args.analysis
    if a in _MODEL_ANALYSES:
        res = _run_model_analysis(args, out, show)
    elif a == "sweep":
        positive("steps", args.steps)
        res = run_sweep(args.sweep, args.data, out, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                        seq_len=args.seq_len, lr=args.lr, show_progress=not args.no_progress,
                        report_only=args.report_only, only=args.only)
    elif a == "wallclock":
        positive("iters", args.iters)
        positive("warmup", args.warmup, allow_zero=True)
        res = run_wallclock(args.presets, out, batch_size=args.batch_size, seq_len=args.seq_len,
                            device=str(resolve_device(args.device)), grad_accum=args.grad_accum, warmup=args.warmup,
                            iters=args.iters, backend=args.backend, precision=args.precision,
                            optimizer=args.optimizer, show_progress=show)
    elif a == "compute":
        res = run_compute(args.checkpoint, out, presets=args.presets, tokens=args.tokens, context=args.context)
    elif a == "curves":
        res = run_curves(args.checkpoint, out, smooth=args.smooth)
    else:  # argparse prevents this
        raise AnalysisError(f"unknown analysis {a!r}")
    print()
    print(res["table"])
    print("\nwrote " + ", ".join(str(f) for f in res["files"]))
    return 0


def _run_model_analysis(args: argparse.Namespace, out: Path, show: bool) -> dict:
    for name in ("batches", "max_tokens", "batch_size", "seq_len"):
        positive(name.replace("_", "-"), getattr(args, name), allow_zero=name == "batches")
    loaded = load_run_from_args(args, require_tokenizer=False)

    def batches_of(m):
        data = args.data
        if not data:
            data = trained_val_split(m.run_dir)
            if not data:
                raise AnalysisError(f"no --data given and the validation split {m.name} was trained on was not "
                                    "found; pass --data DIR (a `moeut prepare` directory) or text files")
        return model_batches(m, data, seq_len=args.seq_len, batch_size=args.batch_size,
                             max_batches=args.batches or None, max_tokens=args.max_tokens,
                             targets=args.analysis == "depth")

    batches = batches_of(loaded)
    cfg = loaded.config
    n_tok = sum(b.shape[0] * (b.shape[1] - (args.analysis == "depth")) for b in batches)
    print(f"moeut analyze {args.analysis}: {loaded.name} ({cfg.arch}, {cfg.n_layers} applications of "
          f"{cfg.group_size} layers) on {n_tok:,} tokens", flush=True)
    if args.analysis == "residual-norm":
        models = [loaded] + [load_run_from_args(args, c, require_tokenizer=False) for c in args.compare]
        return run_residual_norm(models, lambda m: batches if m is loaded else batches_of(m), out, show_progress=show)
    if args.analysis == "expert-usage":
        return run_expert_usage(loaded, batches, out, kind=args.kind, show_progress=show)
    if args.analysis == "layer-similarity":
        return run_layer_similarity(loaded, batches, out, kind=args.kind, show_progress=show)
    if args.analysis == "depth":
        positive("max-repeats", args.max_repeats)
        return run_depth(loaded, batches, out, max_repeats=args.max_repeats, show_progress=show)
    positive("top-n", args.top_n)
    return run_token_diversity(loaded, batches, out, kind=args.kind, top_n=args.top_n, show_progress=show)
