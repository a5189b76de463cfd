"""Depth chosen at inference: validation perplexity when the G shared layers are applied R times, for
R = 1 … 2 × the trained n_layers/G (a universal transformer's depth is a free parameter once trained).

Every R scores the same windows with :func:`moeut.model.perplexity.window_nll`; the model's own weights and
KV layout are unchanged (``repeats`` is a forward argument). For ``group_order="aabb"`` R means each distinct
layer is applied R times in a row (A…A B…B), see :meth:`moeut.model.ModelConfig.layer_index`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moeut.analysis.common import AnalysisError
from moeut.fileio import atomic_write_json
from moeut.model.perplexity import window_nll
from moeut.report import format_table, pyplot, save_figure
from moeut.run import LoadedRun
from moeut.runtime import progress

JSON_NAME = "depth.json"
PNG_NAME = "depth.png"


@dataclass
class DepthPoint:
    repeats: int  # R: applications of the group of G shared layers
    applications: int  # R·G layer applications
    nll: float  # mean next-token NLL, nats
    ppl: float
    tokens: int


@dataclass
class DepthResult:
    name: str
    arch: str
    group_size: int
    trained_repeats: int
    points: list[DepthPoint]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def point(self, repeats: int) -> DepthPoint:
        return next(p for p in self.points if p.repeats == repeats)


def depth_curve(model: torch.nn.Module, batches: Sequence[torch.Tensor], repeats: Sequence[int], *,
                name: str = "model", trained_repeats: int | None = None, show_progress: bool = False) -> DepthResult:
    """Perplexity of ``batches`` (windows ``[B, T+1]``) for each R in ``repeats``."""
    cfg = model.cfg
    if cfg.arch == "dense":
        raise AnalysisError(f"{name}: the dense baseline shares no layers, so its depth cannot change; "
                            "run `analyze depth` on a MoEUT or SUT model")
    points = []
    for r in progress(list(repeats), total=len(repeats), desc=f"depth {name}", enabled=show_progress):
        tot = window_nll(model, batches, repeats=r)
        points.append(DepthPoint(repeats=r, applications=cfg.applications(r), nll=tot.nll / tot.tokens,
                                 ppl=tot.ppl, tokens=tot.tokens))
    return DepthResult(name=name, arch=cfg.arch, group_size=cfg.group_size,
                       trained_repeats=trained_repeats or cfg.n_repeats, points=points)


def table(res: DepthResult) -> str:
    base = next((p for p in res.points if p.repeats == res.trained_repeats), None)
    rows = []
    for p in res.points:
        mark = " (trained)" if p.repeats == res.trained_repeats else ""
        rel = None if base is None else p.ppl / base.ppl - 1
        rows.append([f"{p.repeats}{mark}", p.applications, p.ppl, p.nll, None if rel is None else f"{100 * rel:+.1f}%"])
    return format_table(["R", "applications", "ppl", "nll/token", "vs trained"], rows)


def plot(res: DepthResult, path: str | Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([p.repeats for p in res.points], [p.ppl for p in res.points], marker="o", label=f"{res.name} ({res.arch})")
    ax.axvline(res.trained_repeats, color="grey", linestyle="--", label=f"trained R = {res.trained_repeats}")
    ax.set_xlabel(f"R: repeats of the group of G = {res.group_size} shared layers")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_xticks([p.repeats for p in res.points])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("depth at inference")
    return save_figure(fig, path)


def run(loaded: LoadedRun, batches: Sequence[torch.Tensor], out: str | Path, *, max_repeats: int | None = None,
        show_progress: bool = True) -> dict[str, Any]:
    """The CLI's work: R = 1 … ``max_repeats`` (default 2 × trained), table, JSON, PNG."""
    trained = loaded.trained_repeats or loaded.config.n_repeats
    top = max_repeats or 2 * trained
    if top < 1:
        raise AnalysisError(f"--max-repeats must be at least 1, got {top}")
    res = depth_curve(loaded.model, batches, range(1, top + 1), name=loaded.name, trained_repeats=trained,
                      show_progress=show_progress)
    out = Path(out)
    atomic_write_json(out / JSON_NAME, {"analysis": "depth", "result": res.to_json()})
    png = plot(res, out / PNG_NAME)
    return {"result": res, "table": table(res), "files": [out / JSON_NAME, png]}
