"""Model configuration: one dataclass for MoEUT and its dense baseline, validated on construction."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Arch = Literal["moeut", "dense"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """Hyper-parameters of a MoEUT language model (paper, Sec. 2 and Tab. 5) or its dense baseline.

    Field names follow the paper; the reference implementation's keyword names are in brackets.
    """

    arch: Arch = "moeut"  # "moeut" (SwitchHead + σ-MoE, shared layers) or "dense" (pre-LN transformer)
    vocab_size: int = 8000  # tokenizer size (SentencePiece BPE 8000 in the paper) [vocab_size / n_tokens]
    d_model: int = 412  # residual width d [d_model]
    n_layers: int = 16  # number of layer applications (depth) [n_layers]
    group_size: int = 2  # G: distinct layers in a group, repeated n_layers/G times [group_size]
    n_heads: int = 4  # H attention heads [n_heads]
    d_head: int = 82  # d_h width of one head [d_head]
    # SwitchHead attention (MoEUT only)
    att_n_experts: int = 8  # N_A value/output experts per head [att_n_experts]
    att_k: int = 2  # K_A experts selected per head and token [att_k]
    # σ-MoE feed-forward (MoEUT only)
    ff_n_experts: int = 155  # N_E experts [ff_n_experts]
    ff_expert_size: int = 128  # d_expert, width of one expert [ff_expert_size]
    ff_k: int = 12  # K experts selected per token [ff_k]
    # dense baseline only
    d_ff: int = 2053  # hidden width of the dense ReLU MLP
    # regularisation (entropy of the mean router softmax, Sec. 2.3)
    entropy_reg: float = 0.01  # γ, weight of the σ-MoE regulariser [entropy_reg]
    att_entropy_reg: float = 0.001  # δ, weight of the SwitchHead regulariser [att_entropy_reg]
    # positions
    rope_fraction: float = 0.5  # RoPE acts on the first int(fraction·d_head) channels (rounded down to even)
    rope_base: float = 10000.0  # RoPE base
    context_length: int = 1024  # training context T; used for FLOP accounting and as a default

    # filled in by __post_init__
    n_rotate: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
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
        return self.arch == "moeut"

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: {msg}")

        need(self.arch in ("moeut", "dense"), "arch", 'must be "moeut" or "dense"')
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
        if self.arch == "moeut":
            for name in ("att_n_experts", "att_k", "ff_n_experts", "ff_expert_size", "ff_k"):
                need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                     "must be a positive integer")
            need(self.ff_k <= self.ff_n_experts, "ff_k",
                 f"K cannot exceed the number of experts ff_n_experts={self.ff_n_experts}; lower ff_k or add experts")
            need(self.att_k <= self.att_n_experts, "att_k",
                 f"K_A cannot exceed att_n_experts={self.att_n_experts}; lower att_k or add experts")
        else:
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
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (see :data:`moeut.model.presets.PRESETS`), optionally with field overrides."""
        from moeut.model.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]
