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


@dataclass
class LayerRouting:
    """What one MoEUT layer application routed: returned, never stored on the module."""

    att_v: Routing
    att_o: Routing
    ffn: Routing


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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                past: LayerKV | None = None) -> tuple[torch.Tensor, LayerKV, LayerRouting]:
        if self.norm_placement == "pre":
            xn = self.ln1(x)
            att, kv, route_v, route_o = self.attention(xn, xn, rope, mask, past)
            x = x + att
            xn = self.ln2(x)
            upd, route_ff = self.ffn(xn, xn)
            return x + upd, kv, LayerRouting(att_v=route_v, att_o=route_o, ffn=route_ff)
        if self.norm_placement == "post":
            att, kv, route_v, route_o = self.attention(x, x, rope, mask, past)
            x = self.ln1(x + att)
            upd, route_ff = self.ffn(x, x)
            return self.ln2(x + upd), kv, LayerRouting(att_v=route_v, att_o=route_o, ffn=route_ff)
        xn = self.ln1(x)
        att, kv, route_v, route_o = self.attention(x, xn, rope, mask, past)
        x = x + att
        upd, route_ff = self.ffn(x, self.ln2(x))
        return x + upd, kv, LayerRouting(att_v=route_v, att_o=route_o, ffn=route_ff)


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
