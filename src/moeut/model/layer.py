"""One MoEUT layer with peri-LayerNorm (Sec. 2.4) or the pre-/post-LN of the ablation (Sec. 3.6), and the dense
baseline's pre-LN layer.

MoEUT, ``norm_placement="peri"`` (LayerNorm only where a signal feeds a softmax/sigmoid or a query/key):

    xn = LN₁(x)
    x  = x + SwitchHead(q, k, routers from xn; values from raw x)
    x  = x + σ-MoE(experts on raw x; router on LN₂(x))

``"pre"``:  ``x = x + SwitchHead(LN₁(x)); x = x + σ-MoE(LN₂(x))`` (every projection and router reads LN(x));
``"post"``: ``x = LN₁(x + SwitchHead(x)); x = LN₂(x + σ-MoE(x))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeut.model.attention import DenseAttention, SwitchHead
from moeut.model.cache import LayerKV
from moeut.model.config import ModelConfig
from moeut.model.moe import SigmaMoE
from moeut.model.routing import Routing
from moeut.model.skip_rows import ActiveRows


@dataclass
class LayerRouting:
    """What one MoEUT layer application routed: returned, never stored on the module."""

    att_v: Routing
    att_o: Routing
    ffn: Routing
    # None: the routings cover every token, ``[B, T, …]``. Adaptive depth with halted tokens skipping their work:
    # the flat indices (into B·T) of the active tokens whose rows ``[N, …]`` the routings hold
    rows: torch.Tensor | None = None


class MoEUTLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str | None = None):
        super().__init__()
        self.norm_placement = cfg.norm_placement
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attention = SwitchHead(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.att_n_experts, cfg.att_k, backend,
                                    norm_init=cfg.att_norm_init, selection_bias=cfg.loss_free)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = SigmaMoE(cfg.d_model, cfg.ff_n_experts, cfg.ff_expert_size, cfg.ff_k, backend,
                            selection_bias=cfg.loss_free)

    def reset_parameters(self, std_scale: float) -> None:
        self.attention.reset_parameters(std_scale)
        self.ffn.reset_parameters(std_scale)
        for ln in (self.ln1, self.ln2):
            ln.reset_parameters()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                past: LayerKV | None = None, rows: ActiveRows | None = None, halted: torch.Tensor | None = None,
                halted_kv: LayerKV | None = None) -> tuple[torch.Tensor, LayerKV, LayerRouting]:
        """The layer on ``x`` ``[B, T, d]``; or, with ``rows`` (adaptive depth, halted tokens skip their work), on
        the active tokens' rows ``x`` ``[N, d]`` only — see :meth:`forward_rows`, whose result it returns."""
        if rows is not None:
            return self.forward_rows(x, rows, past, halted, halted_kv)
        att_x, att_xn = self._attention_inputs(x)
        att, kv, route_v, route_o = self.attention(att_x, att_xn, rope, mask, past)
        x = self._after_attention(x, att)
        x, route_ff = self._feed_forward(x)
        return x, kv, LayerRouting(att_v=route_v, att_o=route_o, ffn=route_ff)

    def _attention_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the values read, what queries, keys and routers read): peri (x, LN₁x), pre LN₁x twice, post x."""
        if self.norm_placement == "post":
            return x, x
        xn = self.ln1(x)
        return (xn, xn) if self.norm_placement == "pre" else (x, xn)

    def _after_attention(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return self.ln1(x + att) if self.norm_placement == "post" else x + att

    def _feed_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        if self.norm_placement == "pre":
            xn = self.ln2(x)
            upd, route = self.ffn(xn, xn)
            return x + upd, route
        if self.norm_placement == "post":
            upd, route = self.ffn(x, x)
            return self.ln2(x + upd), route
        upd, route = self.ffn(x, self.ln2(x))
        return x + upd, route

    def forward_rows(self, x: torch.Tensor, rows: ActiveRows, past: LayerKV | None, halted: torch.Tensor,
                     halted_kv: LayerKV | None) -> tuple[torch.Tensor, LayerKV, LayerRouting, LayerKV]:
        """The layer for the tokens that have not halted, on their rows ``x`` ``[N_active, d]`` only.

        Halted tokens keep their residual stream; they serve as keys and values, which depend on their frozen
        state alone: ``halted_kv`` (``[B·T, H, d_h]`` each) holds them for the tokens halted so far, and the
        tokens that halted just now (rows ``halted`` ``[N_new, d]``, at ``rows.new_idx``) get theirs computed here,
        once for every later application of this layer (``halted_kv`` None: none halted before). Returns the active
        rows' output, the keys and values of the whole sequence (``[B, H, T_past + T, d_h]``, for attention and the
        cache), the active rows' routing and the updated ``halted_kv``."""
        att = self.attention
        att_x, att_xn = self._attention_inputs(x)
        k_act, v_act, route_v = att.keys_values(att_x, att_xn, rows.cos, rows.sin)
        if halted_kv is None:  # the first time tokens halt: no halted token's keys and values yet
            halted_kv = (k_act.new_zeros(rows.batch * rows.time, *k_act.shape[1:]),
                         v_act.new_zeros(rows.batch * rows.time, *v_act.shape[1:]))
        k_buf, v_buf = halted_kv
        if halted.shape[0] > 0:
            k_new, v_new, _ = att.keys_values(*self._attention_inputs(halted), rows.cos_new, rows.sin_new)
            k_buf, v_buf = k_buf.index_copy(0, rows.new_idx, k_new), v_buf.index_copy(0, rows.new_idx, v_new)
        k, v = rows.whole_sequence(k_buf, k_act), rows.whole_sequence(v_buf, v_act)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        a = rows.attend(att.queries(att_xn, rows.cos, rows.sin), k, v)
        y, route_o = att.project_out(a, att_xn)
        x = self._after_attention(x, y)
        x, route_ff = self._feed_forward(x)
        routing = LayerRouting(att_v=route_v, att_o=route_o, ffn=route_ff, rows=rows.idx)
        return x, (k, v), routing, (k_buf, v_buf)


class DenseLayer(nn.Module):
    """Pre-LN transformer layer: x += Attn(LN₁(x)); x += W₂·ReLU(W₁·LN₂(x) + b₁) + b₂."""

    def __init__(self, cfg: ModelConfig, backend: str | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attention = DenseAttention(cfg.d_model, cfg.n_heads, cfg.d_head)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff_in = nn.Linear(cfg.d_model, cfg.d_ff)
        self.ff_out = nn.Linear(cfg.d_ff, cfg.d_model)

    @torch.no_grad()
    def reset_parameters(self, std_scale: float) -> None:
        self.attention.reset_parameters(std_scale)
        for lin in (self.ff_in, self.ff_out):
            nn.init.normal_(lin.weight, 0, std_scale / lin.in_features ** 0.5)
            nn.init.zeros_(lin.bias)
        for ln in (self.ln1, self.ln2):
            ln.reset_parameters()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                past: LayerKV | None = None) -> tuple[torch.Tensor, LayerKV, None]:
        att, kv = self.attention(self.ln1(x), rope, mask, past)
        x = x + att
        x = x + self.ff_out(F.relu(self.ff_in(self.ln2(x))))
        return x, kv, None
