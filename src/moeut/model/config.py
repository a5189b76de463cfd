"""Model configuration: one dataclass for MoEUT, its baselines (dense, σ-MoE, SUT) and ablations, validated on
construction."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from moeut.errors import MoeutError
from moeut.model.regularizer import ENTROPY_REG_MODES

Arch = Literal["moeut", "dense", "sut"]
ARCHS = ("moeut", "dense", "sut")
NORM_PLACEMENTS = ("peri", "pre", "post")
GROUP_ORDERS = ("abab", "aabb")
MI_LOSS_FORMS = ("code", "paper")


class ConfigError(MoeutError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """Hyper-parameters of a MoEUT language model (paper, Sec. 2 and Tab. 5) or one of its baselines.

    Field names follow the paper; the reference implementation's keyword names are in brackets. The σ-MoE
    baseline is ``arch="moeut"`` with ``group_size = n_layers`` and ``att_n_experts = att_k = 1``. For
    ``arch="sut"`` (Sparse Universal Transformer, :mod:`moeut.model.sut`) the shared fields mean: ``n_heads``
    heads *per attention expert* (an expert's width is ``n_heads·d_head``), ``att_n_experts``/``att_k`` the
    query/output experts N_A and K_A, ``ff_*`` the softmax-MoE MLP; ``entropy_reg``, ``att_entropy_reg``,
    ``rope_*`` and ``norm_placement`` are not used (SUT is post-LN with relative positions).
    """

    arch: Arch = "moeut"  # "moeut" (SwitchHead + σ-MoE, shared layers), "dense" (pre-LN transformer) or "sut"
    vocab_size: int = 8000  # tokenizer size (SentencePiece BPE 8000 in the paper) [vocab_size / n_tokens]
    d_model: int = 412  # residual width d [d_model]
    n_layers: int = 16  # number of layer applications (depth) [n_layers]
    group_size: int = 2  # G: distinct layers in a group, repeated n_layers/G times [group_size]
    n_heads: int = 4  # H attention heads [n_heads]
    d_head: int = 82  # d_h width of one head [d_head]
    # SwitchHead attention (MoEUT only)
    att_n_experts: int = 8  # N_A value/output experts per head [att_n_experts]
    att_k: int = 2  # K_A experts selected per head and token [att_k]
    # init only: renormalise the V/O experts across the expert axis keeping their std, as the paper's
    # training code under moe.att.norm_init=1 (set by every ≥126M paper run, not by the 44M ones)
    att_norm_init: bool = False
    # σ-MoE feed-forward (MoEUT only)
    ff_n_experts: int = 155  # N_E experts [ff_n_experts]
    ff_expert_size: int = 128  # d_expert, width of one expert [ff_expert_size]
    ff_k: int = 12  # K experts selected per token [ff_k]
    # dense baseline only
    d_ff: int = 2053  # hidden width of the dense ReLU MLP
    # regularisation (entropy of the mean router softmax, Sec. 2.3)
    entropy_reg: float = 0.01  # γ, weight of the σ-MoE regulariser [entropy_reg]
    att_entropy_reg: float = 0.001  # δ, weight of the SwitchHead regulariser [att_entropy_reg]
    # where the regulariser's mean softmax is taken: "sequence" (the paper's: per sequence), "batch" (the whole
    # micro-batch) or "global" (the micro-batches of all data-parallel ranks); see moeut.model.regularizer
    entropy_reg_mode: str = "sequence"
    # positions
    rope_fraction: float = 0.5  # RoPE acts on the first int(fraction·d_head) channels (rounded down to even)
    rope_base: float = 10000.0  # RoPE base
    context_length: int = 1024  # training context T; used for FLOP accounting and as a default
    # ablations of the MoEUT layer (Sec. 3.5 / 3.6); the defaults are the paper's MoEUT
    norm_placement: str = "peri"  # "peri" (Sec. 2.4), "pre" (x += f(LN(x))) or "post" (x = LN(x + f(x)))
    group_order: str = "abab"  # application order of the G layers: "abab" (A B A B …) or "aabb" (A A … B B …)
    # ACT halting (stick-breaking, moeut.model.act): SUT (Tan et al., 2023, as configured in the MoEUT paper)
    # halts over layer applications; MoEUT (beyond the paper) over applications of the whole group of G layers
    act: bool | None = None  # None = the architecture's default: on for SUT ("SUT without ACT": false), off else
    act_reg: float = 0.01  # weight of the ACT loss (the expected number of (group) applications per token)
    act_threshold: float = 0.999  # a token freezes once its probability of never halting is < 1 - threshold
    # MoEUT only: initial bias of the halting gate's halt logit over its continue logit; 0 = g_halt = 1/2 as SUT,
    # negative = "deep start" (tokens initially do not halt: e.g. -3 gives g_halt = σ(-3) ≈ 0.05)
    act_halt_bias_init: float = 0.0
    mi_reg: float = 0.001  # weight of the mutual-information router loss (each attention and MLP MoE)
    mi_loss: str = "code"  # "code": H(E|X) + H(E), as the SUT authors' code; "paper": H(E|X) - H(E) = -MI
    sample_topk: int = 0  # training only: the last sample_topk of the att_k attention experts are sampled
    rel_pos_max: int = 64  # relative-position table of 2·rel_pos_max+1 rows; distances clipped to ±(max-1)

    # filled in by __post_init__
    n_rotate: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.act is None:
            self.act = self.arch == "sut"
        self.validate()
        n_rot = int(self.rope_fraction * self.d_head)
        self.n_rotate = n_rot - n_rot % 2  # RoPE rotates channel pairs: odd widths round down, as the authors do

    # ------------------------------------------------------------------ derived
    @property
    def n_repeats(self) -> int:
        """How often the group of G distinct layers is applied (n_layers / G)."""
        return self.n_layers // self.group_size

    @property
    def is_moe(self) -> bool:
        """True for MoEUT layers (MoEUT, σ-MoE and the LayerNorm / grouping ablations)."""
        return self.arch == "moeut"

    @property
    def is_sut(self) -> bool:
        return self.arch == "sut"

    def applications(self, repeats: int | None = None) -> int:
        """Layer applications of one forward pass when the group is applied ``repeats`` times (None = as
        trained, n_layers). Depth at inference: any ``repeats >= 1`` for MoEUT and SUT; the dense baseline
        shares no layers, so only its trained depth (repeats = 1) exists."""
        if repeats is None:
            return self.n_layers
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ConfigError(f"repeats={repeats!r}: must be a positive integer (how often the group of "
                              f"G={self.group_size} shared layers is applied; trained: {self.n_repeats})")
        if self.arch == "dense" and repeats != 1:
            raise ConfigError(f"repeats={repeats}: the dense baseline shares no layers (G = n_layers = "
                              f"{self.n_layers}), so its depth cannot change; use repeats=1 or a MoEUT/SUT model")
        return repeats * self.group_size

    def layer_index(self, application: int, repeats: int | None = None) -> int:
        """Which of the G distinct layers runs at absolute layer application ``application`` when the group is
        applied ``repeats`` times (None = as trained). ``"abab"``: ``application mod G``; ``"aabb"``: each
        distinct layer runs ``repeats`` times in a row (A…A B…B), so R keeps meaning "applications per layer"."""
        r = self.n_repeats if repeats is None else repeats
        if self.group_order == "aabb":
            return application // r
        return application % self.group_size

    def with_repeats(self, repeats: int) -> "ModelConfig":
        """The same model with its group applied ``repeats`` times (``n_layers = repeats·G``): depth chosen at
        inference. Parameter shapes do not depend on ``n_layers``, so a checkpoint loads into either."""
        return self.replace(n_layers=self.applications(repeats))

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: {msg}")

        need(self.arch in ARCHS, "arch", 'must be "moeut", "dense" or "sut"')
        for name in ("vocab_size", "d_model", "n_layers", "group_size", "n_heads", "d_head", "context_length"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                 "must be a positive integer")
        need(self.n_layers % self.group_size == 0, "group_size",
             f"must divide n_layers={self.n_layers} (the group of G layers is repeated n_layers/G times); "
             f"choose a divisor such as {_divisors(self.n_layers)}")
        need(0.0 <= self.rope_fraction <= 1.0, "rope_fraction", "must be in [0, 1]")
        need(self.rope_base > 0, "rope_base", "must be positive")
        need(self.entropy_reg >= 0, "entropy_reg", "must be >= 0 (0 disables the σ-MoE regulariser)")
        need(self.att_entropy_reg >= 0, "att_entropy_reg", "must be >= 0 (0 disables the attention regulariser)")
        need(self.entropy_reg_mode in ENTROPY_REG_MODES, "entropy_reg_mode",
             'must be "sequence" (per sequence, the paper\'s), "batch" (the micro-batch) or "global" (all '
             'data-parallel ranks)')
        need(self.entropy_reg_mode == "sequence" or self.arch == "moeut", "entropy_reg_mode",
             f'only MoEUT has the entropy regulariser (arch={self.arch!r}); leave it at "sequence"')
        need(self.norm_placement in NORM_PLACEMENTS, "norm_placement", 'must be "peri", "pre" or "post"')
        need(self.group_order in GROUP_ORDERS, "group_order", 'must be "abab" or "aabb"')
        if self.arch != "moeut":
            need(self.norm_placement == "peri", "norm_placement",
                 f'only MoEUT layers take a LayerNorm placement (arch={self.arch!r} has a fixed one: dense is '
                 f'pre-LN, SUT post-LN); leave it at "peri"')
        need(isinstance(self.att_norm_init, bool), "att_norm_init", "must be true or false")
        need(not self.att_norm_init or self.arch == "moeut", "att_norm_init",
             f"only MoEUT layers have SwitchHead V/O experts to renormalise (arch={self.arch!r}); leave it false")
        if self.arch in ("moeut", "sut"):
            for name in ("att_n_experts", "att_k", "ff_n_experts", "ff_expert_size", "ff_k"):
                need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                     "must be a positive integer")
            need(self.ff_k <= self.ff_n_experts, "ff_k",
                 f"K cannot exceed the number of experts ff_n_experts={self.ff_n_experts}; lower ff_k or add experts")
            need(self.att_k <= self.att_n_experts, "att_k",
                 f"K_A cannot exceed att_n_experts={self.att_n_experts}; lower att_k or add experts")
        need(isinstance(self.act, bool), "act", "must be true or false")
        need(not self.act or self.arch != "dense", "act",
             "the dense baseline shares no layers, so it has no depth to halt over; use act=false")
        if self.act:
            need(self.act_reg >= 0, "act_reg", "must be >= 0 (0 disables the ACT loss)")
            need(0.0 < self.act_threshold < 1.0, "act_threshold", "must be in (0, 1), e.g. 0.999")
        need(isinstance(self.act_halt_bias_init, (int, float)) and math.isfinite(self.act_halt_bias_init),
             "act_halt_bias_init", "must be a finite number (negative = deep start)")
        need(not self.act or self.group_order == "abab", "group_order",
             'ACT halts between applications of the whole group (A B | A B | …): use group_order="abab"')
        need(self.act_halt_bias_init == 0.0 or (self.act and self.arch == "moeut"), "act_halt_bias_init",
             "only MoEUT's halting gate has a bias (needs arch='moeut' and act=true); leave it at 0")
        if self.arch == "sut":
            need(self.mi_reg >= 0, "mi_reg", "must be >= 0 (0 disables the mutual-information loss)")
            need(self.mi_loss in MI_LOSS_FORMS, "mi_loss",
                 'must be "code" (H(E|X) + H(E), the SUT authors\' code) or "paper" (H(E|X) - H(E))')
            need(isinstance(self.sample_topk, int) and 0 <= self.sample_topk <= self.att_k, "sample_topk",
                 f"must be an integer in [0, att_k] = [0, {self.att_k}] (it samples attention experts only)")
            need(isinstance(self.rel_pos_max, int) and self.rel_pos_max >= 1, "rel_pos_max",
                 "must be a positive integer (relative distances are clipped to ±(rel_pos_max - 1))")
        elif self.arch == "dense":
            need(isinstance(self.d_ff, int) and self.d_ff > 0, "d_ff", "must be a positive integer")
            need(self.group_size == 1 or self.group_size == self.n_layers, "group_size",
                 "the dense baseline does not share layers: use group_size = n_layers")

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**_upgrade_pre_moeut_act(d))

    def replace(self, **changes: Any) -> "ModelConfig":
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (see :data:`moeut.model.presets.PRESETS`), optionally with field overrides."""
        from moeut.model.presets import PRESETS  # presets are ModelConfigs: importing at the top would be a cycle

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def parse_overrides(items, *, flag: str = "--model") -> dict[str, Any]:
    """``["field=value", …]`` → ModelConfig overrides; a value is JSON where it parses (numbers, booleans,
    lists), else the string itself. ``flag`` names the option in the error message."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} expects FIELD=VALUE (e.g. {flag} d_model=256), got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_preset(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:field=value,field=value"`` → (preset, ModelConfig overrides)."""
    name, _, rest = spec.partition(":")
    try:
        return name, parse_overrides(filter(None, rest.split(",")), flag=f"preset {spec!r}:")
    except ConfigError as e:
        raise ConfigError(f"{e}; overrides are field=value pairs separated by commas") from e


# fields that only a complete dump (``to_dict``) of a MoEUT/dense config holds, never a preset with overrides
_DUMP_MARKERS = ("act_reg", "act_threshold", "mi_reg", "mi_loss", "rel_pos_max", "d_ff", "sample_topk")


def _upgrade_pre_moeut_act(d: dict[str, Any]) -> dict[str, Any]:
    """A complete config written before MoEUT had ACT (it lacks ``act_halt_bias_init``) carries ``act: true``
    for every architecture, where it only meant something for SUT: read it as act=false for MoEUT and dense,
    so those runs and exports keep loading as the models they are."""
    if "act_halt_bias_init" in d or d.get("arch", "moeut") == "sut" or d.get("act") is not True:
        return d
    if not all(k in d for k in _DUMP_MARKERS):
        return d  # a partial dict (a preset with overrides): act=true is meant
    return {**d, "act": False}


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]
