"""moeut: Mixture-of-Experts Universal Transformers (Csordás et al., NeurIPS 2024) in PyTorch."""

from moeut.model import PRESETS, ConfigError, KVCache, LMOutput, ModelConfig, MoEUTLM, from_reference, to_reference
from moeut.version import __version__

__all__ = ["ModelConfig", "ConfigError", "MoEUTLM", "LMOutput", "KVCache", "PRESETS", "from_reference",
           "to_reference", "from_paper_checkpoint", "__version__"]


def __getattr__(name: str):
    # moeut.from_paper_checkpoint, resolved on first use: the integrations sit above moeut.run, which
    # `import moeut` (model and presets only) does not load
    if name == "from_paper_checkpoint":
        from moeut.integrations.paper import from_paper_checkpoint

        return from_paper_checkpoint
    raise AttributeError(f"module 'moeut' has no attribute {name!r}")
