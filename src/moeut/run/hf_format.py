"""The weights and config of a directory written by ``moeut export-hf`` (or saved by transformers'
``save_pretrained``), read back into moeut: names, config mapping and safetensors loading. The writer is
:mod:`moeut.integrations.hf.export`; both sides use the mappings defined here.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch

from moeut.data.errors import DependencyError
from moeut.errors import MoeutError
from moeut.model import ModelConfig, build_model
from moeut.run.layout import HF_CONFIG

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# moeut ModelConfig field -> transformers config name (every other field keeps its name)
HF_NAMES = {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "d_head": "head_dim", "context_length": "max_position_embeddings"}
# moeut parameter-name prefix -> transformers prefix
PREFIXES = (("embedding.", "model.embed_tokens."), ("layers.", "model.layers."), ("out_norm.", "model.norm."),
            ("halting.", "model.halting."), ("act_lambda", "model.act_lambda"), ("lm_head.", "lm_head."))


class HFFormatError(MoeutError, ValueError):
    """A Hugging Face model directory cannot be read as (or written from) a moeut model; the message says why."""


def need(module: str, what: str) -> Any:
    """Import an optional Hugging Face dependency, or raise a DependencyError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DependencyError(f"{what} needs the optional Hugging Face dependencies ({e.name} is missing): "
                              f"pip install 'moeut[hf]'") from e


def is_hf_export(path: str | Path) -> bool:
    """True for a directory holding a transformers ``config.json`` with ``model_type: "moeut"``."""
    cfg = Path(path) / HF_CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "moeut"
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def model_config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """The :class:`moeut.ModelConfig` of an export's ``config.json`` dict."""
    if d.get("model_type") != "moeut":
        raise HFFormatError(f"config.json has model_type {d.get('model_type')!r}, not 'moeut'")
    kwargs = {}
    for f in dataclasses.fields(ModelConfig):
        key = HF_NAMES.get(f.name, f.name)
        if f.init and key in d:
            kwargs[f.name] = d[key]
    cfg = ModelConfig.from_saved(kwargs, source="the export's config.json")
    # an export may set a depth at inference (``repeats``: the group applied that many times)
    return cfg if d.get("repeats") is None else cfg.with_repeats(d["repeats"])


def _rename(key: str, prefixes) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    raise HFFormatError(f"unexpected parameter {key!r}: not a MoEUT model state dict")


def to_hf_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Rename a moeut model's state dict to the exported model's names."""
    return {_rename(k, PREFIXES): v for k, v in state.items()}


def from_hf_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Rename an exported model's state dict back to moeut names."""
    return {_rename(k, [(b, a) for a, b in PREFIXES]): v for k, v in state.items()}


def load_hf_weights(hf_dir: Path) -> dict[str, Any]:
    safetensors_torch = need("safetensors.torch", "loading an exported model")
    if (hf_dir / WEIGHTS).is_file():
        return safetensors_torch.load_file(str(hf_dir / WEIGHTS))
    index = hf_dir / WEIGHTS_INDEX
    if index.is_file():  # sharded (e.g. saved by transformers' save_pretrained)
        state: dict[str, Any] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(safetensors_torch.load_file(str(hf_dir / shard)))
        return state
    raise FileNotFoundError(f"{hf_dir} holds no {WEIGHTS} (or {WEIGHTS_INDEX}); is it a `moeut export-hf` directory?")


def load_hf_model(hf_dir: str | Path, *, backend: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A moeut model (fp32, eval mode) with the weights of an exported (or transformers-saved) MoEUT
    directory, and the directory's ``config.json``. Needs safetensors, not transformers."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / HF_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} does not exist; pass a directory written by `moeut export-hf`")
    hf_cfg = json.loads(cfg_path.read_text())
    model = build_model(model_config_from_hf(hf_cfg), backend=backend)
    state = {k: v.to(torch.float32) for k, v in from_hf_state_dict(load_hf_weights(hf_dir)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HFFormatError(f"{hf_dir}: the weights do not fit the config (missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]})")
    return model.eval(), hf_cfg
