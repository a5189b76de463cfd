"""Parameter and compute accounting (``moeut info``): the authors' MAC formulas and moeut's own count.

**The authors' accounting** (``paper_*``), exactly as ``paper/moe_universal/common.py`` of
``RobertCsordas/moeut_training_code`` computes it (``get_attention_flops``, ``get_ff_flops``, ``get_flops``,
``get_train_flops``; the numbers are MACs although the functions say "flops" — the paper's axis reads "Total
training MACs"). Per *sequence* of T tokens (``lm.unroll``) and layer application, with no context blocks
(every paper run sets ``lm.trafo.context_blocks=0``), no embedding and no output head:

* MoEUT / σ-MoE (SwitchHead with RoPE, V and O experts): attention ``2·H·d_h·T²`` (scores and mixing over the
  whole context) ``+ (2·K_A + 2)·d·H·d_h·T`` (q, k and the selected V, O experts) ``+ 2·H·K_A·d_h·T`` (gate
  mixing) ``+ 2·N_A·d·T`` (two routers, counted once, not per head); feed-forward ``2·K·d·d_e·T + N_E·d·T``.
* Dense (``preln_rope``): attention ``2·H·d_h·T² + 4·d·H·d_h·T``; feed-forward ``2·d·d_ff·T``.
* ``get_flops`` = n_layers · (attention + feed-forward); ``get_train_flops`` = ``get_flops`` · steps · batch
  size (sequences): forward MACs only, no factor for the backward pass.
* SUT: the authors' file has no formula (``actsut`` variants fail its asserts), so none is reported.

**moeut's own count** (``layer_macs``, ``macs_per_token``): every matmul of one token's forward pass, also
per token at context length T (attention scores counted over the whole context, as the authors do):

* SwitchHead: ``2·d·H·d_h`` (q, k) + ``2·K_A·d·H·d_h`` (selected V and O experts; = ``4·d·H·d_h`` for
  K_A = 2) + ``2·H·d_h·T`` (scores and mixing of values) + ``2·d·H·N_A`` (routers) + ``K_A·H·(d_h + d)``
  (gate mixing of V and O).
* σ-MoE: ``2·d·d_e·K + d·N_E`` (selected experts + router).
* Dense: attention ``4·d·H·d_h + 2·H·d_h·T``; MLP ``2·d·d_ff``.
* SUT (the same style: every matmul a token's forward pass runs, attention over the whole context), with
  ``w = h·d_h`` the width of one attention expert (h heads per expert) and P = ``rel_pos_max``:
  attention ``(d² + d·N_A)`` (MLP router) ``+ K_A·d·w`` (selected query experts) ``+ 2·d·w`` (shared K, V)
  ``+ 2·K_A·w·T`` (scores and mixing of values) ``+ K_A·w·(2P+1)`` (query · relative-position table)
  ``+ K_A·w·d`` (selected output experts) ``+ K_A·d`` (gate mixing); MLP ``(d² + d·N_E)`` (router)
  ``+ 2·K·d·d_e + K·d`` (selected experts, gate mixing) ``+ (d² + 2·d)`` (ACT halting gate, when on). An
  ACT model is counted at its full depth (every token runs all n_layers applications; halted tokens are
  frozen, not skipped).
* Output head: ``d·vocab``.

It differs from the authors' count by the routers (×H here: each head has its own N_A router rows), the O
gate mixing (over d rather than d_h) and the output head. σ-MoE and the LayerNorm/grouping ablations are
MoEUT layers and use the MoEUT formulas.
"""

from __future__ import annotations

from typing import Any

import torch

