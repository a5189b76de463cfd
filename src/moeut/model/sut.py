"""The Sparse Universal Transformer baseline (Tan et al., EMNLP 2023) as the MoEUT paper configured it.

One set of layer weights (G = 1 in the paper; any G dividing n_layers works) applied n_layers times;
post-LayerNorm layers; embeddings scaled by √d and passed through a LayerNorm without parameters; no
output LayerNorm:

    h₀ = LN_noaffine(√d · Embedding(tokens))
    layer(x_q, x_kv):  x = LN₁(x_q + MoA(x_q, x_kv));  x = LN₂(x + SoftmaxMoE(x))
    without ACT:       h_t = layer(h_{t−1}, h_{t−1})
    with ACT:          h_t = layer(h_{t−1}, s_{t−1}),  s = halting-weighted state (see act.py), s₀ = h₀
    logits = W_out · s_{n−1} + b_out        (without ACT s = h)

``reg_loss = mi_reg · Σ_layers (MI(attention router) + MI(MLP router)) + act_reg · Σ_{t=1}^{n−1} mean_tokens E[depth]_t``:
the mutual-information loss (:mod:`moeut.model.mutual_information`) pools a layer's router outputs over all
its applications; the ACT loss is added at every halting application t, as the paper's training code does
(its ``ACTWrapper`` calls ``add_reg`` once per application and the regulariser sums them, unnormalised).
Both are computed only in training mode or with ``output_routing=True``. ``sample_topk`` applies to the
attention-expert router only (the training code and shawntan/SUT never sample the feed-forward MoE).

The KV cache holds, per layer application, the keys and values of ``x_kv``; a position's state depends on
earlier positions only, so cached decoding gives the logits of a full forward pass (ACT included).
``position_ids`` are not used: the relative-position term counts sequence slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeut.model.act import ACTState, HaltingGate, depth_per_token, expected_depth, halt_step, mix_state
from moeut.model.base import LanguageModel, LMOutput
from moeut.model.cache import KVCache, LayerKV
from moeut.model.config import ModelConfig
from moeut.model.masks import attention_mask_for
from moeut.model.moa import MixtureOfAttentionHeads
from moeut.model.mutual_information import mutual_information_loss
from moeut.model.routing import Routing, expert_counts
from moeut.model.softmax_moe import SoftmaxMoE


@dataclass
class SUTLayerRouting:
    """What one SUT layer application routed (``gates``/``indices`` ``[B, T, k]``, ``logits`` ``[B, T, E]``),
    and the token weights of the mutual-information loss (None = all 1; under ACT q, 0 for frozen tokens)."""

    att: Routing
    ffn: Routing
    weight: torch.Tensor | None = None


class SUTLayer(nn.Module):
    """Post-LN SUT layer: ``x = LN₁(x_q + MoA(x_q, x_kv)); x = LN₂(x + SoftmaxMoE(x))`` (+ its halting gate)."""

    def __init__(self, cfg: ModelConfig, backend: str | None = None):
        super().__init__()
        d = cfg.d_model
        self.attention = MixtureOfAttentionHeads(d, cfg.att_n_experts, cfg.att_k, cfg.n_heads, cfg.d_head,
                                                 cfg.rel_pos_max, cfg.sample_topk, backend)
        self.ln1 = nn.LayerNorm(d)
        self.ffn = SoftmaxMoE(d, cfg.ff_n_experts, cfg.ff_expert_size, cfg.ff_k, backend)  # never sampled
        self.ln2 = nn.LayerNorm(d)
        self.halting = HaltingGate(d) if cfg.act else None

    def reset_parameters(self) -> None:
        self.attention.reset_parameters()
        self.ffn.reset_parameters()
        for ln in (self.ln1, self.ln2):
            ln.reset_parameters()
        if self.halting is not None:
            self.halting.reset_parameters()

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, mask: torch.Tensor | None,
                past: LayerKV | None = None, active: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, LayerKV, SUTLayerRouting]:
        att, kv, route_att = self.attention(x_q, x_kv, mask, past, active)
        x = self.ln1(x_q + att)
        upd, route_ff = self.ffn(x, active)
        return self.ln2(x + upd), kv, SUTLayerRouting(att=route_att, ffn=route_ff, weight=active)


class SUTLM(LanguageModel):
    """Sparse Universal Transformer language model, same interface as :class:`moeut.model.lm.MoEUTLM`."""

    def __init__(self, cfg: ModelConfig, backend: str | None = None):
        super().__init__()
        if not cfg.is_sut:
            raise ValueError(f"SUTLM needs arch='sut', got {cfg.arch!r}")
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(SUTLayer(cfg, backend) for _ in range(cfg.group_size))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embedding N(0, 1/d) (the authors' Kaiming-normal fan-in), layers as the SUT code, torch's head."""
        nn.init.normal_(self.embedding.weight, 0, 1 / math.sqrt(self.cfg.d_model))
        for layer in self.layers:
            layer.reset_parameters()
        self.lm_head.reset_parameters()

    def out_norm(self, h: torch.Tensor) -> torch.Tensor:
        """No output LayerNorm in SUT (kept as a function so analyses can call ``model.out_norm``)."""
        return h

    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_routing: bool = False, repeats: int | None = None,
                targets: torch.Tensor | None = None):
        """As :meth:`moeut.model.lm.MoEUTLM.forward` (``repeats``, ``targets``: as there). ``hidden_states``: the state entering each layer
        application (under ACT the halting-weighted state attention reads) plus the final one."""
        cfg = self.cfg
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        n_apps = cfg.applications(repeats)
        if cache is not None:
            cache.check_depth(n_apps)
        past = cache.length if cache is not None else 0
        mask = attention_mask_for(B, T, past, attention_mask, tokens.device)
        h = F.layer_norm(self.embedding(tokens) * math.sqrt(cfg.d_model), (cfg.d_model,))

        new_cache = KVCache() if cache is not None else None
        stats = self.training or output_routing  # regularisers and routing counts (else not kept at all)
        applied: list[SUTLayerRouting] = []
        hidden = [h] if output_hidden_states else None
        state, prev, act, q = h, h, None, None
        act_loss = torch.zeros((), device=h.device)  # Σ over halting applications of mean_tokens E[depth]_t
        for idx in range(n_apps):
            layer = self.layers[cfg.layer_index(idx, repeats)]
            past_kv = cache.get(idx) if cache is not None else None
            if layer.halting is not None and idx > 0:
                act, q = halt_step(act, layer.halting(prev), prev, cfg.act_threshold)
                out, kv, routing = self.apply_layer(idx, layer, prev, state, mask, past_kv, active=q)
                state = mix_state(act, q, out, state, cfg.act_threshold)
                if stats and cfg.act_reg:
                    act_loss = act_loss + expected_depth(act, q).mean()
            else:
                out, kv, routing = self.apply_layer(idx, layer, prev, state, mask, past_kv)
                state = out
                if layer.halting is not None:
                    act = ACTState.start(out)
            prev = out
            if new_cache is not None:
                new_cache.layers[idx] = kv
            if stats:
                applied.append(routing)
            if hidden is not None:
                hidden.append(state)

        logits, ce = self.head(state, targets)
        depth = depth_per_token(act, q, state) if cfg.act else None
        if not stats:
            return LMOutput(logits=logits, reg_loss=None, cache=new_cache, hidden_states=hidden, depth=depth, ce=ce)
        reg = self._mi_loss(applied, repeats) + cfg.act_reg * act_loss
        counts = {"ffn": torch.stack([expert_counts(r.ffn.indices, cfg.ff_n_experts) for r in applied]),
                  "att": torch.stack([expert_counts(r.att.indices, cfg.att_n_experts) for r in applied])}
        return LMOutput(logits=logits, reg_loss=reg, cache=new_cache, expert_counts=counts, hidden_states=hidden,
                        routing=applied if output_routing else None, depth=depth, ce=ce)

    def _mi_loss(self, applied: list[SUTLayerRouting], repeats: int | None) -> torch.Tensor:
        cfg = self.cfg
        total = torch.zeros((), device=applied[0].ffn.logits.device)
        if not cfg.mi_reg:
            return total
        for g in range(cfg.group_size):
            mine = [r for i, r in enumerate(applied) if cfg.layer_index(i, repeats) == g]
            weights = [r.weight for r in mine]
            total = total + mutual_information_loss([r.att.logits for r in mine], weights, cfg.mi_loss)
            total = total + mutual_information_loss([r.ffn.logits for r in mine], weights, cfg.mi_loss)
        return cfg.mi_reg * total
