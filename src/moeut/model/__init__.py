"""The MoEUT model: one module per concept of the paper."""

from moeut.model.base import LanguageModel, LMOutput
from moeut.model.build import build_model
from moeut.model.cache import KVCache
from moeut.model.config import ConfigError, ModelConfig
from moeut.model.lm import MoEUTLM
from moeut.model.presets import PAPER_PRESETS, PRESETS
from moeut.model.reference import config_from_reference, from_reference, to_reference
from moeut.model.sut import SUTLM

__all__ = ["ModelConfig", "ConfigError", "MoEUTLM", "build_model", "LMOutput", "LanguageModel", "KVCache", "PRESETS", "PAPER_PRESETS",
           "from_reference", "to_reference", "config_from_reference", "SUTLM"]
