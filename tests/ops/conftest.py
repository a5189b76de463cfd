import contextlib

import pytest

from moeut.ops import use_policy


@pytest.fixture(autouse=True)
def _sorted_path_by_default():
    """Tests use small shapes; make the torch backend take its sort + grouped GEMM path for them (the
    few-slots decoding path has its own tests, which raise the threshold)."""
    with use_policy(few_slots=0):
        yield


@pytest.fixture
def policy():
    """``policy(**changes)``: the torch backend's :class:`~moeut.ops.GemmPolicy` with ``changes``, for the rest
    of the test (``use_policy``, restored when the test ends)."""
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(use_policy(**changes))
