"""Per-token expert diversity (paper, App. A.6, Fig. 15).

For every vocabulary item ``v`` (the token at the position being routed) and layer application ``i``:
``distinct[v][i]`` = the number of distinct experts ever selected for occurrences of ``v`` in application
``i``. For the shared layer ``g`` of ``i``, ``union[v][g]`` = the number of distinct experts ``v`` used in
any repeat of ``g``, and ``ratio[v][i] = distinct[v][i] / union[v][g]``. A ratio of 1 would mean that the
token uses the same experts at every depth; the paper finds small ratios (different experts per depth,
context-dependent). The plot shows the ratio for the ``top_n`` most frequent tokens (6000 in the paper),
ordered by frequency, one line (running mean) per application. Rare tokens have few occurrences and so
trivially few distinct experts: read the curve with the token frequencies (in the JSON) in mind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moeut.analysis.common import forward_analysis, layer_of_application, n_experts_of, require_routing, routing_indices
from moeut.fileio import atomic_write_json
from moeut.report import format_table, pyplot, save_figure
from moeut.run import LoadedRun
from moeut.runtime import progress


class DiversityAccumulator:
    def __init__(self, cfg: Any, kind: str = "ffn"):
        self.cfg, self.kind = cfg, kind
        self.n_experts = n_experts_of(cfg, kind)
        self.used = torch.zeros(cfg.vocab_size, cfg.n_layers, self.n_experts, dtype=torch.bool)
        self.freq = torch.zeros(cfg.vocab_size, dtype=torch.long)

    def update(self, tokens: torch.Tensor, routing: Sequence[Any]) -> None:
        tok = tokens.reshape(-1).cpu()
        self.freq += torch.bincount(tok, minlength=self.cfg.vocab_size)
        for i, lr in enumerate(routing):
            idx = routing_indices(lr, self.kind).cpu()  # [N·(H), k]
            rows_per_tok = idx.shape[0] // tok.numel()
            t = tok.repeat_interleave(rows_per_tok)  # attention rows are (token, head) in that order
            self.used[t.unsqueeze(-1).expand_as(idx), i, idx] = True

    def result(self, name: str, top_n: int = 6000) -> "TokenDiversityResult":
        cfg = self.cfg
        distinct = self.used.sum(-1)  # [V, n]
        layer = [layer_of_application(cfg, i) for i in range(cfg.n_layers)]
        union = torch.stack([self.used[:, [i for i in range(cfg.n_layers) if layer[i] == g]].any(1).sum(-1)
                             for g in range(cfg.group_size)], 1)  # [V, G]
        union_per_app = union[:, layer]
        ratio = distinct.double() / union_per_app.clamp_min(1).double()
        seen = self.freq > 0
        order = torch.argsort(self.freq, descending=True, stable=True)
        order = order[seen[order]]
        top = order[:top_n]
        seen_ids = order  # every token seen, by frequency
        summary = []
        for i in range(cfg.n_layers):
            summary.append({"application": i, "layer": layer[i],
                            "distinct_all": distinct[seen_ids, i].double().mean().item() if len(seen_ids) else float("nan"),
                            "distinct_top": distinct[top, i].double().mean().item() if len(top) else float("nan"),
                            "ratio_top": ratio[top, i].mean().item() if len(top) else float("nan"),
                            "union_top": union_per_app[top, i].double().mean().item() if len(top) else float("nan")})
        return TokenDiversityResult(
            name=name, kind=self.kind, n_experts=self.n_experts, tokens=int(self.freq.sum()),
            vocab_seen=int(seen.sum()), top_n=len(top), min_freq_top=int(self.freq[top[-1]]) if len(top) else 0,
            summary=summary, token_ids=seen_ids.tolist(), token_freq=self.freq[seen_ids].tolist(),
            distinct=distinct[seen_ids].tolist(), ratio=ratio[seen_ids].tolist(), shared_layer=layer)


@dataclass
class TokenDiversityResult:
    name: str
    kind: str
    n_experts: int
    tokens: int  # routed positions
    vocab_seen: int
    top_n: int  # tokens in the "top" statistics (the most frequent)
    min_freq_top: int  # occurrences of the rarest token among them
    summary: list[dict[str, Any]]  # per application
    token_ids: list[int]  # every token seen, most frequent first
    token_freq: list[int]
    distinct: list[list[int]]  # [seen tokens][application]
    ratio: list[list[float]]  # [seen tokens][application]
    shared_layer: list[int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [[f"{s['application']} (L{s['layer']})", s["distinct_all"], s["distinct_top"], s["union_top"],
                 s["ratio_top"]] for s in self.summary]
        head = (f"{self.tokens:,} routed tokens, {self.vocab_seen} distinct tokens; 'top' = the {self.top_n} most "
                f"frequent (each seen ≥ {self.min_freq_top}×); {self.kind} experts: {self.n_experts}")
        return head + "\n" + format_table(
            ["application", "distinct (all)", "distinct (top)", "all repeats (top)", "ratio (top)"], rows, ".2f")


def token_diversity(model: torch.nn.Module, batches: Sequence[torch.Tensor], *, kind: str = "ffn", top_n: int = 6000,
                    name: str = "model", show_progress: bool = False) -> TokenDiversityResult:
    acc = DiversityAccumulator(model.cfg, kind)
    for tokens in progress(batches, total=len(batches), desc=f"token-diversity {name}", enabled=show_progress):
        acc.update(tokens, require_routing(forward_analysis(model, tokens, routing=True), "token-diversity"))
    return acc.result(name, top_n)


def _running_mean(x: torch.Tensor, w: int) -> torch.Tensor:
    if len(x) < w or w <= 1:
        return x
    c = torch.cumsum(torch.cat([torch.zeros(1, dtype=x.dtype), x]), 0)
    return (c[w:] - c[:-w]) / w


def plot(result: TokenDiversityResult, path: str | Path) -> Path:
    plt = pyplot()
    n = result.top_n
    ratio = torch.tensor(result.ratio[:n], dtype=torch.float64).reshape(n, -1)
    distinct = torch.tensor(result.distinct[:n], dtype=torch.float64).reshape(n, -1)
    w = max(1, n // 50)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i in range(ratio.shape[1]):
        xs = range(w - 1, n) if n >= w else range(n)
        axes[0].plot(list(xs), _running_mean(ratio[:, i], w).tolist(), label=f"app {i} (L{result.shared_layer[i]})",
                     lw=1)
        axes[1].plot(list(xs), _running_mean(distinct[:, i], w).tolist(), lw=1)
    axes[0].set_title(f"distinct experts in one application / in all repeats (running mean of {w})")
    axes[0].set_ylabel("ratio")
    axes[0].set_ylim(0, 1.05)
    axes[1].set_title(f"distinct {result.kind} experts per token and application")
    axes[1].set_ylabel("experts")
    for ax in axes:
        ax.set_xlabel("token (most frequent first)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{result.name}: per-token expert diversity, top {n} tokens", fontsize=9)
    return save_figure(fig, path)


def run(loaded: LoadedRun, batches: Sequence[torch.Tensor], out: str | Path, kind: str = "ffn", top_n: int = 6000,
        show_progress: bool = True) -> dict[str, Any]:
    res = token_diversity(loaded.model, batches, kind=kind, top_n=top_n, name=loaded.name, show_progress=show_progress)
    out = Path(out)
    j = atomic_write_json(out / f"token_diversity_{kind}.json", {"analysis": "token-diversity", **res.to_json()})
    png = plot(res, out / f"token_diversity_{kind}.png")
    return {"result": res, "table": res.table(), "files": [j, png]}
