"""The paper's training-code checkpoints ↔ moeut: run arguments → :class:`ModelConfig`, and parameter names.

Which runs of ``RobertCsordas/moeut_training_code`` map onto which moeut configuration (``transformer.variant``
and the options that change the forward pass; everything else — optimiser, schedule, dropouts, logging — is
ignored):

=============================================  ===========================================================
training code                                  moeut
=============================================  ===========================================================
``preln_moe_universal`` + ``moe.nonorm=1``     MoEUT, peri-LN (``norm_placement="peri"``), G =
                                               ``transformer.universal.group_size``, ``group_type`` abab/aabb.
                                               **Verified against outputs** of the training code (fixture A).
``preln_moe_universal``, G = n_layers, or      the σ-MoE baseline (no sharing; ``moe.att.n_experts=1``,
``preln_moe`` (not shared)                     ``k=1`` in the paper), same layer. By mapping only.
``preln_moe_universal`` + ``moe.nonorm=0``     pre-LN MoEUT (``norm_placement="pre"``). By mapping only.
``moe_universal`` + ``lm.trafo.norm_input=1``  post-LN MoEUT (``norm_placement="post"``: input LayerNorm
                                               without parameters after ×√d embedding scale, no output
                                               LayerNorm). By mapping only.
``preln_rope``                                 the dense pre-LN baseline (``arch="dense"``,
                                               ``d_ff = int(state_size · transformer.ff_multiplier)``).
                                               By mapping only.
=============================================  ===========================================================

"By mapping only" means: the names and semantics were read from the training code's sources and an
export → import round trip is tested; no output of the training code was available for them. Everything
else (SUT variants, XL-style memory ``lm.trafo.context_blocks > 0``, q/k experts, softmax routing, other
activations, an embedding adapter, …) is refused with :class:`UnsupportedVariantError` naming the argument.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable

import torch

from moeut.integrations.paper.reader import PaperCheckpointError
from moeut.model.config import ModelConfig

MOE_VARIANTS = ("preln_moe_universal", "preln_moe", "moe_universal", "moe")
DENSE_VARIANTS = ("preln_rope",)
_MISSING = object()


class UnsupportedVariantError(PaperCheckpointError):
    """The run used an option moeut's models cannot represent; the message names the argument and its value."""

    def __init__(self, arg: str, value: Any, why: str):
        self.arg, self.value = arg, value
        super().__init__(f"run argument {arg}={value!r}: {why}")


# ------------------------------------------------------------------------------------------- raw argparse values
def _none(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and raw.strip().lower() == "none")


def _as_int(raw: Any) -> int:
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, int):
        return raw
    return int(str(raw).strip())


def _as_float(raw: Any) -> float:
    return float(raw) if not isinstance(raw, str) else float(raw.strip())


def _as_bool(raw: Any) -> bool:
    if isinstance(raw, (bool, int)) and not isinstance(raw, float):
        return bool(raw)
    s = str(raw).strip().lower()
    if s in {"1", "true", "yes", "y"}:
        return True
    if s in {"0", "false", "no", "n"}:
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _as_str(raw: Any) -> str:
    return str(raw)


class RunArgs:
    """``run_invariants['args']``: raw argparse values (``'32'``, ``'0.1'``, ``'none'``, ``0``/``1``) parsed on
    demand; keys the code does not read are ignored, a missing key takes the training code's default."""

    def __init__(self, raw: Mapping[str, Any]):
        self.raw = dict(raw)

    def get(self, key: str, parse: Callable[[Any], Any], default: Any = _MISSING, *, optional: bool = False) -> Any:
        if key not in self.raw:
            if default is _MISSING:
                raise PaperCheckpointError(f"run argument {key} is missing from run_invariants['args']; the "
                                           f"checkpoint is not from the MoEUT training code or is too old")
            return default
        value = self.raw[key]
        if optional and _none(value):
            return None
        try:
            return parse(value)
        except (TypeError, ValueError) as e:
            raise PaperCheckpointError(f"run argument {key}={value!r} cannot be read ({e})") from None

    def need(self, key: str, parse: Callable[[Any], Any], default: Any, allowed: Any, why: str) -> Any:
        """The value of ``key``; :class:`UnsupportedVariantError` unless it is ``allowed`` (a value or a set)."""
        value = self.get(key, parse, default)
        ok = value in allowed if isinstance(allowed, (set, frozenset, tuple)) else value == allowed
        if not ok:
            raise UnsupportedVariantError(key, self.raw.get(key, default), why)
        return value


