"""Residual-norm growth (paper, App. A.2): for each layer application, the mean L2 norm of the residual
stream entering it, ‖x_in‖, and of the update it adds, ‖x_out − x_in‖ (means over tokens).

A pre-LN transformer has to grow its updates with depth to be heard over an ever larger residual; MoEUT's
peri-LN lets shared layers work at any depth. ``x_in`` of application 0 is the embedding; the last
residual entry (application ``n_layers``) is the stream before the output LayerNorm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeut.analysis.common import AnalysisError, forward_analysis, layer_of_application
from moeut.fileio import atomic_write_json
from moeut.model.residual_norm import residual_norm_stats
from moeut.report import format_table, pyplot, save_figure
from moeut.run import LoadedRun
from moeut.runtime import progress


@dataclass
class ResidualNormResult:
    name: str
    arch: str
    tokens: int
    residual_norm: list[float]  # n_layers + 1: entering each application, then the final stream
    update_norm: list[float]  # n_layers: ‖x_out − x_in‖ of each application
    relative_update: list[float]  # n_layers: mean over tokens of ‖x_out − x_in‖ / ‖x_in‖
    shared_layer: list[int] = field(default_factory=list)  # the shared layer each application uses

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ResidualNormAccumulator:
    def __init__(self, n_layers: int):
        self.res = torch.zeros(n_layers + 1, dtype=torch.float64)
        self.upd = torch.zeros(n_layers, dtype=torch.float64)
        self.rel = torch.zeros(n_layers, dtype=torch.float64)
        self.tokens = 0

    def update(self, hidden_states: Sequence[torch.Tensor]) -> None:
        if len(hidden_states) != len(self.res):
            raise AnalysisError(f"expected {len(self.res)} hidden states, got {len(hidden_states)}")
        res, upd = residual_norm_stats(hidden_states)
        self.res += res.cpu()
        self.upd += upd.cpu()
        hs = [h.detach().float() for h in hidden_states]
        for i in range(len(self.upd)):
            self.rel[i] += ((hs[i + 1] - hs[i]).norm(dim=-1) / hs[i].norm(dim=-1).clamp_min(1e-12)).double().sum().cpu()
        self.tokens += hidden_states[0].shape[:-1].numel()

    def result(self, name: str, cfg: Any) -> ResidualNormResult:
        n = max(self.tokens, 1)
        return ResidualNormResult(name=name, arch=getattr(cfg, "arch", "?"), tokens=self.tokens,
                                  residual_norm=(self.res / n).tolist(), update_norm=(self.upd / n).tolist(),
                                  relative_update=(self.rel / n).tolist(),
                                  shared_layer=[layer_of_application(cfg, i) for i in range(cfg.n_layers)])


def residual_norms(model: torch.nn.Module, batches: Sequence[torch.Tensor], *, name: str = "model",
                   show_progress: bool = False) -> ResidualNormResult:
    """Mean residual and update norms of every layer application over ``batches`` (token ids ``[B, T]``)."""
    acc = ResidualNormAccumulator(model.cfg.n_layers)
    for tokens in progress(batches, total=len(batches), desc=f"residual-norm {name}", enabled=show_progress):
        out = forward_analysis(model, tokens, hidden=True)
        if out.hidden_states is None:
            raise AnalysisError(f"{name}: the model does not return hidden states (output_hidden_states)")
        acc.update(out.hidden_states)
    return acc.result(name, model.cfg)


def table(results: Sequence[ResidualNormResult]) -> str:
    n = max(len(r.update_norm) for r in results)
    headers = ["application"]
    for r in results:
        headers += [f"{r.name} ‖x_in‖", f"{r.name} ‖Δ‖", f"{r.name} ‖Δ‖/‖x‖"]
    rows = []
    for i in range(n + 1):
        row: list[Any] = [str(i) if i < n else "final"]
        for r in results:
            k = len(r.update_norm)
            if i < k:
                row += [r.residual_norm[i], r.update_norm[i], r.relative_update[i]]
            elif i == n:
                row += [r.residual_norm[k], None, None]
            else:
                row += [None, None, None]
        rows.append(row)
    return format_table(headers, rows)


def plot(results: Sequence[ResidualNormResult], path: str | Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for r in results:
        label = f"{r.name} ({r.arch})"
        axes[0].plot(range(len(r.residual_norm)), r.residual_norm, marker="o", label=label)
        axes[1].plot(range(len(r.update_norm)), r.update_norm, marker="o", label=label)
        axes[2].plot(range(len(r.relative_update)), r.relative_update, marker="o", label=label)
    axes[0].set_title("residual norm ‖x_in‖ entering each application")
    axes[1].set_title("update norm ‖x_out − x_in‖")
    axes[2].set_title("relative update ‖Δ‖ / ‖x_in‖")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("layer application")
        ax.set_yscale("log")  # norms of MoEUT and a pre-LN model differ by orders of magnitude
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("mean L2 norm (log scale)")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def run(models: Sequence[LoadedRun], batches_of: Any, out: str | Path, show_progress: bool = True
        ) -> dict[str, Any]:
    """The CLI's work: one result per model (``batches_of(loaded)`` gives its batches), table, JSON, PNG."""
    results = [residual_norms(m.model, batches_of(m), name=m.name, show_progress=show_progress) for m in models]
    out = Path(out)
    text = table(results)
    atomic_write_json(out / "residual_norm.json", {"analysis": "residual-norm", "results": [r.to_json() for r in results]})
    png = plot(results, out / "residual_norm.png")
    return {"results": results, "table": text, "files": [out / "residual_norm.json", png]}