from moeut.model.build import build_model
from moeut.model.config import ModelConfig


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of the model built from ``cfg`` (instantiated on the meta device)."""
    with torch.device("meta"):
        model = build_model(cfg)
    total = model.num_params()
    return {"params_total": total, "params_non_embedding": model.num_params(non_embedding=True),
            "params_embedding": model.embedding.weight.numel(),
            "params_head": model.lm_head.weight.numel() + model.lm_head.bias.numel()}


def layer_macs(cfg: ModelConfig, context: int) -> dict[str, int]:
    """Forward MACs per token of one layer application, split into attention and MLP."""
    d, H, dh, T = cfg.d_model, cfg.n_heads, cfg.d_head, context
    if cfg.is_sut:
        w, ka, k = H * dh, cfg.att_k, cfg.ff_k
        att = (d * d + d * cfg.att_n_experts + ka * d * w + 2 * d * w + 2 * ka * w * T
               + ka * w * (2 * cfg.rel_pos_max + 1) + ka * w * d + ka * d)
        mlp = d * d + d * cfg.ff_n_experts + 2 * k * d * cfg.ff_expert_size + k * d
        if cfg.act:
            mlp += d * d + 2 * d
        return {"attention": att, "mlp": mlp}
    if cfg.is_moe:
        att = (2 * d * H * dh + 2 * cfg.att_k * d * H * dh + 2 * H * dh * T
               + 2 * d * H * cfg.att_n_experts + cfg.att_k * H * (dh + d))
        mlp = 2 * d * cfg.ff_expert_size * cfg.ff_k + d * cfg.ff_n_experts
    else:
        att = 4 * d * H * dh + 2 * H * dh * T
        mlp = 2 * d * cfg.d_ff
    return {"attention": att, "mlp": mlp}


def active_params_per_token(cfg: ModelConfig) -> int:
    """Parameters one token's forward pass multiplies through, counting every layer *application* (a
    shared layer applied R times counts R times), plus the whole embedding, final LayerNorm and head.
    For the dense baseline this equals the total parameter count."""
    d, H, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    if cfg.is_sut:
        w, ka, k = H * dh, cfg.att_k, cfg.ff_k
        att = (d * d + d + d * cfg.att_n_experts + 2 * ka * d * w + 2 * d * w
               + H * dh * (2 * cfg.rel_pos_max + 1))
        mlp = d * d + d + d * cfg.ff_n_experts + k * (2 * d * cfg.ff_expert_size + cfg.ff_expert_size + d)
        if cfg.act:
            mlp += d * d + d + 2 * d
        per_layer = att + mlp + 4 * d  # two LayerNorms
        return cfg.n_layers * per_layer + cfg.vocab_size * d + (d * cfg.vocab_size + cfg.vocab_size)
    if cfg.is_moe:
        att = 2 * d * H * dh + 2 * cfg.att_k * H * d * dh + 2 * H * cfg.att_n_experts * d
        mlp = 2 * cfg.ff_k * d * cfg.ff_expert_size + cfg.ff_n_experts * d
    else:
        att = 4 * d * H * dh
        mlp = 2 * d * cfg.d_ff + cfg.d_ff + d
    per_layer = att + mlp + 4 * d  # two LayerNorms
    out_norm = 0 if cfg.is_moe and cfg.norm_placement == "post" else 2 * d
    return (cfg.n_layers * per_layer + cfg.vocab_size * d + (d * cfg.vocab_size + cfg.vocab_size) + out_norm
            + moeut_halting_cost(cfg)["params"])


def moeut_halting_cost(cfg: ModelConfig) -> dict[str, int]:
    """MoEUT with ACT: the halting gate (LN → d×d → GELU → d×2) runs before every group application but
    the first; per token at the maximum depth (no token halting), its parameters and MACs. 0 without ACT."""
    if not (cfg.is_moe and cfg.act):
        return {"params": 0, "macs": 0}
    d, n = cfg.d_model, cfg.n_repeats - 1
    return {"params": n * (2 * d + d * d + d + 2 * d + 2), "macs": n * (d * d + 2 * d)}


def halted_kv_macs(cfg: ModelConfig) -> int:
    """MoEUT, ``act_halting="skip"``: the MACs of one halted token's key and value at one distinct layer (the
    key projection, the value router and the selected V experts with their gate mixing), paid once per distinct
    layer when the token halts."""
    d, H, dh, ka = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.att_k
    return d * H * dh + ka * d * H * dh + d * H * cfg.att_n_experts + ka * H * dh


def executed_macs_per_token(cfg: ModelConfig, executed: torch.Tensor, context: int | None = None
                            ) -> dict[str, float]:
    """Forward MACs per token that a MoEUT-ACT pass actually ran, from each token's executed number of group
    applications ``executed`` (``LMOutput.executed_depth``): its group applications, the halting gates it read
    (before applications 1 … min(e, n − 1)) and, when it halted early under ``act_halting="skip"``, its keys and
    values once per distinct layer. Means over the tokens: ``layer_macs_per_token`` and, with the output head,
    ``macs_per_token``."""
    T = context or cfg.context_length
    per_layer = layer_macs(cfg, T)
    e = executed.double().flatten()
    n, G = cfg.n_repeats, cfg.group_size
    layers = e * G * (per_layer["attention"] + per_layer["mlp"])
    if cfg.is_moe and cfg.act:
        layers = layers + e.clamp(max=n - 1) * (cfg.d_model ** 2 + 2 * cfg.d_model)
        layers = layers + (e < n).double() * G * halted_kv_macs(cfg)
    mean = layers.mean().item()
    return {"layer_macs_per_token": mean, "macs_per_token": mean + cfg.d_model * cfg.vocab_size}


# ------------------------------------------------------------------------------ the authors' accounting
def _paper_check(cfg: ModelConfig, context: int) -> None:
    if cfg.is_sut:
        raise ValueError("paper MAC accounting: the authors' common.py has no formula for SUT (arch='sut'); "
                         "use moeut's own count (layer_macs / macs_per_token)")
    if not isinstance(context, int) or context <= 0:
        raise ValueError(f"paper MAC accounting: context={context!r} must be a positive integer (lm.unroll)")


def paper_attention_flops(cfg: ModelConfig, context: int) -> int:
    """``get_attention_flops``: MACs of one attention layer application on a sequence of ``context`` tokens."""
    _paper_check(cfg, context)
    d, H, dh, T = cfg.d_model, cfg.n_heads, cfg.d_head, context
    scores = H * dh * T ** 2 * 2  # (1 + context_blocks) = 1
    if not cfg.is_moe:  # preln_rope
        return scores + 4 * d * H * dh * T
    # "full_rope" SwitchHead with q_expert = k_expert = 0, v_expert = o_expert = 1
    n_exp, n_sels, k = 2, 2, cfg.att_k
    n_total_proj = n_exp * k + 4 - n_exp
    return scores + n_total_proj * d * H * dh * T + n_exp * H * k * T * dh + n_sels * cfg.att_n_experts * d * T


def paper_ff_flops(cfg: ModelConfig, context: int) -> int:
    """``get_ff_flops``: MACs of one feed-forward layer application on a sequence of ``context`` tokens."""
    _paper_check(cfg, context)
    d, T = cfg.d_model, context
    if not cfg.is_moe:
        return 2 * d * cfg.d_ff * T
    return 2 * T * d * cfg.ff_expert_size * cfg.ff_k + T * d * cfg.ff_n_experts


def paper_flops(cfg: ModelConfig, context: int) -> int:
    """``get_flops``: forward MACs of all layer applications on one sequence (no embedding, no head)."""
    return (paper_attention_flops(cfg, context) + paper_ff_flops(cfg, context)) * cfg.n_layers


def paper_macs_per_token(cfg: ModelConfig, context: int) -> float:
    """``get_flops`` divided by the sequence length: the authors' forward MACs per token."""
    return paper_flops(cfg, context) / context