# ---------------------------------------------------------------------------------------------- args → config
def config_from_paper_args(raw_args: Mapping[str, Any], vocab_size: int) -> ModelConfig:
    """The :class:`ModelConfig` of a run of the paper's training code (``vocab_size``: the head's width).

    The arguments are checked in a fixed order (variant, shapes and embedding, layer layout, SwitchHead and
    σ-MoE options, regularisers), so a run with several unsupported options always names the same one."""
    a = RunArgs(raw_args)
    variant = _variant(a)
    common = _common_fields(a, variant, vocab_size)
    if variant in DENSE_VARIANTS:
        d_ff = int(common["d_model"] * a.get("transformer.ff_multiplier", _as_float, 2.0))
        return ModelConfig(arch="dense", group_size=common["n_layers"], d_ff=d_ff, **common)
    layout = _moe_layout(a, variant, common["n_layers"])
    _check_moe_layer(a)
    return ModelConfig(arch="moeut", **layout, **_moe_sizes(a), **common)


def _variant(a: RunArgs) -> str:
    """``transformer.variant``, if moeut has a model for it."""
    variant = a.get("transformer.variant", _as_str)
    if variant not in MOE_VARIANTS + DENSE_VARIANTS:
        raise UnsupportedVariantError(
            "transformer.variant", variant,
            f"moeut imports {', '.join(MOE_VARIANTS + DENSE_VARIANTS)} (SUT variants, post-LN/shared dense "
            f"transformers, parallel and GELU layers have no moeut equivalent)")
    return variant


def _common_fields(a: RunArgs, variant: str, vocab_size: int) -> dict[str, Any]:
    """The fields every variant has (sizes, RoPE, context), after checking the embedding and input options."""
    preln = "preln" in variant
    d = a.get("state_size", _as_int)
    n_layers = a.get("transformer.encoder_n_layers", _as_int)
    n_heads = a.get("transformer.n_heads", _as_int)
    d_head = a.get("transformer.head_projection_size", _as_int, None, optional=True) or d // n_heads

    a.need("embedding_size", _as_str, "none", {"none", "None"},
           "an embedding adapter (embedding_size != state_size) is not part of moeut's models; expected 'none'")
    a.need("lm.trafo.context_blocks", _as_int, 1, 0,
           "attention over the previous windows (Transformer-XL memory) is not modelled by moeut; the paper's "
           "runs use 0")
    a.need("transformer.activation", _as_str, "relu", "relu", "moeut's experts and MLPs use ReLU")
    a.need("lm.trafo.norm_input", _as_bool, False, not preln,
           "moeut's pre-/peri-LN models have no input LayerNorm; its post-LN model has one" if preln else
           "moeut's post-LN model normalises the scaled embedding (the paper's post-LN runs set 1)")
    if not preln:
        a.need("lm.trafo.force_out_norm", _as_bool, False, False,
               "moeut's post-LN model has no output LayerNorm (every layer already ends in one)")
    scale = a.get("transformer.embedding_scale", _as_float, None, optional=True)
    implied = 1.0 if preln else math.sqrt(d)
    if scale is not None and not math.isclose(scale, implied, rel_tol=1e-6):
        raise UnsupportedVariantError("transformer.embedding_scale", a.raw["transformer.embedding_scale"],
                                      f"moeut scales the embedding by {implied:g} for this variant")
    return dict(vocab_size=vocab_size, d_model=d, n_layers=n_layers, n_heads=n_heads, d_head=d_head,
                rope_fraction=a.get("rope.rotate_fraction", _as_float, 0.5),
                rope_base=a.get("rope.base", _as_float, 10000.0),
                context_length=a.get("lm.unroll", _as_int, 1024))


