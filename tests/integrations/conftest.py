from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.integrations.helpers import make_run, make_tokenizer

# No Hugging Face Hub at test time, and remote code copied into a private folder (not ~/.cache). Set before
# transformers is first imported (it reads these at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_MODULES = tempfile.mkdtemp(prefix="moeut-hf-modules-")
os.environ["HF_MODULES_CACHE"] = _MODULES
atexit.register(shutil.rmtree, _MODULES, ignore_errors=True)


def need_hf() -> None:
    """Skip without transformers/safetensors/tokenizers/protobuf locally; under CI (the dev extra) fail."""
    import importlib

    for mod in ("transformers", "safetensors", "tokenizers", "google.protobuf"):
        try:
            importlib.import_module(mod)
        except ImportError:
            msg = f"{mod} is not installed: pip install -e '.[hf]'"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(msg + " (CI installs the dev extra, which includes it)")
            pytest.skip(msg)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread. With 2 threads on 2 busy cores a 20-token generate() took 15 s here
    instead of 0.15 s (threads spin-waiting for each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tokenizer) -> Path:
    return make_run(tmp_path_factory.mktemp("run"), tokenizer)


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, run_dir) -> Path:
    """``run_dir`` exported (and verified by the exporter itself)."""
    need_hf()
    from moeut.integrations.hf import export_hf

    return export_hf(run_dir, tmp_path_factory.mktemp("export") / "moeut-tiny")


def unregister_moeut_auto() -> None:
    """Undo ``moeut.integrations.hf.register()`` (transformers has no public unregister). Loading an export
    through moeut's loader registers the package's classes with the Auto classes; while they are registered,
    ``trust_remote_code=True`` resolves to them instead of the export's own files."""
    import sys

    hf = sys.modules.get("moeut.integrations.hf")
    if hf is None or not getattr(hf, "_REGISTERED", False):
        return
    from transformers.models.auto import configuration_auto, modeling_auto

    from moeut.integrations.hf.configuration_moeut import MoEUTConfig

    configuration_auto.CONFIG_MAPPING._extra_content.pop("moeut", None)
    for mapping in (modeling_auto.MODEL_MAPPING, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING):
        mapping._extra_content.pop(MoEUTConfig, None)
    hf._REGISTERED = False