def paper_train_flops(cfg: ModelConfig, steps: int, batch_size: int, context: int) -> int:
    """``get_train_flops``: ``get_flops · stop_after · batch_size`` (forward MACs, batch in sequences)."""
    return paper_flops(cfg, context) * steps * batch_size


def model_stats(cfg: ModelConfig, context: int | None = None) -> dict[str, Any]:
    """Everything ``moeut info`` prints: parameter counts, active parameters, forward MACs per token in
    moeut's own count (``macs_*``) and in the authors' accounting (``paper_*``; None for SUT)."""
    T = context or cfg.context_length
    per_layer = layer_macs(cfg, T)
    layers = cfg.n_layers * (per_layer["attention"] + per_layer["mlp"]) + moeut_halting_cost(cfg)["macs"]
    head = cfg.d_model * cfg.vocab_size
    paper = None if cfg.is_sut else paper_flops(cfg, T)
    return {
        "arch": cfg.arch,
        **count_params(cfg),
        "active_params_per_token": active_params_per_token(cfg),
        "macs_context": T,
        "macs_per_token": layers + head,
        "macs_per_token_layers": layers,
        "macs_per_token_head": head,
        "macs_attention_per_layer": per_layer["attention"],
        "macs_mlp_per_layer": per_layer["mlp"],
        # the authors' common.py (forward, layers only; per sequence of T tokens and per token)
        "paper_macs_per_sequence": paper,
        "paper_macs_per_token": None if paper is None else paper / T,
        "paper_attention_macs_per_layer_per_sequence": None if cfg.is_sut else paper_attention_flops(cfg, T),
        "paper_ff_macs_per_layer_per_sequence": None if cfg.is_sut else paper_ff_flops(cfg, T),
        "config": cfg.to_dict(),
    }
