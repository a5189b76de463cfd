"""Model configuration: one dataclass for MoEUT, its baselines (dense, σ-MoE, SUT) and ablations, validated on
construction."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Literal

from moeut.errors import MoeutError
from moeut.model.regularizer import ENTROPY_REG_MODES

Arch = Literal["moeut", "dense", "sut"]
ARCHS = ("moeut", "dense", "sut")
NORM_PLACEMENTS = ("peri", "pre", "post")
GROUP_ORDERS = ("abab", "aabb")
ACT_HALTING_MODES = ("frozen", "skip")
MI_LOSS_FORMS = ("code", "paper")
BALANCING_MODES = ("entropy", "loss_free", "both")


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
    # load balancing of the σ-MoE and SwitchHead routers: "entropy" (the paper's regulariser above), "loss_free"
    # (DeepSeek-V3's auxiliary-loss-free bias: a per-expert bias on the selection scores, nudged after every step by
    # balancing_rate·sign(mean load − load); the entropy regulariser is off) or "both"; see moeut.model.routing
    balancing: str = "entropy"
    balancing_rate: float = 1e-3  # u, the bias update per step (loss_free / both)
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
    # MoEUT-ACT: what a frozen token costs. "frozen": it keeps its state but still runs through every later layer
    # (the first MoEUT-ACT; saved configs without this field); "skip": it does no more work — no query, no
    # experts, its keys and values computed once per distinct layer (moeut.model.skip; a different model)
    act_halting: str = "frozen"
    # MoEUT-ACT with act_halting="skip": a depth budget instead of the act_reg penalty. 0 = off. Else the mean number
    # of group applications a token should *run* (e.g. 2.0 of at most 4): a shift of the halting gate's halt logit
    # (a buffer, saved in checkpoints) moves after every step by act_target_rate·sign(executed mean depth − target),
    # and the ACT loss is −act_depth_entropy·H(mean over tokens of each token's depth distribution), which keeps
    # the tokens spread over the depths (no collapse onto one)
    act_target_depth: float = 0.0
    act_target_rate: float = 0.01
    act_depth_entropy: float = 0.0
    # … and a multiplier λ ≥ 0 of a depth penalty λ·mean E[depth], moved by act_penalty_rate·(executed − target):
    # the slow counter-pressure without which the gate learns to outrun the shift (0 = no penalty)
    act_penalty_rate: float = 0.0
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
    def loss_free(self) -> bool:
        """The routers carry a selection bias moved by loss-free balancing (``balancing`` "loss_free" or "both")."""
        return self.balancing in ("loss_free", "both")

    @property
    def entropy_balancing(self) -> bool:
        """The entropy regulariser is part of the loss (``balancing`` "entropy" or "both")."""
        return self.balancing in ("entropy", "both")

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
        """Raise a ConfigError naming the first invalid field: the fields every architecture shares, then those
        of ``arch`` (each architecture's rules in its own function below)."""
        _validate_shared(self)
        _ARCH_RULES[self.arch](self)

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def to_json(self) -> str:
        """The saved form (``model_config.json``, checkpoints): every field and the schema version."""
        return json.dumps({"schema_version": SCHEMA_VERSION, **self.to_dict()}, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Fields as given (a preset with overrides, a user's dict); read saved configs with :meth:`from_saved`."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_saved(cls, d: dict[str, Any] | str, *, source: str = "the saved configuration") -> "ModelConfig":
        """A configuration moeut wrote (:meth:`to_json`: a run's ``model_config.json``, a checkpoint's, an
        export's), upgraded from the schema version it was written with; ``source`` names it in errors."""
        d = json.loads(d) if isinstance(d, str) else dict(d)
        version = d.pop("schema_version", 1)  # configs written before the version was saved are version 1
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ConfigError(f"{source} has schema_version {version!r}, newer than this moeut reads "
                              f"({SCHEMA_VERSION}): upgrade moeut (pip install -U moeut)")
        for upgrade in _UPGRADES[version - 1:]:
            d = upgrade(d)
        return cls.from_dict(d)

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


def _upgrade_1_to_2(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 configs written before MoEUT had ACT (they lack ``act_halt_bias_init``) carry ``act: true`` for
    every architecture, where it only meant something for SUT: read it as act=false for MoEUT and dense, so
    those runs and exports keep loading as the models they are."""
    if "act_halt_bias_init" in d or d.get("arch", "moeut") == "sut":
        return d
    return {**d, "act": False}


# _UPGRADES[v - 1] turns a version-v config into version v + 1
_UPGRADES: list[Callable[[dict[str, Any]], dict[str, Any]]] = [_upgrade_1_to_2]
SCHEMA_VERSION = len(_UPGRADES) + 1


def _need(cfg: ModelConfig, cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"ModelConfig.{name}={getattr(cfg, name)!r}: {msg}")


def _positive_ints(cfg: ModelConfig, *names: str) -> None:
    for name in names:
        _need(cfg, isinstance(getattr(cfg, name), int) and getattr(cfg, name) > 0, name, "must be a positive integer")


def _validate_shared(cfg: ModelConfig) -> None:
    """The fields every architecture has: sizes, positions, grouping, ACT."""
    _need(cfg, cfg.arch in ARCHS, "arch", 'must be "moeut", "dense" or "sut"')
    _positive_ints(cfg, "vocab_size", "d_model", "n_layers", "group_size", "n_heads", "d_head", "context_length")
    _need(cfg, cfg.n_layers % cfg.group_size == 0, "group_size",
          f"must divide n_layers={cfg.n_layers} (the group of G layers is repeated n_layers/G times); "
          f"choose a divisor such as {_divisors(cfg.n_layers)}")
    _need(cfg, 0.0 <= cfg.rope_fraction <= 1.0, "rope_fraction", "must be in [0, 1]")
    _need(cfg, cfg.rope_base > 0, "rope_base", "must be positive")
    _need(cfg, cfg.group_order in GROUP_ORDERS, "group_order", 'must be "abab" or "aabb"')
    _need(cfg, cfg.norm_placement in NORM_PLACEMENTS, "norm_placement", 'must be "peri", "pre" or "post"')
    _need(cfg, isinstance(cfg.att_norm_init, bool), "att_norm_init", "must be true or false")
    _need(cfg, isinstance(cfg.act, bool), "act", "must be true or false")
    if cfg.act:
        _need(cfg, cfg.act_reg >= 0, "act_reg", "must be >= 0 (0 disables the ACT loss)")
        _need(cfg, 0.0 < cfg.act_threshold < 1.0, "act_threshold", "must be in (0, 1), e.g. 0.999")
        _need(cfg, cfg.group_order == "abab", "group_order",
              'ACT halts between applications of the whole group (A B | A B | …): use group_order="abab"')
    _need(cfg, cfg.act_halting in ACT_HALTING_MODES, "act_halting",
          'must be "frozen" (frozen tokens still computed) or "skip" (halted tokens skip their work)')
    _need(cfg, cfg.act_halting == "frozen" or (cfg.act and cfg.arch == "moeut"), "act_halting",
          'halted tokens skip their work only in MoEUT with ACT (arch="moeut", act=true); leave it "frozen"')
    _need(cfg, isinstance(cfg.act_target_depth, (int, float)) and cfg.act_target_depth >= 0, "act_target_depth",
          "must be a number >= 0 (0: no budget, the act_reg penalty)")
    if cfg.act_target_depth:
        _need(cfg, cfg.act_halting == "skip", "act_target_depth",
              'a depth budget counts the applications tokens run, which only act_halting="skip" saves: set it')
        _need(cfg, 1.0 <= cfg.act_target_depth <= cfg.n_layers // cfg.group_size, "act_target_depth",
              f"must be between 1 and the maximum number of group applications, {cfg.n_layers // cfg.group_size}")
    _need(cfg, min(cfg.act_target_rate, cfg.act_depth_entropy, cfg.act_penalty_rate) >= 0, "act_target_rate",
          "act_target_rate, act_depth_entropy and act_penalty_rate must be >= 0")
    _need(cfg, isinstance(cfg.act_halt_bias_init, (int, float)) and math.isfinite(cfg.act_halt_bias_init),
          "act_halt_bias_init", "must be a finite number (negative = deep start)")
    if cfg.arch != "moeut":
        _not_moeut(cfg)


def _not_moeut(cfg: ModelConfig) -> None:
    """Settings only MoEUT layers have must keep their defaults in the baselines."""
    _need(cfg, cfg.entropy_reg_mode == "sequence", "entropy_reg_mode",
          f'only MoEUT has the entropy regulariser (arch={cfg.arch!r}); leave it at "sequence"')
    _need(cfg, cfg.balancing == "entropy", "balancing",
          f'only MoEUT\'s sigmoid routers have loss-free balancing (arch={cfg.arch!r}); leave it at "entropy"')
    _need(cfg, cfg.norm_placement == "peri", "norm_placement",
          f'only MoEUT layers take a LayerNorm placement (arch={cfg.arch!r} has a fixed one: dense is pre-LN, SUT '
          f'post-LN); leave it at "peri"')
    _need(cfg, not cfg.att_norm_init, "att_norm_init",
          f"only MoEUT layers have SwitchHead V/O experts to renormalise (arch={cfg.arch!r}); leave it false")
    _need(cfg, cfg.act_halt_bias_init == 0.0, "act_halt_bias_init",
          "only MoEUT's halting gate has a bias (needs arch='moeut' and act=true); leave it at 0")


def _experts(cfg: ModelConfig) -> None:
    """The expert counts of MoEUT's and SUT's attention and MLP mixtures."""
    _positive_ints(cfg, "att_n_experts", "att_k", "ff_n_experts", "ff_expert_size", "ff_k")
    _need(cfg, cfg.ff_k <= cfg.ff_n_experts, "ff_k",
          f"K cannot exceed the number of experts ff_n_experts={cfg.ff_n_experts}; lower ff_k or add experts")
    _need(cfg, cfg.att_k <= cfg.att_n_experts, "att_k",
          f"K_A cannot exceed att_n_experts={cfg.att_n_experts}; lower att_k or add experts")


def _validate_moeut(cfg: ModelConfig) -> None:
    """MoEUT (and σ-MoE, the ablations): SwitchHead and σ-MoE experts, the entropy regulariser."""
    _experts(cfg)
    _need(cfg, cfg.entropy_reg >= 0, "entropy_reg", "must be >= 0 (0 disables the σ-MoE regulariser)")
    _need(cfg, cfg.att_entropy_reg >= 0, "att_entropy_reg", "must be >= 0 (0 disables the attention regulariser)")
    _need(cfg, cfg.entropy_reg_mode in ENTROPY_REG_MODES, "entropy_reg_mode",
          'must be "sequence" (per sequence, the paper\'s), "batch" (the micro-batch) or "global" (all '
          'data-parallel ranks)')
    _need(cfg, cfg.balancing in BALANCING_MODES, "balancing",
          'must be "entropy" (the paper\'s regulariser), "loss_free" (a selection bias moved by the load, '
          'DeepSeek-V3\'s) or "both"')
    _need(cfg, isinstance(cfg.balancing_rate, (int, float)) and not isinstance(cfg.balancing_rate, bool)
          and math.isfinite(cfg.balancing_rate) and cfg.balancing_rate >= 0, "balancing_rate",
          "must be a finite number >= 0 (the selection bias's step per update, e.g. 0.001; 0 freezes it)")
    _need(cfg, cfg.act_halt_bias_init == 0.0 or cfg.act, "act_halt_bias_init",
          "only MoEUT's halting gate has a bias (needs arch='moeut' and act=true); leave it at 0")


def _validate_dense(cfg: ModelConfig) -> None:
    """The dense pre-LN baseline: no experts, no sharing, so no depth to halt over."""
    _need(cfg, isinstance(cfg.d_ff, int) and cfg.d_ff > 0, "d_ff", "must be a positive integer")
    _need(cfg, cfg.group_size == 1 or cfg.group_size == cfg.n_layers, "group_size",
          "the dense baseline does not share layers: use group_size = n_layers")
    _need(cfg, not cfg.act, "act",
          "the dense baseline shares no layers, so it has no depth to halt over; use act=false")


def _validate_sut(cfg: ModelConfig) -> None:
    """SUT: mixtures of attention heads and a softmax MoE, the mutual-information loss, relative positions."""
    _experts(cfg)
    _need(cfg, cfg.mi_reg >= 0, "mi_reg", "must be >= 0 (0 disables the mutual-information loss)")
    _need(cfg, cfg.mi_loss in MI_LOSS_FORMS, "mi_loss",
          'must be "code" (H(E|X) + H(E), the SUT authors\' code) or "paper" (H(E|X) - H(E))')
    _need(cfg, isinstance(cfg.sample_topk, int) and 0 <= cfg.sample_topk <= cfg.att_k, "sample_topk",
          f"must be an integer in [0, att_k] = [0, {cfg.att_k}] (it samples attention experts only)")
    _need(cfg, isinstance(cfg.rel_pos_max, int) and cfg.rel_pos_max >= 1, "rel_pos_max",
          "must be a positive integer (relative distances are clipped to ±(rel_pos_max - 1))")


_ARCH_RULES: dict[str, Callable[[ModelConfig], None]] = {"moeut": _validate_moeut, "dense": _validate_dense,
                                                         "sut": _validate_sut}


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]
