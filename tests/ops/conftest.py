import pytest

from moeut.ops import torch_backend


@pytest.fixture(autouse=True)
def _sorted_path_by_default(monkeypatch):
    """Tests use small shapes; make the torch backend take its sort + grouped GEMM path for them (the
    few-slots decoding path has its own tests, which raise the threshold)."""
    monkeypatch.setattr(torch_backend, "FEW_SLOTS", 0)
