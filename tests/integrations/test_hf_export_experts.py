"""The exported model's expert matmul: both of its paths equal moeut's reference, and neither syncs with the
host (no ``.tolist()``/``.item()``/``bincount``, no Python ``int``/``bool`` of a tensor)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from moeut.ops.reference import expert_matmul_reference
from tests.run_helpers import load_model
from tests.integrations.conftest import need_hf


@pytest.fixture
def hf_modeling():
    need_hf()
    from moeut.integrations.hf import modeling_moeut  # the file that is exported (it imports no moeut)

    return modeling_moeut


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Inside: every way of reading a tensor's values on the host raises."""
    def boom(*_a, **_k):
        raise AssertionError("host sync in the expert path")

    with monkeypatch.context() as m:
        for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu"):
            m.setattr(torch.Tensor, name, boom)
        m.setattr(torch, "bincount", boom)
        yield


def _case(n, g_in, s, d_in, d_out, e, gated, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g_in, d_in, generator=g).to(dtype)
    w = (torch.randn(e, d_in, d_out, generator=g) / d_in ** 0.5).to(dtype)
    ids = torch.randint(0, e, (n, s), generator=g)
    ids[ids == 1] = 0  # an empty expert
    gates = torch.rand(n, s, generator=g).to(dtype) if gated else None
    return x, ids, w, gates


# budget: 0 → grouped path (FEW_SLOTS 0); 10**9 → one gather; -2: a budget of 2·d_in·d_out where grouped_mm
# would sync (forced here) → gather in chunks of 2 slots
@pytest.mark.parametrize("budget, path", [(0, "grouped"), (10 ** 9, "gather"), (-2, "gather")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, g_in, s, g_out, d_in, d_out, gated", [
    (9, 1, 3, 1, 412, 16, True),   # σ-MoE down-like (gate on the input side), d 412: 824 B rows in bf16
    (9, 1, 3, 3, 16, 82, False),   # up-like, 82 wide outputs
    (7, 2, 4, 2, 10, 10, True),    # SwitchHead-like: groups on both sides, 40 B rows in fp32
    (5, 1, 2, 1, 7, 3, True),      # gate on the output side
])
def test_expert_matmul_paths_match_reference_without_host_syncs(hf_modeling, monkeypatch, budget, path, dtype, n,
                                                                 g_in, s, g_out, d_in, d_out, gated):
    x, ids, w, gates = _case(n, g_in, s, d_in, d_out, 4, gated, dtype)
    monkeypatch.setattr(hf_modeling, "GATHER_BUDGET", budget if budget >= 0 else -budget * d_in * d_out)
    monkeypatch.setattr(hf_modeling, "FEW_SLOTS", 0 if budget == 0 else 10 ** 9)
    if budget < 0:
        monkeypatch.setattr(hf_modeling, "grouped_mm_sync_free", lambda _t: False)
    assert hf_modeling.expert_path(n * s, d_in, d_out, x, needs_grad=False) == path
    want = expert_matmul_reference(x.double(), ids, w.double(), None if gates is None else gates.double(), g_out)
    with torch.no_grad(), no_host_sync(monkeypatch):
        got = hf_modeling.expert_matmul(x, ids, w, gates, out_groups=g_out)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((got.double() - want).norm() / want.norm()) < tol


