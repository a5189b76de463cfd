"""moeut: Mixture-of-Experts Universal Transformers (Csordás et al., NeurIPS 2024) in PyTorch."""

from moeut.model import PRESETS, ConfigError, KVCache, LMOutput, ModelConfig, MoEUTLM, from_reference, to_reference
from moeut.version import __version__

__all__ = ["ModelConfig", "ConfigError", "MoEUTLM", "LMOutput", "KVCache", "PRESETS", "from_reference",
           "to_reference", "__version__"]
