"""Adaptive depth that saves compute: MoEUT-ACT whose halted tokens skip their work (``act_halting="skip"``).

The halting is the stick-breaking of :mod:`moeut.model.act` (group application 0 always runs; before each further
one, a gate reads the token's previous group output), and a token freezes once its probability of never halting
falls below ``1 − act_threshold``. What changes against ``act_halting="frozen"`` (where a frozen token keeps its
state but still runs through every later layer, because others attend to it) is the definition of a frozen token:

* its residual stream is not updated by any later layer application — also not by the later layers of the group
  it froze in (so its keys and values at distinct layer g depend on its frozen state alone);
* it issues no query, gets no attention row, no output or feed-forward experts (no slots in any expert plan), and
  no halting gate; its routing counts neither in the balancing regulariser nor in the expert counts;
* it still serves as key and value: those are computed once per distinct layer, when it freezes, and reused at
  every later application of that layer (in the KV cache they are stored for every application, as all keys).

The layers run on the active tokens' rows (:class:`~moeut.model.skip_rows.ActiveRows`), so the time, not only a
count of multiply-adds, falls with the halted fraction. Every decision reads one token's own state, so halting is
causal. A group application in which no token is frozen runs the ordinary layers.
"""

from __future__ import annotations

from typing import Any

import torch

from moeut.model.act import (ACTState, depth_distribution, expected_depth, forced_log_gate, frozen_mask, halt_step,
                             mix_state)
from moeut.model.cache import LayerKV
from moeut.model.skip_rows import ActiveRows

# The functions below are the MoEUT model's (moeut.model.lm imports them): ``model`` is a MoEUTLM, ``run`` the
# _Pass that collects one forward pass's caches, routings and hidden states (typed Any: lm imports this module).
MoEUTLM = _Pass = Any


def skip_halting_stack(model: MoEUTLM, n_groups: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       mask: torch.Tensor | None, run: _Pass) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The group applications of an ACT model whose halted tokens skip their work. Returns the halting-weighted
    state ``[B, T, d]``, the expected and the executed number of group applications per token (``[B, T]`` fp32)."""
    thr = model.cfg.act_threshold
    prev = model._apply_group(0, h, rope, mask, run)
    state, act, q = prev, ACTState.start(prev), None
    halted = torch.zeros(h.shape[:-1], dtype=torch.bool, device=h.device)  # frozen before the group
    executed = torch.ones(h.shape[:-1], device=h.device)
    halted_kv: dict[int, LayerKV] = {}  # per distinct layer: the keys and values of the tokens frozen so far
    for r in range(1, n_groups):
        act, q = halt_step(act, _gate(model, prev, halted, r), prev, thr)
        frozen = frozen_mask(q, thr)
        if frozen.any():
            prev = _group_on_rows(model, r, prev, state, ~frozen, frozen & ~halted, rope, mask, run, halted_kv)
        else:  # every token continues: the ordinary layers
            prev = model._apply_group(r, prev, rope, mask, run)
        state = mix_state(act, q, prev, state, thr)
        executed = executed + (~frozen).float()
        halted = frozen
        if run.stats:
            run.act_loss = run.act_loss + expected_depth(act, q).mean()
    depth = torch.ones_like(executed) if q is None else 1 + expected_depth(act, q)
    if q is not None:
        run.depth_dist = depth_distribution(act, q)
    return state, depth, executed


def _gate(model: MoEUTLM, prev: torch.Tensor, halted: torch.Tensor, r: int) -> torch.Tensor:
    """``log (g[continue], g[halt])`` ``[B, T, 2]`` before group application ``r``: the gate on the tokens not yet
    halted (rows), ``(0, −∞)`` for the halted ones (nothing changes for them); or the forced depth's."""
    if model.forced_depth is not None:
        return forced_log_gate(model.forced_depth, r)
    if not halted.any():
        return model.halting(prev)
    idx = (~halted).reshape(-1).nonzero().squeeze(1)
    rows = model.halting(prev.reshape(-1, prev.shape[-1]).index_select(0, idx))
    certain_to_continue = forced_log_gate(halted.new_full(halted.shape, r + 1, dtype=torch.long), r)  # (0, −∞)
    return certain_to_continue.reshape(-1, 2).index_copy(0, idx, rows).view(*halted.shape, 2)


def _group_on_rows(model: MoEUTLM, r: int, prev: torch.Tensor, state: torch.Tensor, active: torch.Tensor,
                   new: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                   run: _Pass, halted_kv: dict[int, LayerKV]) -> torch.Tensor:
    """Group application ``r`` on the ``active`` tokens' rows; ``new`` marks the tokens that froze just now
    (their keys and values are computed at each distinct layer, into ``halted_kv``). Returns the group output
    ``[B, T, d]``: the active tokens' new residual, the frozen tokens' state."""
    cfg = model.cfg
    B, T, d = prev.shape
    rows = ActiveRows.build(active, new, rope, mask)
    x = prev.reshape(B * T, d).index_select(0, rows.idx)
    halted = state.reshape(B * T, d).index_select(0, rows.new_idx)
    for idx in range(r * cfg.group_size, (r + 1) * cfg.group_size):
        g = cfg.layer_index(idx, run.repeats)
        past = run.cache.get(idx) if run.cache is not None else None
        x, kv, routing, halted_kv[g] = model.apply_layer(idx, model.layers[g], x, None, None, past, rows=rows,
                                                         halted=halted, halted_kv=halted_kv.get(g))
        full = None if run.hidden is None else _merge(state, rows, x)
        run.record(idx, g, kv, routing, full)
    return _merge(state, rows, x)


def _merge(state: torch.Tensor, rows: ActiveRows, x: torch.Tensor) -> torch.Tensor:
    """``[B, T, d]``: the active rows ``x`` over the frozen tokens' ``state``."""
    B, T, d = state.shape
    return state.reshape(B * T, d).index_copy(0, rows.idx, x).view(B, T, d)
