"""The one place that maps a :class:`ModelConfig` to a model class."""

from __future__ import annotations

from torch import nn

from moeut.model.config import ModelConfig
from moeut.model.lm import MoEUTLM
from moeut.model.sut import SUTLM


def build_model(cfg: ModelConfig, backend: str | None = None) -> nn.Module:
    """The language model for ``cfg.arch``: SUT for ``"sut"``, :class:`MoEUTLM` for MoEUT and dense."""
    if cfg.is_sut:
        return SUTLM(cfg, backend=backend)
    return MoEUTLM(cfg, backend=backend)
