"""Import and export of the authors' reference parameter layout (``MoEUTLM`` of the MoEUT repository).

The layouts differ only by a prefix (``transformer.layers.{g}`` → ``layers.{g}``): converting is a pure
renaming, so parity with the reference checks the model itself, not a conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moeut.model.config import ModelConfig
from moeut.model.lm import MoEUTLM

_REF_PREFIX = "transformer.layers."
_OUR_PREFIX = "layers."

# reference keyword → ModelConfig field (missing keywords take the reference's defaults)
_REF_DEFAULTS: dict[str, Any] = {"att_k": 2, "ff_expert_size": 128, "group_size": 2, "ff_k": 8,
                                 "entropy_reg": 0.01, "att_entropy_reg": 0.001}
_REF_KEYS = {"vocab_size", "n_tokens", "d_model", "n_layers", "n_heads", "d_head", "ff_n_experts",
             "ff_expert_size", "ff_k", "att_n_experts", "att_k", "group_size", "entropy_reg", "att_entropy_reg"}


def config_from_reference(ref_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from the reference's keyword arguments (``vocab_size`` or ``n_tokens``, …)."""
    unknown = sorted(set(ref_config) - _REF_KEYS)
    if unknown:
        raise ValueError(f"unknown reference config keys {unknown}; expected a subset of {sorted(_REF_KEYS)}")
    kw = {**_REF_DEFAULTS, **ref_config}
    if "n_tokens" in kw:
        kw["vocab_size"] = kw.pop("n_tokens")
    if kw.get("att_n_experts", 2) < 2:
        raise ValueError("att_n_experts=1: the reference then uses ungated dense value projections, which "
                         "moeut does not model (moeut keeps sigmoid gates on V and O, as the authors' "
                         "training code does); use att_n_experts >= 2")
    if "d_head" not in kw:
        kw["d_head"] = kw["d_model"] // kw["n_heads"]
    return ModelConfig(arch="moeut", **kw, **overrides)


def from_reference(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | ModelConfig,
                   backend: str | None = None) -> MoEUTLM:
    """Build a :class:`MoEUTLM` holding the weights of a reference ``MoEUTLM`` state dict."""
    cfg = config if isinstance(config, ModelConfig) else config_from_reference(config)
    model = MoEUTLM(cfg, backend=backend)
    ours = {_rename(k, _REF_PREFIX, _OUR_PREFIX): v for k, v in state_dict.items()}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise ValueError(f"reference state dict does not match the config: missing {missing}, "
                         f"unexpected {unexpected}")
    for k, v in ours.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"reference tensor {k!r} has shape {tuple(v.shape)}, the config implies "
                             f"{tuple(expected[k].shape)}: check the config")
    model.load_state_dict(ours, strict=True)
    return model


def to_reference(model: MoEUTLM) -> dict[str, torch.Tensor]:
    """The model's weights in the reference ``MoEUTLM`` layout (inverse of :func:`from_reference`)."""
    if not model.cfg.is_moe:
        raise ValueError("to_reference: only MoEUT models have a reference layout (got a dense model)")
    return {_rename(k, _OUR_PREFIX, _REF_PREFIX): v for k, v in model.state_dict().items()}


def _rename(key: str, old: str, new: str) -> str:
    return new + key[len(old):] if key.startswith(old) else key
