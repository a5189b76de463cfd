"""Training curves: the training loss and the validation perplexity of runs against the tokens they saw.

Read from each run's ``metrics.jsonl`` (one line per logged step; a line cut short by a killed process is
skipped), so runs of any length, batch or schedule line up on one token axis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moeut.analysis.common import AnalysisError
from moeut.fileio import atomic_write_json
from moeut.report import format_table, pyplot, save_figure
from moeut.run.layout import METRICS, TRAIN_CONFIG, run_dir_of


@dataclass
class Curve:
    name: str
    preset: str | None
    train: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, training loss)
    val: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, validation perplexity)


def read_curve(run_dir: str | Path) -> Curve:
    """The curves of one run directory."""
    run = run_dir_of(run_dir)
    path = run / METRICS
    if not path.is_file():
        raise AnalysisError(f"{run} has no {METRICS}: pass run directories written by `moeut train`")
    cfg = json.loads((run / TRAIN_CONFIG).read_text()) if (run / TRAIN_CONFIG).is_file() else {}
    per_step = (cfg.get("batch_size") or 0) * (cfg.get("seq_len") or 0)
    curve, tokens = Curve(name=run.name, preset=cfg.get("preset")), 0
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        tokens = m.get("tokens_seen") or m.get("step", 0) * per_step or tokens
        if "train_loss" in m:
            curve.train.append((tokens, m["train_loss"]))
        if "val_ppl" in m:
            curve.val.append((m["step"] * per_step if per_step else tokens, m["val_ppl"]))
    if not curve.train:
        raise AnalysisError(f"{path} holds no training loss yet")
    return curve


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (the loss of one small batch is noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(curves: Sequence[Curve], path: str | Path, smooth: int) -> Path:
    plt = pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for c in curves:
        xs = [t for t, _ in c.train]
        ax_loss.plot(xs, _smooth([v for _, v in c.train], smooth), label=c.name, linewidth=1.2)
        if c.val:
            ax_val.plot([t for t, _ in c.val], [v for _, v in c.val], marker="o", label=c.name)
    ax_loss.set_title(f"training loss (trailing mean of {smooth} logged steps)")
    ax_loss.set_ylabel("cross-entropy (nats)")
    ax_val.set_title("validation perplexity")
    ax_val.set_yscale("log")
    for ax in (ax_loss, ax_val):
        ax.set_xlabel("tokens seen")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def table(curves: Sequence[Curve]) -> str:
    rows = [[c.name, c.preset or "-", c.train[-1][0], c.train[-1][1],
             c.val[-1][1] if c.val else math.nan] for c in curves]
    return format_table(["run", "preset", "tokens", "last train loss", "last val ppl"], rows, ".3f")


def run(runs: Sequence[str | Path], out: str | Path, smooth: int = 10) -> dict[str, Any]:
    if not runs:
        raise AnalysisError("give run directories: --checkpoint RUN [RUN ...]")
    if smooth < 1:
        raise AnalysisError(f"--smooth must be >= 1, got {smooth}")
    curves = [read_curve(r) for r in runs]
    out = Path(out)
    j = atomic_write_json(out / "curves.json", {"analysis": "curves", "runs": [asdict(c) for c in curves]})
    png = plot(curves, out / "curves.png", smooth)
    return {"curves": curves, "table": table(curves), "files": [j, png]}
