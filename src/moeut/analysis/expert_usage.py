"""Expert usage per layer (paper, Sec. 4 and App. A.6): for each shared expert module, how often each
expert is selected in each repeat of that layer.

``counts[g][r][e]``: selections of expert ``e`` of shared layer ``g`` in its repeat ``r`` (one selection per
token and chosen slot, so every repeat has ``tokens·K`` selections; attention: ``tokens·H·K_A``, expert ids
of head ``h`` offset by ``h·N_A``). The heat map normalises each expert's column over the repeats
(``share[r][e] = counts[r][e] / Σ_r counts[r][e]``) and sorts the experts by their mean repeat
``Σ_r r·share[r][e]``: a diagonal band means experts specialise to depths, a flat picture that every
expert serves every depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moeut.analysis.common import accumulate, layer_of_application, n_experts_of, repeat_of_application, routing_indices
from moeut.fileio import atomic_write_json
from moeut.report import format_table, pyplot, save_figure
from moeut.run import LoadedRun


class UsageAccumulator:
    def __init__(self, cfg: Any, kind: str = "ffn"):
        self.cfg, self.kind = cfg, kind
        self.n_experts = n_experts_of(cfg, kind)
        self.counts = torch.zeros(cfg.group_size, cfg.n_repeats, self.n_experts, dtype=torch.long)
        self.tokens = 0

    def update(self, routing: Sequence[Any]) -> None:
        for i, lr in enumerate(routing):
            idx = routing_indices(lr, self.kind).reshape(-1).cpu()
            g, r = layer_of_application(self.cfg, i), repeat_of_application(self.cfg, i)
            self.counts[g, r] += torch.bincount(idx, minlength=self.n_experts)
        self.tokens += routing[0].ffn.indices.shape[:-1].numel()

    def result(self, name: str) -> "ExpertUsageResult":
        return ExpertUsageResult.from_counts(name, self.kind, self.counts, self.tokens)


@dataclass
class ExpertUsageResult:
    name: str
    kind: str
    tokens: int
    counts: list[list[list[int]]]  # [G][R][E]
    share: list[list[list[float]]]  # [G][R][E] each expert's column normalised over the repeats
    expert_order: list[list[int]]  # [G][E] experts sorted by their mean repeat
    mean_repeat: list[list[float]]  # [G][E] Σ_r r·share[r][e] (NaN for experts never selected)
    summary: list[dict[str, Any]]  # one row per (layer, repeat)
    specialisation: list[float]  # [G] mean over used experts of max_r share[r][e] (1/R = no specialisation)

    @classmethod
    def from_counts(cls, name: str, kind: str, counts: torch.Tensor, tokens: int) -> "ExpertUsageResult":
        c = counts.double()
        G, R, E = c.shape
        total = c.sum(1, keepdim=True)  # [G, 1, E]
        share = torch.where(total > 0, c / total.clamp_min(1), torch.zeros_like(c))
        reps = torch.arange(R, dtype=torch.float64).view(1, R, 1)
        mean_rep = torch.where(total[:, 0] > 0, (share * reps).sum(1), torch.full((G, E), float("nan")))
        order = [sorted(range(E), key=lambda e, g=g: (math.inf if math.isnan(mean_rep[g, e]) else mean_rep[g, e], e))
                 for g in range(G)]
        rows = []
        for g in range(G):
            for r in range(R):
                row_c = c[g, r]
                n_sel = row_c.sum().item()
                p = row_c / max(n_sel, 1)
                ent = -(p * p.clamp_min(1e-30).log()).sum().item() / math.log(E) if E > 1 else 1.0
                rows.append({"layer": g, "repeat": r, "selections": int(n_sel), "used_experts": int((row_c > 0).sum()),
                             "n_experts": E, "usage_entropy": ent, "top_share": p.max().item(),
                             "majority_experts": int((share[g, r] > 0.5).sum())})
        used = total[:, 0] > 0
        spec = [(share[g].max(0).values[used[g]].mean().item() if used[g].any() else float("nan")) for g in range(G)]
        return cls(name=name, kind=kind, tokens=tokens, counts=counts.tolist(), share=share.tolist(),
                   expert_order=order, mean_repeat=mean_rep.tolist(), summary=rows, specialisation=spec)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        headers = ["layer/repeat", "selections", "used experts", "usage entropy", "top share", "experts >50% here"]
        rows = [[f"L{s['layer']} r{s['repeat']}", s["selections"], f"{s['used_experts']}/{s['n_experts']}",
                 s["usage_entropy"], s["top_share"], s["majority_experts"]] for s in self.summary]
        spec = ", ".join(f"L{g} {v:.3f}" for g, v in enumerate(self.specialisation))
        R = len(self.counts[0])
        return (format_table(headers, rows) + f"\nspecialisation (mean max-repeat share of each used expert; "
                f"1/R = {1 / R:.3f} is uniform): {spec}")


def expert_usage(model: torch.nn.Module, batches: Sequence[torch.Tensor], *, kind: str = "ffn",
                 name: str = "model", show_progress: bool = False) -> ExpertUsageResult:
    acc = accumulate(UsageAccumulator(model.cfg, kind), model, batches, f"expert-usage {name}", show_progress)
    return acc.result(name)


def plot(result: ExpertUsageResult, path: str | Path) -> Path:
    plt = pyplot()
    G = len(result.counts)
    R = len(result.counts[0])
    fig, axes = plt.subplots(G, 1, figsize=(10, 0.5 + max(1.4, 0.45 * R) * G), squeeze=False)
    for g in range(G):
        ax = axes[g][0]
        share = torch.tensor(result.share[g])[:, result.expert_order[g]]
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(f"layer {g}\nrepeat")
        ax.set_yticks(range(R))
        ax.set_xlabel("expert (sorted by mean repeat)")
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="share")
    axes[0][0].set_title(f"{result.name}: share of each {result.kind} expert's selections per repeat "
                         f"({result.tokens:,} tokens)")
    return save_figure(fig, path)


def run(loaded: LoadedRun, batches: Sequence[torch.Tensor], out: str | Path, kind: str = "ffn",
        show_progress: bool = True) -> dict[str, Any]:
    res = expert_usage(loaded.model, batches, kind=kind, name=loaded.name, show_progress=show_progress)
    out = Path(out)
    j = atomic_write_json(out / f"expert_usage_{kind}.json", {"analysis": "expert-usage", **res.to_json()})
    png = plot(res, out / f"expert_usage_{kind}.png")
    return {"result": res, "table": res.table(), "files": [j, png]}
