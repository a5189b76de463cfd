"""Hugging Face ``transformers`` integration: export a run to a model directory, load it back, register the
model type.

    from moeut.integrations.hf import export_hf, import_hf, register

    export_hf("runs/demo/moeut-tiny", "hf/moeut-tiny")          # = moeut export-hf --checkpoint … --out …
    model = import_hf("hf/moeut-tiny")                          # back to a moeut.MoEUTLM
    register()                                                  # AutoModelForCausalLM without remote code

The exported directory loads with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
where moeut is not installed: ``configuration_moeut.py`` / ``modeling_moeut.py`` in it are self-contained.
transformers (and safetensors, tokenizers, protobuf) are the optional ``hf`` extra: ``pip install
'moeut[hf]'``. This module imports none of them until a function needs it.
"""

from __future__ import annotations

from typing import Any

from moeut.data.errors import DependencyError
from moeut.integrations.hf.export import ExportError, export_hf, hf_config_dict, import_hf, import_hf_run, verify_export
from moeut.run.hf_format import from_hf_state_dict, model_config_from_hf, to_hf_state_dict

__all__ = ["export_hf", "import_hf", "import_hf_run", "verify_export", "register", "ExportError",
           "hf_config_dict", "model_config_from_hf", "to_hf_state_dict", "from_hf_state_dict",
           "MoEUTConfig", "MoEUTForCausalLM", "MoEUTModel"]

_REGISTERED = False


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise DependencyError("the Hugging Face integration needs transformers: pip install 'moeut[hf]'") from e
    return transformers


def register() -> None:
    """Register ``model_type: "moeut"`` with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` so that
    exported directories load without ``trust_remote_code``. Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    transformers = _transformers()
    # the two code files import transformers (optional, the 'hf' extra) at their top
    from moeut.integrations.hf.configuration_moeut import MoEUTConfig
    from moeut.integrations.hf.modeling_moeut import MoEUTForCausalLM, MoEUTModel

    for auto, cls, args in ((transformers.AutoConfig, None, ("moeut", MoEUTConfig)),
                            (transformers.AutoModel, MoEUTModel, (MoEUTConfig, MoEUTModel)),
                            (transformers.AutoModelForCausalLM, MoEUTForCausalLM, (MoEUTConfig, MoEUTForCausalLM))):
        try:
            auto.register(*args, exist_ok=True)
        except TypeError:  # a transformers without exist_ok
            try:
                auto.register(*args)
            except ValueError:  # already registered
                pass
    _REGISTERED = True


def __getattr__(name: str) -> Any:
    """``MoEUTConfig`` / ``MoEUTForCausalLM`` / ``MoEUTModel``, imported (and registered) on first use."""
    if name == "MoEUTConfig":
        _transformers()
        register()
        from moeut.integrations.hf.configuration_moeut import MoEUTConfig  # needs transformers (optional)

        return MoEUTConfig
    if name in ("MoEUTForCausalLM", "MoEUTModel"):
        _transformers()
        register()
        from moeut.integrations.hf import modeling_moeut  # needs transformers (optional)

        return getattr(modeling_moeut, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
