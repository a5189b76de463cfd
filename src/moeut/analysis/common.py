"""What every analysis shares: loading a run, turning DATA into token batches, the layer an application
uses, a forward pass that keeps the residual stream and the routing, tables, JSON and plots.

Nothing here imports matplotlib at module level: :func:`pyplot` loads it (Agg backend) when a plot is drawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

INSTALL_HINT = "pip install 'moeut[analysis]'"


class AnalysisError(ValueError):
    """An analysis cannot run on this input; the message names the input and the fix."""


# ----------------------------------------------------------------------------- layers and repeats
def layer_of_application(cfg: Any, i: int) -> int:
    """The shared layer that layer application ``i`` uses.

    Order ``"abab"`` (the paper's default, A B A B …): ``i % G``. Order ``"aabb"`` (A A … B B …):
    ``i // (n_layers / G)``. Configs without a ``group_order`` field use ``"abab"``.
    """
    order = getattr(cfg, "group_order", "abab")
    G, n = cfg.group_size, cfg.n_layers
    if not 0 <= i < n:
        raise IndexError(f"layer application {i} out of range for n_layers={n}")
    if order == "aabb":
        return i // (n // G)
    return i % G


def repeat_of_application(cfg: Any, i: int) -> int:
    """Which repeat (0 … n_layers/G − 1) of its shared layer application ``i`` is."""
    order = getattr(cfg, "group_order", "abab")
    G, n = cfg.group_size, cfg.n_layers
    if order == "aabb":
        return i % (n // G)
    return i // G


def applications_of_layer(cfg: Any, g: int) -> list[int]:
    """The applications of shared layer ``g``, in repeat order."""
    apps = [i for i in range(cfg.n_layers) if layer_of_application(cfg, i) == g]
    return sorted(apps, key=lambda i: repeat_of_application(cfg, i))


# ----------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    model: torch.nn.Module
    encoder: Any  # moeut.eval.encoding.SentencePieceEncoder, or None when no tokenizer was found
    run_dir: Path | None
    name: str  # a short label (the run directory's name)

    @property
    def cfg(self) -> Any:
        return self.model.cfg


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_analysis(checkpoint: str | Path, device: str | None = "auto", backend: str | None = None) -> LoadedModel:
    """The model of a run directory or checkpoint file, in eval mode, with the run's tokenizer when present."""
    from moeut.eval.cli import run_dir_of
    from moeut.train import load_model

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist (give a run directory written by "
                                "`moeut train` or a checkpoint file)")
    dev = resolve_device(device)
    model = load_model(path, map_location="cpu", backend=backend).to(dev).eval()
    run = run_dir_of(path)
    encoder = None
    if (run / "tokenizer.model").exists():
        from moeut.eval.encoding import SentencePieceEncoder

        encoder = SentencePieceEncoder.load(run)
    return LoadedModel(model=model, encoder=encoder, run_dir=run, name=run.name if run.is_dir() else path.stem)


# -------------------------------------------------------------------------------------- data
def open_tokens(data: Sequence[str | Path] | str | Path, encoder: Any = None, tokenizer_sha256: str | None = None):
    """DATA as one token stream: a ``moeut prepare`` directory (its ``val`` split), a split directory,
    or one or more text files (tokenised with the run's tokenizer, joined with EOS)."""
    from moeut.eval.perplexity import TokenArray, open_ppl_data

    paths = [Path(data)] if isinstance(data, (str, Path)) else [Path(p) for p in data]
    if not paths:
        raise AnalysisError("--data is required: a directory written by `moeut prepare` or text files")
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"--data {p} does not exist (give a directory written by `moeut prepare`, "
                                    "its val/ split, or text files)")
        if p.is_file() and encoder is None:
            raise AnalysisError(f"--data {p} is a text file but the checkpoint's run directory has no "
                                "tokenizer.model to tokenise it; pass prepared shards instead")
    if len(paths) == 1:
        return open_ppl_data(paths[0], encoder, tokenizer_sha256)
    if any(p.is_dir() for p in paths):
        raise AnalysisError("give either one shard directory or one or more text files as --data, not a mix")
    ids: list[int] = []
    for p in paths:
        ids += encoder.encode_context(p.read_text(encoding="utf-8")) + [encoder.eos_id]
    return TokenArray(ids)


