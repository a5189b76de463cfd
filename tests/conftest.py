"""Shared test helpers: locating ../shared data (skip locally when absent, fail under CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOEUT_SHARED", REPO.parent / "shared"))


def shared_file(rel: str) -> Path:
    """Path of a file under ../shared; skips the test when absent, fails when CI=true (it must be there)."""
    path = SHARED / rel
    if not path.exists():
        msg = f"shared data file {path} is missing (set MOEUT_SHARED to the folder holding shared/ data)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def pytest_configure(config):
    # A fresh inductor cache per test session: its FX-graph cache keys do not cover a custom op's fake
    # kernel, so a cache left by an older checkout can hand torch.compile tests stale saved-tensor layouts.
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = config._moeut_inductor_dir = tempfile.mkdtemp(prefix="moeut-inductor-")


def pytest_unconfigure(config):
    path = getattr(config, "_moeut_inductor_dir", None)
    if path:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: that holds folder names too
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
