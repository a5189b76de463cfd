"""What every analysis shares: turning DATA into token batches, the layer an application uses, a forward
pass that keeps the residual stream and the routing. Runs are loaded with :func:`moeut.run.load_run`;
tables and plots come from :mod:`moeut.report`, JSON from :mod:`moeut.fileio`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moeut.data import EvalWindows, TokenArray, Tokenizer, open_token_stream
from moeut.errors import MoeutError
from moeut.run import LoadedRun
from moeut.runtime import progress

__all__ = ["AnalysisError", "layer_of_application", "repeat_of_application", "applications_of_layer", "open_tokens",
           "token_batches", "model_batches", "forward_analysis", "require_routing", "routing_indices", "n_experts_of",
           "accumulate"]


class AnalysisError(MoeutError, ValueError):
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


# -------------------------------------------------------------------------------------- data
def open_tokens(data: Sequence[str | Path] | str | Path, tokenizer: Tokenizer | None = None,
                tokenizer_sha256: str | None = None):
    """DATA as one token stream: a ``moeut prepare`` directory (its ``val`` split), a split directory,
    or one or more text files (tokenised with the run's tokenizer, joined with EOS)."""
    paths = [Path(data)] if isinstance(data, (str, Path)) else [Path(p) for p in data]
    if not paths:
        raise AnalysisError("--data is required: a directory written by `moeut prepare` or text files")
    encode = tokenizer.encode if tokenizer is not None else None
    if len(paths) == 1:
        return open_token_stream(paths[0], encode, tokenizer_sha256)
    if any(p.is_dir() for p in paths):
        raise AnalysisError("give either one shard directory or one or more text files as --data, not a mix")
    ids: list[int] = []
    for p in paths:
        ids += list(open_token_stream(p, encode).tokens) + [tokenizer.eos_id]
    return TokenArray(ids)


def token_batches(dataset: Any, seq_len: int, batch_size: int = 8, *, max_batches: int | None = None,
                  max_tokens: int | None = None, targets: bool = False) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows ``[b, seq_len]`` of ``dataset`` (the first of them), limited by
    ``max_batches`` and/or ``max_tokens`` (whichever is reached first). ``targets=True`` keeps each window's
    next token too (``[b, seq_len + 1]``, what :func:`moeut.model.perplexity.window_nll` scores)."""
    if seq_len <= 0 or batch_size <= 0:
        raise AnalysisError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    out: list[torch.Tensor] = []
    n_tok = 0
    # windows of seq_len + 1 as everywhere else; the analyses read the first seq_len tokens of each
    for batch in EvalWindows(dataset, batch_size, seq_len):
        if not targets:
            batch = batch[:, :-1]
        if max_tokens is not None:
            rows = max(0, math.ceil((max_tokens - n_tok) / seq_len))
            batch = batch[:rows]
            if batch.shape[0] == 0:
                break
        out.append(batch)
        n_tok += batch.shape[0] * seq_len
        if max_batches is not None and len(out) >= max_batches:
            break
    if not out:
        raise AnalysisError(f"the data holds {dataset.num_tokens} tokens, less than one window of {seq_len + 1}; "
                            "give more text or a smaller --seq-len")
    return out


def model_batches(loaded: LoadedRun, data, *, seq_len: int | None = None, batch_size: int = 8,
                  max_batches: int | None = 8, max_tokens: int | None = None, targets: bool = False
                  ) -> list[torch.Tensor]:
    """Token batches of DATA for the model of ``loaded`` (shards must match its tokenizer); ``targets`` as
    :func:`token_batches`."""
    sha = loaded.tokenizer.sha256 if loaded.tokenizer is not None else loaded.tokenizer_sha256
    ds = open_tokens(data, loaded.tokenizer, sha)
    vocab = loaded.config.vocab_size
    if getattr(ds, "vocab_size", vocab) > vocab:
        raise AnalysisError(f"the data's vocabulary ({ds.vocab_size}) is larger than the model's ({vocab})")
    return token_batches(ds, seq_len or loaded.config.context_length, batch_size, max_batches=max_batches,
                         max_tokens=max_tokens, targets=targets)


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
    if any(getattr(r, "rows", None) is not None for r in routing):
        raise AnalysisError(f"{what} compares every token's expert selections across layer applications, but this "
                            "model's halted tokens skip their work (act_halting='skip'): later applications route "
                            "only the tokens still active. Analyse a model without ACT or with act_halting='frozen'")
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


def accumulate(acc, model, batches, label: str, show_progress: bool):
    """Feed every batch's routing to an accumulator (``acc.update(routing)``) and return ``acc``."""
    for tokens in progress(batches, total=len(batches), desc=label, enabled=show_progress):
        acc.update(require_routing(forward_analysis(model, tokens, routing=True), label.split()[0]))
    return acc
