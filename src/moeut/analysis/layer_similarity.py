"""Layer similarity of expert selections: per token, the set of experts a shared layer selects in each of
its repeats, and the mean intersection-over-union of those sets between every pair of repeats.

``iou[g][r1][r2] = mean over tokens of |S_r1 ∩ S_r2| / |S_r1 ∪ S_r2|`` where ``S_r`` is the set of experts
shared layer ``g`` picked for the token in repeat ``r`` (attention: per token and head). The diagonal is 1.
For scale, two independent uniformly random K-subsets of N experts have the expected IoU printed as
``random`` (hypergeometric overlap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moeut.analysis.common import accumulate, applications_of_layer, n_experts_of, routing_indices
from moeut.fileio import atomic_write_json
from moeut.report import format_table, pyplot
from moeut.run import LoadedRun


def random_iou(n_experts: int, k: int) -> float:
    """Expected IoU of two independent uniformly random k-subsets of n experts."""
    total = math.comb(n_experts, k)
    exp = 0.0
    for x in range(max(0, 2 * k - n_experts), k + 1):
        p = math.comb(k, x) * math.comb(n_experts - k, k - x) / total
        exp += p * x / (2 * k - x)
    return exp


def selection_sets(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``[N, k]`` expert ids → ``[N, n_experts]`` boolean membership."""
    m = torch.zeros(indices.shape[0], n_experts, dtype=torch.bool, device=indices.device)
    return m.scatter_(1, indices, True)


def pairwise_iou_sum(sets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over rows of IoU between every pair of the given ``[N, E]`` membership matrices → ``[R, R]``."""
    R = len(sets)
    out = torch.zeros(R, R, dtype=torch.float64)
    sizes = [s.sum(-1) for s in sets]
    for a in range(R):
        for b in range(a, R):
            inter = (sets[a] & sets[b]).sum(-1)
            union = sizes[a] + sizes[b] - inter
            iou = torch.where(union > 0, inter.double() / union.clamp_min(1).double(), torch.ones_like(inter, dtype=torch.float64))
            out[a, b] = out[b, a] = iou.sum().cpu()
    return out


class SimilarityAccumulator:
    def __init__(self, cfg: Any, kind: str = "ffn"):
        self.cfg, self.kind = cfg, kind
        self.n_experts = n_experts_of(cfg, kind)
        self.sums = torch.zeros(cfg.group_size, cfg.n_repeats, cfg.n_repeats, dtype=torch.float64)
        self.rows = 0
        self.k = None

    def update(self, routing: Sequence[Any]) -> None:
        n = None
        for g in range(self.cfg.group_size):
            apps = applications_of_layer(self.cfg, g)
            idx = [routing_indices(routing[i], self.kind) for i in apps]
            self.k = idx[0].shape[-1]
            self.sums[g] += pairwise_iou_sum([selection_sets(x, self.n_experts) for x in idx])
            n = idx[0].shape[0]
        self.rows += n

    def result(self, name: str) -> "LayerSimilarityResult":
        iou = self.sums / max(self.rows, 1)
        G, R, _ = iou.shape
        off = [(iou[g].sum() - iou[g].diagonal().sum()).item() / (R * (R - 1)) if R > 1 else float("nan")
               for g in range(G)]
        adjacent = [iou[g].diagonal(1).mean().item() if R > 1 else float("nan") for g in range(G)]
        return LayerSimilarityResult(name=name, kind=self.kind, rows=self.rows, iou=iou.tolist(),
                                     mean_offdiag_iou=off, mean_adjacent_iou=adjacent,
                                     random_iou=random_iou(self.n_experts, self.k or 1), k=self.k or 0,
                                     n_experts=self.n_experts)


@dataclass
class LayerSimilarityResult:
    name: str
    kind: str
    rows: int  # tokens (× heads for attention) averaged over
    iou: list[list[list[float]]]  # [G][R][R]
    mean_offdiag_iou: list[float]  # [G] mean over pairs of different repeats
    mean_adjacent_iou: list[float]  # [G] mean over consecutive repeats (r, r+1)
    random_iou: float  # expected IoU of two random K-subsets
    k: int
    n_experts: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        G, R = len(self.iou), len(self.iou[0])
        parts = []
        for g in range(G):
            rows = [[f"L{g} r{a}"] + [self.iou[g][a][b] for b in range(R)] for a in range(R)]
            parts.append(format_table([f"IoU layer {g}"] + [f"r{b}" for b in range(R)], rows))
        parts.append(format_table(["layer", "mean IoU (r≠r')", "adjacent repeats", f"random K={self.k} of {self.n_experts}"],
                                  [[f"L{g}", self.mean_offdiag_iou[g], self.mean_adjacent_iou[g], self.random_iou]
                                   for g in range(G)]))
        return "\n\n".join(parts)


def layer_similarity(model: torch.nn.Module, batches: Sequence[torch.Tensor], *, kind: str = "ffn",
                     name: str = "model", show_progress: bool = False) -> LayerSimilarityResult:
    acc = accumulate(SimilarityAccumulator(model.cfg, kind), model, batches, f"layer-similarity {name}", show_progress)
    return acc.result(name)


def plot(result: LayerSimilarityResult, path: str | Path) -> Path:
    plt = pyplot()
    G, R = len(result.iou), len(result.iou[0])
    fig, axes = plt.subplots(1, G, figsize=(1.5 + 3.2 * G, 3.4), squeeze=False)
    for g in range(G):
        ax = axes[0][g]
        im = ax.imshow(result.iou[g], vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        for a in range(R):
            for b in range(R):
                if R <= 12:
                    v = result.iou[g][a][b]
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 else "white")
        ax.set_title(f"layer {g}: {result.kind} selection IoU")
        ax.set_xlabel("repeat")
        ax.set_ylabel("repeat")
        ax.set_xticks(range(R))
        ax.set_yticks(range(R))
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    fig.suptitle(f"{result.name} (random K-subsets: IoU {result.random_iou:.3f})", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def run(loaded: LoadedRun, batches: Sequence[torch.Tensor], out: str | Path, kind: str = "ffn",
        show_progress: bool = True) -> dict[str, Any]:
    res = layer_similarity(loaded.model, batches, kind=kind, name=loaded.name, show_progress=show_progress)
    out = Path(out)
    j = atomic_write_json(out / f"layer_similarity_{kind}.json", {"analysis": "layer-similarity", **res.to_json()})
    png = plot(res, out / f"layer_similarity_{kind}.png")
    return {"result": res, "table": res.table(), "files": [j, png]}
