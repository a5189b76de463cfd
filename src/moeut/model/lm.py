"""The MoEUT language model (Sec. 2): a universal transformer whose G distinct layers are applied in
order A B … A B … (n_layers/G repeats; ``group_order="aabb"``: A A … B B …), and the dense baseline
(G = n_layers). The SUT baseline has its own class (:mod:`moeut.model.sut`); :func:`build_model` picks.

    h = Embedding(tokens)                          no scaling (post-LN: LN_noaffine(√d · Embedding(tokens)))
    for each layer application i = 0 … R·G − 1:  R = n_layers/G as trained, or ``repeats`` at inference
        h = layer_{g(i)}(h)                        g(i) = i mod G (abab) or i div R (aabb)
    logits = W_out · LN(h) + b_out                 head not tied to the embedding (post-LN: no LN)

With ``act=True`` (beyond the paper) the group of G layers is the unit of halting: group application 0 always
runs; before each further one a gate reads the previous group's output and each token halts by stick-breaking
(:mod:`moeut.model.act`, as the SUT baseline). The head reads the halting-weighted state, ``n_layers/G`` (or
``repeats``) is the maximum depth, and ``reg_loss`` adds ``act_reg · Σ_{r ≥ 1} mean_tokens E[depth]_r``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeut.model.act import (
    ACTState,
    HaltingGate,
    depth_entropy,
    depth_per_token,
    expected_depth,
    forced_log_gate,
    frozen_mask,
    halt_step,
    mix_state,
)
from moeut.model.base import LanguageModel, LMOutput
from moeut.model.cache import KVCache
from moeut.model.config import ModelConfig
from moeut.model.layer import DenseLayer, LayerRouting, MoEUTLayer
from moeut.model.masks import attention_mask_for, positions_for
from moeut.model.regularizer import entropy_of_mean_softmax
from moeut.model.rope import rope_tables
from moeut.model.routing import expert_counts, loss_free_update
from moeut.model.skip import skip_halting_stack


class MoEUTLM(LanguageModel):
    """MoEUT (``cfg.arch == "moeut"``) or the dense pre-LN baseline (``"dense"``) language model.

    ``backend`` picks the expert-matmul implementation (see :mod:`moeut.ops`); None = automatic.
    """

    # ACT models: None, or each token's number of group applications [B, T], overriding the halting gate
    # (:func:`moeut.model.act.forcing_depth`; measurements and tests)
    forced_depth: torch.Tensor | None = None

    def __init__(self, cfg: ModelConfig, backend: str | None = None):
        super().__init__()
        if cfg.is_sut:
            raise ValueError("arch='sut' is the SUT baseline: build it with moeut.model.build_model(cfg) "
                             "(moeut.model.sut.SUTLM)")
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        layer_cls = MoEUTLayer if cfg.is_moe else DenseLayer
        self.layers = nn.ModuleList(layer_cls(cfg, backend) for _ in range(cfg.group_size))
        self.post_ln = cfg.is_moe and cfg.norm_placement == "post"
        # post-LN: every layer ends in a LayerNorm, so no output LayerNorm (the input one has no parameters)
        self.out_norm = nn.Identity() if self.post_ln else nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)
        # ACT over group applications (MoEUT only): one halting decision per application of the G layers
        self.halting = (HaltingGate(cfg.d_model, halt_bias=cfg.act_halt_bias_init, normalize=True,
                                    budget=bool(cfg.act_target_depth)) if cfg.act else None)
        # depth budget: λ of the depth penalty, moved by the trainer (update_halt_shift); saved with the weights
        self.act_lambda = nn.Buffer(torch.zeros(())) if cfg.act_target_depth else None
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Init of the paper / reference: embedding N(0, 1/d); layer weights with s = √(2/n_layers) (s = 1
        for post-LN, whose LayerNorms keep the residual at unit scale)."""
        nn.init.normal_(self.embedding.weight, 0, 1 / math.sqrt(self.cfg.d_model))
        std_scale = 1.0 if self.post_ln else math.sqrt(2 / self.cfg.n_layers)
        for layer in self.layers:
            layer.reset_parameters(std_scale)
        if isinstance(self.out_norm, nn.LayerNorm):
            self.out_norm.reset_parameters()
        if self.halting is not None:
            self.halting.reset_parameters()
        if self.act_lambda is not None:
            self.act_lambda.zero_()
        self.lm_head.reset_parameters()

    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_routing: bool = False, repeats: int | None = None,
                targets: torch.Tensor | None = None) -> LMOutput:
        """Run the model on ``tokens`` ``[B, T]``.

        * ``cache``: pass a :class:`KVCache` (empty to start) to decode incrementally; the output carries
          the extended cache. New queries and keys are rotated at their absolute positions.
        * ``attention_mask``: ``[B, T_past + T]``, 1/True = real token, 0 = padding (left padding for
          batched generation). None = every position is real. Attention is always causal.
        * ``position_ids``: ``[B, T]`` or ``[T]`` absolute RoPE positions. Default: ``T_past + arange(T)``,
          or, with an ``attention_mask``, the number of real tokens before each position.
        * ``output_hidden_states`` / ``output_routing``: also return the residual stream around every layer
          application and every application's :class:`LayerRouting` (for the analyses).
        * ``repeats``: apply the G shared layers R times (R·G applications) instead of the trained
          n_layers/G (None). A cache must be used with the repeats that built it. Under ACT: the maximum depth.
        * ``targets``: ``[B, T]`` next tokens; the output's ``ce`` is then their mean cross-entropy (fp32), and
          with :attr:`head_chunk_tokens` set the head runs in recomputed chunks and ``logits`` is None.

        ``reg_loss`` and ``expert_counts`` are computed in training mode or with ``output_routing=True``;
        in eval mode without it they are None (see :class:`LMOutput`). Under ACT ``depth`` holds every token's
        expected number of group applications, and the last hidden state is the halting-weighted one.
        """
        cfg = self.cfg
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        n_apps = cfg.applications(repeats)
        if cache is not None:
            cache.check_depth(n_apps)
        past = cache.length if cache is not None else 0
        positions = positions_for(B, T, past, attention_mask, position_ids, tokens.device)
        rope = rope_tables(positions, cfg.n_rotate, cfg.rope_base)
        mask = attention_mask_for(B, T, past, attention_mask, tokens.device)

        h = self.embedding(tokens)
        if self.post_ln:
            h = F.layer_norm(h * math.sqrt(cfg.d_model), (cfg.d_model,))
        run = _Pass(cfg, repeats, cache, stats=self.training or output_routing,  # regulariser, routing counts
                    hidden=[h] if output_hidden_states else None, device=h.device)
        executed = None
        if self.halting is None:
            for r in range(n_apps // cfg.group_size):
                h = self._apply_group(r, h, rope, mask, run)
            depth = None
        elif cfg.act_halting == "skip":
            h, depth, executed = skip_halting_stack(self, n_apps // cfg.group_size, h, rope, mask, run)
            if run.hidden is not None:
                run.hidden[-1] = h
        else:
            h, depth = self._halting_stack(n_apps // cfg.group_size, h, rope, mask, run)
            executed = torch.full_like(depth, n_apps // cfg.group_size)  # frozen tokens run every layer too

        logits, ce = self.head(self.out_norm(h), targets)
        returned = run.applied if output_routing else None
        if not run.stats:
            return LMOutput(logits=logits, reg_loss=None, cache=run.new_cache, hidden_states=run.hidden,
                            depth=depth, executed_depth=executed, ce=ce)
        if not cfg.is_moe:
            return LMOutput(logits=logits, reg_loss=torch.zeros((), device=h.device), cache=run.new_cache,
                            hidden_states=run.hidden, routing=returned, ce=ce)
        reg = self._reg_loss(run.routings, B, T) + self._act_loss(run, depth)
        return LMOutput(logits=logits, reg_loss=reg, cache=run.new_cache,
                        expert_counts=self._expert_counts(run.applied), hidden_states=run.hidden, routing=returned,
                        depth=depth, executed_depth=executed, ce=ce)

    def _apply_group(self, r: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     mask: torch.Tensor | None, run: _Pass) -> torch.Tensor:
        """Group application ``r``: layer applications ``r·G … r·G + G − 1`` on ``h``; records their KV,
        routing and hidden states in ``run``. Returns the residual stream after the group."""
        cfg = self.cfg
        for idx in range(r * cfg.group_size, (r + 1) * cfg.group_size):  # absolute layer application
            g = cfg.layer_index(idx, run.repeats)
            h, kv, routing = self.apply_layer(idx, self.layers[g], h, rope, mask,
                                              run.cache.get(idx) if run.cache is not None else None)
            run.record(idx, g, kv, routing, h)
        return h

    def _halting_stack(self, n_groups: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       mask: torch.Tensor | None, run: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """ACT over group applications (stick-breaking, :mod:`moeut.model.act`): group 0 always runs; before
        each further group r the gate reads the previous group's output and a token halts with probability p_r.
        The output state is ``acc + q·h``; a frozen token keeps its state, and the group reads that state for
        it (so later layers attend to its final state: its keys and values, cached or not, depend on that
        token alone). Returns the state and the expected number of group applications per token ``[B, T]``."""
        thr = self.cfg.act_threshold
        prev = self._apply_group(0, h, rope, mask, run)
        state, act, q = prev, ACTState.start(prev), None
        for r in range(1, n_groups):
            log_g = self.halting(prev) if self.forced_depth is None else forced_log_gate(self.forced_depth, r)
            act, q = halt_step(act, log_g, prev, thr)
            group_in = torch.where(frozen_mask(q, thr).unsqueeze(-1), state, prev)
            prev = self._apply_group(r, group_in, rope, mask, run)
            state = mix_state(act, q, prev, state, thr)
            if run.stats:
                run.act_loss = run.act_loss + expected_depth(act, q).mean()
        if run.hidden is not None:
            run.hidden[-1] = state  # the final entry is what the output head reads
        return state, depth_per_token(act, q, state)

    def _reg_loss(self, routings: list[list[LayerRouting]], B: int, T: int) -> torch.Tensor:
        """γ·Σ_g −H(p_ffn,g) + δ·Σ_g (−H(p_V,g) − H(p_O,g)); p pooled over the repeats of g and over time
        (per sequence), the micro-batch or the global batch, as ``cfg.entropy_reg_mode`` says. Applications that
        routed only the active tokens (``act_halting="skip"``) pool those alone."""
        cfg = self.cfg
        if not cfg.entropy_balancing:  # balancing="loss_free": the selection bias balances, no regulariser
            return torch.zeros((), device=routings[0][0].ffn.logits.device)
        mode = cfg.entropy_reg_mode

        def term(rs: list[LayerRouting], kind: str) -> torch.Tensor:
            logits, masks = zip(*(_whole_batch(getattr(r, kind).logits, r.rows, B, T) for r in rs))
            return entropy_of_mean_softmax(logits, mode, masks=masks)

        ffn = sum(term(rs, "ffn") for rs in routings)
        att = sum(term(rs, "att_v") + term(rs, "att_o") for rs in routings)
        return cfg.entropy_reg * ffn + cfg.att_entropy_reg * att

    def _act_loss(self, run: _Pass, depth: torch.Tensor | None) -> torch.Tensor:
        """ACT: ``act_reg · Σ_r mean E[depth]_r`` (SUT's). With a depth budget the halting gate's shift holds the
        depth (:meth:`update_halt_shift`) and the loss is ``λ · mean E[depth] − act_depth_entropy · H(mean depth
        distribution)``, λ = :attr:`act_lambda`."""
        cfg = self.cfg
        if not cfg.act_target_depth:
            return cfg.act_reg * run.act_loss
        if run.depth_dist is None:  # a single group application: nothing to halt
            return torch.zeros((), device=run.act_loss.device)
        return self.act_lambda * depth.mean() - cfg.act_depth_entropy * depth_entropy(run.depth_dist)

    @torch.no_grad()
    def update_halt_shift(self, executed_mean: float) -> float:
        """Depth budget (``act_target_depth``), after an optimizer step: ``halt_shift += act_target_rate ·
        sign(executed mean depth − target)`` and ``λ = max(0, λ + act_penalty_rate · (executed mean − target))``
        (``executed_mean``: over the step's tokens of every rank, so every rank makes the same update). The shift
        acts at once; λ is the slow counter-pressure to the language-model loss, which always prefers more depth.
        Returns the new shift."""
        cfg = self.cfg
        err = executed_mean - cfg.act_target_depth
        self.act_lambda.add_(cfg.act_penalty_rate * err).clamp_(min=0.0)
        return self.halting.shift_towards(executed_mean, cfg.act_target_depth, cfg.act_target_rate)

    def _expert_counts(self, flat: list[LayerRouting]) -> dict[str, torch.Tensor]:
        """Selection counts per absolute layer application (``flat`` is in application order)."""
        cfg = self.cfg
        head_offset = torch.arange(cfg.n_heads, device=flat[0].ffn.indices.device).unsqueeze(-1) * cfg.att_n_experts
        n_att = cfg.n_heads * cfg.att_n_experts
        return {
            "ffn": torch.stack([expert_counts(r.ffn.indices, cfg.ff_n_experts) for r in flat]),
            "att_v": torch.stack([expert_counts(r.att_v.indices + head_offset, n_att) for r in flat]),
            "att_o": torch.stack([expert_counts(r.att_o.indices + head_offset, n_att) for r in flat]),
        }

    # ------------------------------------------------------------------ loss-free balancing
    def selection_biases(self) -> dict[str, list[torch.Tensor]]:
        """The selection-bias buffers per router kind (the keys of :attr:`LMOutput.expert_counts`), one per
        distinct layer; empty without loss-free balancing."""
        if not self.cfg.loss_free:
            return {}
        return {"ffn": [layer.ffn.expert_sel_bias for layer in self.layers],
                "att_v": [layer.attention.sel_v_bias for layer in self.layers],
                "att_o": [layer.attention.sel_o_bias for layer in self.layers]}

    def counts_per_layer(self, counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-application selection counts (:attr:`LMOutput.expert_counts`, ``[applications, experts]``) summed
        over the applications of each distinct layer: ``[G, experts]``. The number of applications may be any
        multiple of G (a sampled depth); their order is ``cfg.group_order``'s."""
        cfg = self.cfg
        out = {}
        for kind, c in counts.items():
            n_apps = c.shape[0]
            layer = torch.tensor([cfg.layer_index(i, n_apps // cfg.group_size) for i in range(n_apps)],
                                 device=c.device)
            out[kind] = torch.zeros(cfg.group_size, c.shape[1], dtype=c.dtype, device=c.device).index_add_(0, layer, c)
        return out

    @torch.no_grad()
    def update_selection_bias(self, counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss-free balancing after an optimizer step: ``b += balancing_rate · sign(mean load − load)`` for every
        router of every distinct layer, the load summed over that layer's applications. ``counts``: the step's
        per-application counts (global over data-parallel ranks, so every rank makes the same update).
        Returns the per-layer counts it used (``[G, experts]`` per kind)."""
        cfg = self.cfg
        per_layer = self.counts_per_layer(counts)
        for kind, biases in self.selection_biases().items():
            heads = 1 if kind == "ffn" else cfg.n_heads
            for g, bias in enumerate(biases):
                loss_free_update(bias, per_layer[kind][g], cfg.balancing_rate, n_heads=heads)
        return per_layer


def _whole_batch(logits: torch.Tensor, rows: torch.Tensor | None, B: int, T: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Router logits as ``[B, T, …]`` and which tokens they cover (None: all): rows ``[N, …]`` of the active
    tokens at flat indices ``rows`` are put back in place, zeros elsewhere."""
    if rows is None:
        return logits, None
    full = logits.new_zeros(B * T, *logits.shape[1:]).index_copy(0, rows, logits)
    covered = torch.zeros(B * T, dtype=torch.bool, device=logits.device).index_fill(0, rows, True)
    return full.view(B, T, *logits.shape[1:]), covered.view(B, T)


class _Pass:
    """What one forward pass collects across its layer applications (returned in LMOutput, never kept on
    the model): the new KV cache, the routings (per distinct layer and in application order), the hidden
    states and the ACT loss."""

    def __init__(self, cfg: ModelConfig, repeats: int | None, cache: KVCache | None, stats: bool,
                 hidden: list[torch.Tensor] | None, device: torch.device):
        self.repeats, self.cache, self.stats, self.hidden = repeats, cache, stats, hidden
        self.new_cache = KVCache() if cache is not None else None
        self.routings: list[list[LayerRouting]] = [[] for _ in range(cfg.group_size)]
        self.applied: list[LayerRouting | None] = []
        self.act_loss = torch.zeros((), device=device)  # Σ over halting group applications of mean_tokens E[depth]
        self.depth_dist: torch.Tensor | None = None  # act_halting="skip": each token's depth distribution [B, T, n]

    def record(self, idx: int, g: int, kv, routing: LayerRouting | None, h: torch.Tensor) -> None:
        if self.new_cache is not None:
            self.new_cache.layers[idx] = kv
        if self.stats:
            if routing is not None:
                self.routings[g].append(routing)
            self.applied.append(routing)
        if self.hidden is not None:
            self.hidden.append(h)