def _moe_layout(a: RunArgs, variant: str, n_layers: int) -> dict[str, Any]:
    """``norm_placement``, ``group_size`` and ``group_order`` of a MoE variant."""
    preln = "preln" in variant
    nonorm = a.get("moe.nonorm", _as_bool, False)
    if preln:
        norm_placement = "peri" if nonorm else "pre"
    elif nonorm:
        raise UnsupportedVariantError("moe.nonorm", a.raw["moe.nonorm"],
                                      f"with the post-LN variant {variant!r} it removes every LayerNorm but the "
                                      f"routers'; moeut has no such model (use 0)")
    else:
        norm_placement = "post"
    if "universal" in variant:
        group_size = a.get("transformer.universal.group_size", _as_int, 1)
        group_order = a.need("transformer.universal.group_type", _as_str, "abab", ("abab", "aabb"),
                             "moeut orders shared layers abab or aabb")
    else:
        group_size, group_order = n_layers, "abab"
    if group_size in (1, n_layers):
        group_order = "abab"  # one layer, or none shared: the order means nothing
    return dict(norm_placement=norm_placement, group_size=group_size, group_order=group_order)


def _check_moe_layer(a: RunArgs) -> None:
    """Refuse SwitchHead / σ-MoE options that moeut's layer does not have."""
    a.need("moe.att.enable", _as_bool, False, True,
           "MoEUT layers use SwitchHead attention; a σ-MoE MLP with dense attention is not a moeut model")
    for key, want in (("moe.att.q_expert", False), ("moe.att.k_expert", False), ("moe.att.v_expert", True),
                      ("moe.att.o_expert", True)):
        a.need(key, _as_bool, True, want, "moeut's SwitchHead has dense q/k and expert v/o projections "
                                          "(q_expert=0, k_expert=0, v_expert=1, o_expert=1, as every paper run)")
    a.need("moe.att.v_size", _as_str, "none", {"none", "None"}, "moeut's value width is the head width")
    a.need("moe.att.same_sel", _as_bool, False, False, "moeut has separate value and output routers")
    a.need("moe.selection_mode", _as_str, "sigmoid", "sigmoid", "moeut's σ-MoE routes with sigmoid gates")
    a.need("moe.att.selection_mode", _as_str, "sigmoid", "sigmoid", "moeut's SwitchHead routes with sigmoid gates")
    for key in ("moe.activation_after_topk", "moe.bias", "moe.sel_bias"):
        a.need(key, _as_bool, False, False, "not part of moeut's σ-MoE")
    ffn_mode = a.need("moe.perplexity_reg_mode", _as_str, "step", "layers_time",
                      "moeut's regulariser pools each layer's router over time and repeats (layers_time)")
    att_mode = a.get("moe.att.perplexity_reg_mode", _as_str, None, optional=True)
    if att_mode is not None and att_mode != ffn_mode:
        raise UnsupportedVariantError("moe.att.perplexity_reg_mode", att_mode,
                                      "moeut's attention regulariser is layers_time, like the σ-MoE one")


def _moe_sizes(a: RunArgs) -> dict[str, Any]:
    """Expert counts and widths, and the regularisers' weights (``reg`` scales both, as in the training code)."""
    reg = a.get("reg", _as_float, 1.0)
    ffn_reg = a.get("moe.perplexity_reg", _as_float, 0.0)
    att_reg = a.get("moe.att.perplexity_reg", _as_float, None, optional=True)
    return dict(att_n_experts=a.get("moe.att.n_experts", _as_int, 4), att_k=a.get("moe.att.k", _as_int, 2),
                ff_n_experts=a.get("moe.n_experts", _as_int, 128),
                ff_expert_size=a.get("moe.expert_size", _as_int, 128), ff_k=a.get("pkm.n_heads", _as_int, 1),
                entropy_reg=reg * ffn_reg, att_entropy_reg=reg * (ffn_reg if att_reg is None else att_reg))


