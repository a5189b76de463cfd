"""The MoEUT language model (Sec. 2): a universal transformer whose G distinct layers are applied in
order A B … A B … (n_layers/G repeats; ``group_order="aabb"``: A A … B B …), and the dense baseline
(G = n_layers). The SUT baseline has its own class (:mod:`moeut.model.sut`); :func:`build_model` picks.

    h = Embedding(tokens)                          no scaling (post-LN: LN_noaffine(√d · Embedding(tokens)))
    for each layer application i = 0 … n_layers − 1:
        h = layer_{g(i)}(h)                        g(i) = i mod G (abab) or i div (n_layers/G) (aabb)
    logits = W_out · LN(h) + b_out                 head not tied to the embedding (post-LN: no LN)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeut.model.cache import KVCache
from moeut.model.config import ModelConfig
from moeut.model.layer import DenseLayer, LayerRouting, MoEUTLayer
from moeut.model.regularizer import entropy_of_mean_softmax
from moeut.model.routing import expert_counts
from moeut.model.rope import rope_tables


@dataclass
class LMOutput:
    """What a moeut language model returns.

    The regulariser and the routing counts are computed only in training mode or when the caller asks for
    the routing (``output_routing=True``); otherwise (plain evaluation, generation) both are None and
    nothing is spent on them. The logits never depend on it.
    """

    logits: torch.Tensor  # [B, T, vocab]
    # scalar fp32, the auxiliary loss of the training objective: MoEUT γ·Σ_MLP + δ·Σ_attention entropy
    # regularisers (a zero tensor for dense), SUT mutual-information + ACT losses. None when not computed.
    reg_loss: torch.Tensor | None
    cache: KVCache | None = None  # updated cache when one was passed in
    # Routing statistics for logging, per layer application (no gradient): "ffn" [n_layers, N_E],
    # "att_v" and "att_o" [n_layers, H·N_A] (SUT: "ffn", "att"). None for the dense baseline and when the
    # regulariser is not computed.
    expert_counts: dict[str, torch.Tensor] | None = None
    # Only when asked for (analyses): the residual stream entering each layer application plus the final
    # one (n_layers + 1 tensors [B, T, d], before the output LayerNorm), and each application's routing
    # in application order (None entries for the dense baseline).
    hidden_states: list[torch.Tensor] | None = None
    routing: list[LayerRouting | None] | None = None

    def loss(self, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """The training objective: mean next-token cross-entropy (fp32) plus ``reg_loss`` when it was computed
        (training mode or ``output_routing=True``). In plain eval mode it is the cross-entropy alone."""
        ce = F.cross_entropy(self.logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index)
        return ce if self.reg_loss is None else ce + self.reg_loss


class LanguageModel(nn.Module):
    """What every moeut language model offers around its forward pass (MoEUT, dense, SUT): sampling and
    parameter counts. Subclasses have ``embedding`` and an untied ``lm_head``."""

    def generate(self, prompts, max_new_tokens: int, **kw) -> list[list[int]]:
        """Sample continuations of token-id prompts with the KV cache; see :func:`moeut.model.generate.generate`."""
        from moeut.model.generate import generate

        return generate(self, prompts, max_new_tokens, **kw)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embedding.weight.numel() + self.lm_head.weight.numel() + self.lm_head.bias.numel()
        return n


class MoEUTLM(LanguageModel):
    """MoEUT (``cfg.arch == "moeut"``) or the dense pre-LN baseline (``"dense"``) language model.

    ``backend`` picks the expert-matmul implementation (see :mod:`moeut.ops`); None = automatic.
    """

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
        self.lm_head.reset_parameters()

    def set_backend(self, backend: str | None) -> None:
        """Switch the expert-matmul backend of every expert layer (None = automatic by device)."""
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend

    # --------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_routing: bool = False) -> LMOutput:
        """Run the model on ``tokens`` ``[B, T]``.

        * ``cache``: pass a :class:`KVCache` (empty to start) to decode incrementally; the output carries
          the extended cache. New queries and keys are rotated at their absolute positions.
        * ``attention_mask``: ``[B, T_past + T]``, 1/True = real token, 0 = padding (left padding for
          batched generation). None = every position is real. Attention is always causal.
        * ``position_ids``: ``[B, T]`` or ``[T]`` absolute RoPE positions. Default: ``T_past + arange(T)``,
          or, with an ``attention_mask``, the number of real tokens before each position.
        * ``output_hidden_states`` / ``output_routing``: also return the residual stream around every layer
          application and every application's :class:`LayerRouting` (for the analyses).

        ``reg_loss`` and ``expert_counts`` are computed in training mode or with ``output_routing=True``;
        in eval mode without it they are None (see :class:`LMOutput`).
        """
        cfg = self.cfg
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        past = cache.length if cache is not None else 0
        positions = _positions(B, T, past, attention_mask, position_ids, tokens.device)
        rope = rope_tables(positions, cfg.n_rotate, cfg.rope_base)
        mask = _attention_mask(B, T, past, attention_mask, tokens.device)

        h = self.embedding(tokens)
        if self.post_ln:
            h = F.layer_norm(h * math.sqrt(cfg.d_model), (cfg.d_model,))
        new_cache = KVCache() if cache is not None else None
        stats = self.training or output_routing  # regulariser and routing counts (else not kept at all)
        routings: list[list[LayerRouting]] = [[] for _ in range(cfg.group_size)]
        hidden = [h] if output_hidden_states else None
        applied: list[LayerRouting | None] = []
        for idx in range(cfg.n_layers):  # absolute layer application
            g = cfg.layer_index(idx)
            h, kv, routing = self.layers[g](h, rope, mask, cache.get(idx) if cache is not None else None)
            if new_cache is not None:
                new_cache.layers[idx] = kv
            if stats:
                if routing is not None:
                    routings[g].append(routing)
                applied.append(routing)
            if hidden is not None:
                hidden.append(h)

        logits = self.lm_head(self.out_norm(h))
        returned = applied if output_routing else None
        if not stats:
            return LMOutput(logits, None, new_cache, None, hidden, None)
        if not cfg.is_moe:
            return LMOutput(logits, torch.zeros((), device=h.device), new_cache, None, hidden, returned)
        return LMOutput(logits, self._reg_loss(routings), new_cache, self._expert_counts(applied), hidden,
                        returned)

    def _reg_loss(self, routings: list[list[LayerRouting]]) -> torch.Tensor:
        """γ·Σ_g −H(p_ffn,g) + δ·Σ_g (−H(p_V,g) − H(p_O,g)); p pooled over time and over the repeats of g."""
        cfg = self.cfg
        ffn = sum(entropy_of_mean_softmax([r.ffn.logits for r in rs]) for rs in routings)
        att = sum(entropy_of_mean_softmax([r.att_v.logits for r in rs]) +
                  entropy_of_mean_softmax([r.att_o.logits for r in rs]) for rs in routings)
        return cfg.entropy_reg * ffn + cfg.att_entropy_reg * att

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



def _positions(B: int, T: int, past: int, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if position_ids is not None:
        if position_ids.shape[-1] != T or position_ids.dim() not in (1, 2):
            raise ValueError(f"position_ids must be [T] or [B, T] with T={T}, got {tuple(position_ids.shape)}")
        return position_ids.to(device)
    if attention_mask is not None:
        # number of real tokens before each position: correct RoPE positions under left padding
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp_min(0)[:, -T:]
    return torch.arange(past, past + T, device=device)


def _attention_mask(B: int, T: int, past: int, attention_mask: torch.Tensor | None,
                    device: torch.device) -> torch.Tensor | None:
    """Boolean ``[T, S]`` or ``[B, 1, T, S]`` mask (True = may attend), or None for plain causal."""
    if attention_mask is None and past == 0:
        return None
    S = past + T
    q_pos = torch.arange(past, S, device=device).unsqueeze(-1)
    k_pos = torch.arange(S, device=device)
    allowed = k_pos <= q_pos  # causal over absolute positions, [T, S]
    if attention_mask is None:
        return allowed
    if tuple(attention_mask.shape) != (B, S):
        raise ValueError(f"attention_mask must be [batch, cached + new tokens] = {(B, S)}, "
                         f"got {tuple(attention_mask.shape)}")
    allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
    # a padding query would attend to nothing (NaN); let every query see itself
    allowed = allowed | (k_pos == q_pos)
    return allowed.unsqueeze(1)


def build_model(cfg: ModelConfig, backend: str | None = None) -> nn.Module:
    """The language model for ``cfg.arch``: the one place that maps a config to a model class."""
    if cfg.is_sut:
        from moeut.model.sut import SUTLM

        return SUTLM(cfg, backend=backend)
    return MoEUTLM(cfg, backend=backend)