def token_batches(dataset: Any, seq_len: int, batch_size: int = 8, *, max_batches: int | None = None,
                  max_tokens: int | None = None) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows ``[b, seq_len]`` of ``dataset`` (the first of them), limited by
    ``max_batches`` and/or ``max_tokens`` (whichever is reached first)."""
    from moeut.data import EvalWindows

    if seq_len <= 0 or batch_size <= 0:
        raise AnalysisError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    out: list[torch.Tensor] = []
    n_tok = 0
    # windows of seq_len + 1 as everywhere else; the analyses read the first seq_len tokens of each
    for batch in EvalWindows(dataset, batch_size, seq_len):
        batch = batch[:, :-1]
        if max_tokens is not None:
            rows = max(0, math.ceil((max_tokens - n_tok) / seq_len))
            batch = batch[:rows]
            if batch.shape[0] == 0:
                break
        out.append(batch)
        n_tok += batch.numel()
        if max_batches is not None and len(out) >= max_batches:
            break
    if not out:
        raise AnalysisError(f"the data holds {dataset.num_tokens} tokens, less than one window of {seq_len + 1}; "
                            "give more text or a smaller --seq-len")
    return out


def model_batches(loaded: LoadedModel, data, *, seq_len: int | None = None, batch_size: int = 8,
                  max_batches: int | None = 8, max_tokens: int | None = None) -> list[torch.Tensor]:
    sha = loaded.encoder.tokenizer.sha256 if loaded.encoder is not None else None
    ds = open_tokens(data, loaded.encoder, sha)
    vocab = loaded.cfg.vocab_size
    if getattr(ds, "vocab_size", vocab) > vocab:
        raise AnalysisError(f"the data's vocabulary ({ds.vocab_size}) is larger than the model's ({vocab})")
    return token_batches(ds, seq_len or loaded.cfg.context_length, batch_size, max_batches=max_batches,
                         max_tokens=max_tokens)


def progress(it: Iterable, total: int | None, desc: str, enabled: bool = True) -> Iterable:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, dynamic_ncols=True)


@torch.no_grad()
def forward_analysis(model: torch.nn.Module, tokens: torch.Tensor, *, hidden: bool = False, routing: bool = False):
    """One forward pass that returns the residual stream and/or the per-application routing."""
    device = next(model.parameters()).device
    return model(tokens.to(device), output_hidden_states=hidden, output_routing=routing)


def require_routing(out: Any, what: str) -> list:
    routing = getattr(out, "routing", None)
    if routing is None or any(r is None or not hasattr(r, "ffn") for r in routing):
        raise AnalysisError(f"{what} needs a model with expert routing in every layer (MoEUT or σ-MoE); this "
                            "checkpoint's layers do not route (a dense model?)")
    return routing


def routing_indices(layer_routing: Any, kind: str) -> torch.Tensor:
    """Selected expert ids of one application as ``[N, k]``: tokens (× heads for attention) as rows; attention
    expert ids are made unique across heads (head h's expert e → h·N_A + e)."""
    r = getattr(layer_routing, kind)
    idx = r.indices
    if idx.dim() == 4:  # attention [B, T, H, k]
        n_exp = r.logits.shape[-1]
        idx = idx + torch.arange(idx.shape[2], device=idx.device).view(1, 1, -1, 1) * n_exp
        return idx.reshape(-1, idx.shape[-1])
    return idx.reshape(-1, idx.shape[-1])


def n_experts_of(cfg: Any, kind: str) -> int:
    if kind == "ffn":
        return cfg.ff_n_experts
    if kind in ("att_v", "att_o"):
        return cfg.n_heads * cfg.att_n_experts
    raise AnalysisError(f"unknown expert kind {kind!r}: choose ffn, att_v or att_o")


# ---------------------------------------------------------------------------- output helpers
def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], floatfmt: str = ".3f") -> str:
    """Plain aligned text: first column left-aligned, the others right-aligned."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return format(v, floatfmt)
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[j]) for r in body)) if body else len(h) for j, h in enumerate(headers)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return to_jsonable(x.tolist())
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.floating,)):
        x = float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    tmp.replace(path)
    return path


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (the 'analysis' extra)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"the plots need matplotlib: {INSTALL_HINT} (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path



def accumulate(acc, model, batches, label: str, show_progress: bool):
    """Feed every batch's routing to an accumulator (``acc.update(routing)``) and return ``acc``."""
    for tokens in progress(batches, len(batches), label, show_progress):
        acc.update(require_routing(forward_analysis(model, tokens, routing=True), label.split()[0]))
    return acc