# ------------------------------------------------------------------------------------------------- parameters
# moeut name inside layer g -> the training code's name inside unique_layers.{g}
_MOE_LAYER = {"attention.q.weight": "self_attn.projections.q", "attention.k.weight": "self_attn.projections.k",
              "attention.v": "self_attn.projections.v", "attention.o": "self_attn.projections.o",
              "attention.sel_v": "self_attn.selections.v", "attention.sel_o": "self_attn.selections.o",
              "ffn.keys": "pkm.keys", "ffn.values": "pkm.values", "ffn.expert_sel": "pkm.expert_sel"}
_PERI_NORMS = {"ln1": "self_attn.norm", "ln2": "pkm.norm"}  # moe.nonorm=1: the norms live inside the blocks
_LAYER_NORMS = {"ln1": "norm1", "ln2": "norm2"}  # pre-/post-LN MoE layers and the dense layer
_DENSE_LAYER = {"attention.q.weight": "self_attn.data_to_q.weight", "attention.o.weight": "self_attn.out_proj.weight",
                "ff_in.weight": "linear1.weight", "ff_in.bias": "linear1.bias",
                "ff_out.weight": "linear2.weight", "ff_out.bias": "linear2.bias"}
_DENSE_KV = "self_attn.data_to_kv.weight"  # [k; v] stacked along the output rows
_TOP = {"embedding.weight": "embedding.weight", "lm_head.weight": "output.weight", "lm_head.bias": "output.bias",
        "out_norm.weight": "out_norm.weight", "out_norm.bias": "out_norm.bias"}
IGNORED_BUFFERS = ("pkm.iter", "pkm.kv_sel_counts_100")  # training counters without effect on outputs


def _layer_table(cfg: ModelConfig) -> dict[str, str]:
    if cfg.arch == "dense":
        table = dict(_DENSE_LAYER)
    else:
        table = dict(_MOE_LAYER)
    norms = _PERI_NORMS if cfg.arch == "moeut" and cfg.norm_placement == "peri" else _LAYER_NORMS
    for ours, theirs in norms.items():
        table[f"{ours}.weight"], table[f"{ours}.bias"] = f"{theirs}.weight", f"{theirs}.bias"
    return table


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """moeut parameter name → the training code's (the dense k/v pair is handled apart)."""
    out = {ours: theirs for ours, theirs in _TOP.items() if not (cfg.norm_placement == "post" and ours.startswith("out_norm"))}
    for g in range(cfg.group_size):
        for ours, theirs in _layer_table(cfg).items():
            out[f"layers.{g}.{ours}"] = f"unique_layers.{g}.{theirs}"
    return out