@pytest.mark.parametrize("budget", [10 ** 9, 2])
def test_gradients_through_the_gather_path_match_reference(hf_modeling, monkeypatch, budget):
    """With autograd the gather path runs (chunked and recomputed in backward when over the budget)."""
    x, ids, w, gates = _case(11, 1, 3, 12, 5, 4, True, torch.float64)
    monkeypatch.setattr(hf_modeling, "GATHER_BUDGET", budget * 12 * 5)
    grad = torch.randn(11, 1, 5, dtype=torch.float64)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, gates)]
        fn(*leaves).backward(grad)
        return [t.grad for t in leaves]

    with no_host_sync(monkeypatch):
        got = run(lambda a, b, c: hf_modeling.expert_matmul(a, ids, b, c, out_groups=1))
    want = run(lambda a, b, c: expert_matmul_reference(a, ids, b, c, 1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_grouped_mm_is_used_only_where_it_is_sync_free(hf_modeling, monkeypatch):
    ok = hf_modeling.grouped_mm_sync_free
    assert ok(torch.empty(0)) and ok(torch.empty(0, dtype=torch.bfloat16))
    assert not ok(torch.empty(0, dtype=torch.float64))
    cuda = torch.device("cuda")
    for major, dtype, want in ((9, torch.bfloat16, True), (10, torch.bfloat16, True), (8, torch.bfloat16, False),
                               (9, torch.float32, False), (9, torch.float16, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d, major=major: (major, 0))
        assert ok(SimpleNamespace(device=cuda, dtype=dtype)) is want, (major, dtype)
    # with autograd, or few slots, always the gather path
    assert hf_modeling.expert_path(10 ** 6, 64, 64, torch.empty(0), needs_grad=True) == "gather"
    assert hf_modeling.expert_path(hf_modeling.FEW_SLOTS, 64, 64, torch.empty(0), needs_grad=False) == "gather"
    assert hf_modeling.expert_path(10 ** 6, 64, 64, torch.empty(0), needs_grad=False) == "grouped"


@pytest.mark.parametrize("budget", [0, 10 ** 9])
def test_exported_model_on_either_path_matches_moeut_without_host_syncs(export_dir, run_dir, monkeypatch, budget):
    """The whole exported model (loaded through transformers) with every expert matmul on one path."""
    from transformers import AutoModelForCausalLM

    ref = load_model(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(export_dir), trust_remote_code=True).eval()
    modeling = __import__(type(hf).__module__, fromlist=["GATHER_BUDGET"])
    monkeypatch.setattr(modeling, "FEW_SLOTS", 0 if budget == 0 else 10 ** 9)
    tokens = torch.randint(0, ref.cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(5))
    calls = []
    real = modeling.expert_path
    monkeypatch.setattr(modeling, "expert_path", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    with torch.no_grad():
        want = ref(tokens).logits
        with no_host_sync(monkeypatch):
            got = modeling.MoEUTForCausalLM.forward(hf, input_ids=tokens).logits
    assert calls and set(calls) == {"grouped" if budget == 0 else "gather"}
    # the run's head is scaled ×20 (logits ~30, fp32 spacing ~2e-6 there): 1e-5 absolute plus 1e-6 relative
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("budget", [0, 10 ** 9])
def test_expert_matmul_has_no_host_sync_on_cuda(hf_modeling, monkeypatch, budget):
    x, ids, w, gates = (t.cuda() for t in _case(64, 1, 4, 412, 128, 8, True, torch.bfloat16))
    monkeypatch.setattr(hf_modeling, "FEW_SLOTS", 0 if budget == 0 else 10 ** 9)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            got = hf_modeling.expert_matmul(x, ids, w, gates, out_groups=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = expert_matmul_reference(x.double(), ids, w.double(), gates.double(), 1)
    assert float((got.double() - want).norm() / want.norm()) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_aligned_copies_have_zero_padding(hf_modeling, dtype):
    """grouped_mm's padded-stride copies hold zeros in their padding: oneDNN's bf16 matmul (CPUs with AMX)
    turns NaN there into NaN results, and new memory may hold anything."""
    t = torch.randn(5, 82).to(dtype)
    out = hf_modeling._row_aligned(t)
    kp = out.stride(0)
    assert kp % (16 // t.element_size()) == 0 and kp > 82 and torch.equal(out, t)
    padded = torch.as_strided(out, (5, kp), (kp, 1))
    assert torch.count_nonzero(padded[:, 82:]) == 0
