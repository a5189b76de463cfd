"""Compute (paper, App. A.8 and the MAC plots): MACs per token and total training MACs per run, with the
tokens processed, wall time and hardware from each run's logs; perplexity against parameters and against
training MACs across runs (the paper's scaling plots).

MACs follow the authors' accounting (:mod:`moeut.model.accounting`): forward multiply-accumulates per token
at the run's context length, attention scores over the whole context. Training MACs =
``3 × forward MACs/token × tokens`` (the backward pass costs about twice the forward). The forward MACs of
the validation passes are not included.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moeut.analysis.common import AnalysisError
from moeut.model import ModelConfig
from moeut.model.accounting import model_stats
from moeut.model.config import parse_preset
from moeut.run.layout import METRICS, MODEL_CONFIG, SUMMARY, TRAIN_CONFIG, run_dir_of
from moeut.fileio import atomic_write_json
from moeut.report import format_table, pyplot, save_figure

TRAIN_MAC_FACTOR = 3


@dataclass
class ComputeRow:
    name: str
    arch: str
    preset: str | None
    params: int
    params_non_embedding: int
    active_params: int
    context: int
    macs_per_token: int  # forward
    tokens: int | None  # tokens trained on (None for a preset row)
    train_macs: float | None  # 3 × forward MACs/token × tokens
    wall_time_s: float | None
    hardware: str
    val_ppl: float | None
    steps: int | None


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_row(run_dir: str | Path) -> ComputeRow:
    """The compute row of one run directory (``model_config.json``, ``train_config.json``, ``summary.json``)."""
    run = run_dir_of(run_dir)
    mc = _read_json(run / MODEL_CONFIG)
    if not mc:
        raise AnalysisError(f"{run} is not a moeut run directory (no model_config.json); pass directories written "
                            "by `moeut train`")
    cfg = ModelConfig.from_saved(mc, source=str(run / MODEL_CONFIG))
    tc = _read_json(run / TRAIN_CONFIG)
    summary = _read_json(run / SUMMARY)
    context = tc.get("seq_len") or cfg.context_length
    stats = model_stats(cfg, context=context)
    tokens = summary.get("tokens_seen")
    if tokens is None:  # fall back to the last logged metrics line
        mp = run / METRICS
        if mp.exists():
            for line in mp.read_text().splitlines():
                try:
                    tokens = json.loads(line).get("tokens_seen", tokens)
                except json.JSONDecodeError:
                    pass
    hardware = summary.get("hardware") or f"not logged (device setting: {tc.get('device', '?')})"
    return ComputeRow(name=run.name, arch=cfg.arch, preset=tc.get("preset"), params=stats["params_total"],
                      params_non_embedding=stats["params_non_embedding"],
                      active_params=stats["active_params_per_token"], context=context,
                      macs_per_token=stats["macs_per_token"], tokens=tokens,
                      train_macs=TRAIN_MAC_FACTOR * stats["macs_per_token"] * tokens if tokens else None,
                      wall_time_s=summary.get("wall_time_s"), hardware=hardware, val_ppl=summary.get("val_ppl"),
                      steps=summary.get("step"))


def preset_row(spec: str, tokens: int | None = None, context: int | None = None) -> ComputeRow:
    """A preset's row (no run): MACs per token and, given ``tokens``, the training MACs of that budget."""
    name, over = parse_preset(spec)
    cfg = ModelConfig.from_name(name, **over)
    stats = model_stats(cfg, context=context)
    return ComputeRow(name=spec, arch=cfg.arch, preset=name, params=stats["params_total"],
                      params_non_embedding=stats["params_non_embedding"], active_params=stats["active_params_per_token"],
                      context=stats["macs_context"], macs_per_token=stats["macs_per_token"], tokens=tokens,
                      train_macs=TRAIN_MAC_FACTOR * stats["macs_per_token"] * tokens if tokens else None,
                      wall_time_s=None, hardware="-", val_ppl=None, steps=None)


def _si(x: float | None) -> str | None:
    if x is None:
        return None
    for unit, div in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def table(rows: Sequence[ComputeRow]) -> str:
    body = [[r.name, r.arch, f"{r.params / 1e6:.2f}M", f"{r.active_params / 1e6:.2f}M", r.context,
             _si(r.macs_per_token), f"{r.tokens:,}" if r.tokens else None, _si(r.train_macs),
             r.wall_time_s, r.val_ppl, r.hardware] for r in rows]
    return format_table(["run", "arch", "params", "active/tok", "context", "MACs/tok", "tokens", "train MACs",
                         "wall s", "val ppl", "hardware"], body, ".1f")


def plot(rows: Sequence[ComputeRow], path: str | Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = [r for r in rows if r.val_ppl is not None]
    archs = sorted({r.arch for r in runs})
    markers = dict(zip(archs, "osD^v<>p*"))
    for arch in archs:  # points, not lines: runs may differ in budget and context
        rs = [r for r in runs if r.arch == arch]
        axes[0].scatter([r.params for r in rs], [r.val_ppl for r in rs], marker=markers[arch], label=arch)
        rs = [r for r in rs if r.train_macs]
        axes[1].scatter([r.train_macs for r in rs], [r.val_ppl for r in rs], marker=markers[arch], label=arch)
    for r in runs:
        axes[0].annotate(r.name, (r.params, r.val_ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if r.train_macs:
            axes[1].annotate(r.name, (r.train_macs, r.val_ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("parameters")
    axes[1].set_xlabel(f"training MACs ({TRAIN_MAC_FACTOR} × forward × tokens)")
    for ax, xs in ((axes[0], [r.params for r in runs]), (axes[1], [r.train_macs for r in runs if r.train_macs])):
        if xs and max(xs) / max(min(xs), 1) > 20:  # a scaling plot: log axis; else a plain one
            ax.set_xscale("log")
        else:
            # useOffset=False: close sizes read "4.5001 1e6", not "1.00 1e2+4.5e6"
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0), useOffset=False)
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3, which="both")
        if archs:
            ax.legend(fontsize=8)
    axes[0].set_title("perplexity vs parameters")
    axes[1].set_title("perplexity vs training compute")
    return save_figure(fig, path)


def run(runs: Sequence[str | Path], out: str | Path, presets: Sequence[str] = (), tokens: int | None = None,
        context: int | None = None) -> dict[str, Any]:
    if not runs and not presets:
        raise AnalysisError("give run directories (--checkpoint RUN ...) and/or --presets NAME ...")
    rows = [run_row(r) for r in runs] + [preset_row(p, tokens, context) for p in presets]
    out = Path(out)
    j = atomic_write_json(out / "compute.json", {"analysis": "compute", "train_mac_factor": TRAIN_MAC_FACTOR,
                                          "rows": [asdict(r) for r in rows]})
    png = plot(rows, out / "compute.png")
    return {"rows": rows, "table": table(rows), "files": [j, png]}