def paper_to_moeut_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig, expected: Mapping[str, torch.Tensor],
                         source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The training code's ``model`` state dict under moeut's names, checked against ``expected`` (a moeut
    model's state dict: names and shapes)."""
    names = name_map(cfg)
    theirs_used = set(names.values())
    out = {ours: state[theirs] for ours, theirs in names.items() if theirs in state}
    if cfg.arch == "dense":
        for g in range(cfg.group_size):
            key = f"unique_layers.{g}.{_DENSE_KV}"
            if key in state:
                k, v = state[key].chunk(2, dim=0)
                out[f"layers.{g}.attention.k.weight"], out[f"layers.{g}.attention.v.weight"] = k, v
                theirs_used.add(key)
    unknown = sorted(k for k in state if k not in theirs_used and not k.endswith(IGNORED_BUFFERS))
    missing = sorted(set(expected) - set(out))
    if unknown or missing:
        theirs_missing = [names.get(k, k) for k in missing]
        raise PaperCheckpointError(f"{source}: the weights do not fit the configuration read from its arguments "
                                   f"(missing {theirs_missing[:6]}, unexpected {unknown[:6]})")
    for k, v in out.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise PaperCheckpointError(f"{source}: tensor {names.get(k, k)} has shape {tuple(v.shape)}, the run's "
                                       f"arguments imply {tuple(expected[k].shape)}")
    return {k: v.detach().to(torch.float32) for k, v in out.items()}


def moeut_to_paper_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> "OrderedDict[str, torch.Tensor]":
    """Inverse of :func:`paper_to_moeut_state` (plus the training code's two σ-MoE counter buffers)."""
    names = name_map(cfg)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for ours, theirs in names.items():
        out[theirs] = state[ours].detach().clone()
    if cfg.arch == "dense":
        for g in range(cfg.group_size):
            out[f"unique_layers.{g}.{_DENSE_KV}"] = torch.cat(
                (state[f"layers.{g}.attention.k.weight"], state[f"layers.{g}.attention.v.weight"]), 0).clone()
    else:
        for g in range(cfg.group_size):
            out[f"unique_layers.{g}.pkm.iter"] = torch.zeros((), dtype=torch.long)
            out[f"unique_layers.{g}.pkm.kv_sel_counts_100"] = torch.zeros(cfg.ff_n_experts, cfg.ff_expert_size)
    return out


def paper_args_for(cfg: ModelConfig) -> dict[str, Any]:
    """Run arguments (raw argparse values, as the training code records them) that describe ``cfg``."""
    if cfg.arch == "sut":
        raise ValueError("the SUT baseline has no paper-checkpoint mapping in moeut")
    args: dict[str, Any] = {
        "state_size": cfg.d_model, "transformer.encoder_n_layers": cfg.n_layers, "transformer.n_heads": cfg.n_heads,
        "transformer.head_projection_size": str(cfg.d_head), "embedding_size": "none", "dropout": 0.0,
        "lm.trafo.context_blocks": 0, "transformer.activation": "relu", "transformer.embedding_scale": "none",
        "rope.rotate_fraction": cfg.rope_fraction, "rope.base": cfg.rope_base, "lm.unroll": cfg.context_length,
        "sentencepiece.n_pieces": cfg.vocab_size, "reg": 1.0, "lm.trafo.force_out_norm": 0,
        "lm.trafo.norm_input": int(cfg.arch == "moeut" and cfg.norm_placement == "post"),
    }
    if cfg.arch == "dense":
        if cfg.d_ff % cfg.d_model:
            raise ValueError(f"d_ff={cfg.d_ff} is not a multiple of d_model={cfg.d_model}; the training code's "
                             f"transformer.ff_multiplier could still express it, but not exactly as a float here")
        args.update({"transformer.variant": "preln_rope", "transformer.ff_multiplier": cfg.d_ff / cfg.d_model})
        return args
    args.update({
        "transformer.variant": "moe_universal" if cfg.norm_placement == "post" else "preln_moe_universal",
        "moe.nonorm": int(cfg.norm_placement == "peri"), "transformer.universal.group_size": cfg.group_size,
        "transformer.universal.group_type": cfg.group_order, "moe.att.enable": 1, "moe.att.q_expert": 0,
        "moe.att.k_expert": 0, "moe.att.v_expert": 1, "moe.att.o_expert": 1, "moe.att.v_size": "none",
        "moe.att.same_sel": 0, "moe.selection_mode": "sigmoid", "moe.att.selection_mode": "sigmoid",
        "moe.activation_after_topk": 0, "moe.bias": 0, "moe.sel_bias": 0, "moe.perplexity_reg_mode": "layers_time",
        "moe.att.perplexity_reg_mode": "none", "moe.perplexity_reg": cfg.entropy_reg,
        "moe.att.perplexity_reg": str(cfg.att_entropy_reg), "moe.att.n_experts": cfg.att_n_experts,
        "moe.att.k": cfg.att_k, "moe.n_experts": cfg.ff_n_experts, "moe.expert_size": cfg.ff_expert_size,
        "pkm.n_heads": cfg.ff_k,
    })
    return args


def to_paper_checkpoint(model, *, step: int = 0) -> dict[str, Any]:
    """A checkpoint dict in the release format (``torch.save`` it to get a ``.ckpt``) holding ``model``: the
    inverse of :func:`moeut.from_paper_checkpoint`, for round-trip tests and for handing a moeut model to the
    training code's tools. No optimizer state (like the release)."""
    cfg = model.cfg
    return {"state": {"iter": step, "epoch": 0}, "run_invariants": {"args": paper_args_for(cfg)},
            "sampler": {"pos": None}, "interface": {}, "scaler": {},
            "model": moeut_to_paper_state(model.state_dict(), cfg)}
