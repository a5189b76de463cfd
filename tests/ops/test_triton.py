"""The Triton backend against the reference: forward and every gradient, odd shapes, deterministic mode.

On a GPU the kernels are compiled. On a CPU machine they run in triton's interpreter, which must be
switched on before triton is first imported (``TRITON_INTERPRET=1``; triton decorates its own
``tl.zeros`` & co. at import): :func:`test_triton_kernels_pass_in_the_interpreter` re-runs this file in
a subprocess with it set, unless this process already has it. Without triton everything here is skipped:
triton is an optional extra (``moeut[triton]``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeut.ops import triton_backend
from tests.ops.test_expert_matmul import assert_close_all, make_case, run

triton = pytest.importorskip("triton", reason="triton is not installed (optional extra: pip install 'moeut[triton]')")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else ("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)
kernels = pytest.mark.skipif(DEVICE is None, reason="on CPU the kernels run in the interpreter subprocess "
                                                    "(test_triton_kernels_pass_in_the_interpreter)")

# (n, g_in, s, g_out, d_in, d_out, n_experts, gated): σ-MoE up/down, SwitchHead V/O, odd widths,
# experts with no rows (n small, E large), one row, k = N_E
CASES = [
    (37, 1, 4, 4, 16, 40, 7, False),  # σ-MoE up-projection
    (37, 4, 4, 1, 24, 16, 7, True),  # σ-MoE down-projection (slots summed, gated)
    (21, 1, 6, 3, 8, 8, 9, True),  # SwitchHead values (3 heads × K_A 2)
    (19, 3, 6, 1, 8, 16, 9, True),  # SwitchHead output
    (5, 2, 6, 2, 33, 17, 6, True),  # odd widths, both groupings
    (3, 1, 2, 1, 16, 16, 40, True),  # most experts get no rows
    (1, 1, 1, 1, 16, 16, 1, True),  # a single row
]


def _interpreter_works() -> str | None:
    """None if triton's interpreter runs a minimal ``tl.dot`` kernel (defined here, not moeut's) correctly,
    else the reason it does not.

    Only this platform check may skip the kernel tests on a CPU machine: moeut's own kernels are not run
    here, so an error or a wrong result in them (a kernel regression) fails the tests that use them instead
    of turning into a skip.
    """
    import triton.language as tl

    @triton.jit
    def dot_16x16(a_ptr, b_ptr, c_ptr):
        r = tl.arange(0, 16)
        idx = r[:, None] * 16 + r[None, :]
        tl.store(c_ptr + idx, tl.dot(tl.load(a_ptr + idx), tl.load(b_ptr + idx)))

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    c = torch.zeros(16, 16)
    try:
        dot_16x16[(1,)](a, b, c)
    except Exception as e:  # noqa: BLE001 — whatever breaks a 16x16 tl.dot is the interpreter's, not moeut's
        return f"triton {triton.__version__}'s interpreter cannot run the kernels: {type(e).__name__}: {e}"
    if not torch.allclose(c, a @ b, atol=1e-3, rtol=1e-3):
        return (f"triton {triton.__version__}'s interpreter cannot run the kernels: a 16x16 tl.dot is off by "
                f"{(c - a @ b).abs().max().item():.3g}")
    return None


@pytest.fixture(scope="module")
def triton_device():
    """"cuda" on a GPU, "cpu" in the interpreter (skipped with the reason if the interpreter cannot run a
    tl.dot kernel at all; moeut's kernels are then checked by the tests themselves)."""
    if DEVICE == "cpu":
        reason = _interpreter_works()
        if reason:
            pytest.skip(reason)
        triton_backend.check_available(torch.device("cpu"))  # raises (an error, not a skip) if it refuses
    return DEVICE


@pytest.mark.slow
@pytest.mark.timeout(960)
@pytest.mark.skipif(DEVICE is not None, reason="the kernels run in this process")
def test_triton_kernels_pass_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__],
                          env=env, cwd=repo, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if "interpreter cannot run the kernels" in out:
        reason = re.search(r"triton .*interpreter cannot run the kernels.*", out).group(0)
        if os.environ.get("CI") == "true":  # CI pins a triton whose interpreter works: this is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    assert proc.returncode == 0, out[-4000:]
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed >= 17, out[-2000:]  # every kernel test ran, none skipped


def _dtypes(device: str) -> list[torch.dtype]:
    # triton's interpreter mishandles bf16 loads/stores (numpy has no bf16): bf16 is tested on GPUs only
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=0.1, rtol=0.05)}


@kernels
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}_g{}_s{}_o{}_d{}x{}_e{}_{}".format(*c))
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_matches_reference_forward_and_all_gradients(triton_device, case, deterministic, monkeypatch):
    monkeypatch.setattr(triton_backend, "DETERMINISTIC", deterministic)
    n, g_in, s, g_out, d_in, d_out, e, gated = case
    for dtype in _dtypes(triton_device):
        got = run(*make_case(n, g_in, s, g_out, d_in, d_out, e, gated, dtype=dtype, device=triton_device),
                  g_out, "triton")
        want = run(*make_case(n, g_in, s, g_out, d_in, d_out, e, gated, dtype=torch.float64), g_out, "reference")
        assert got[0].dtype == dtype
        assert_close_all([t.cpu() for t in got], want, **TOL[dtype])


@kernels
def test_triton_when_k_equals_number_of_experts(triton_device):
    n, e = 9, 5
    ids = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(i)) for i in range(n)])
    case = make_case(n, 1, e, 1, 16, 16, e, True, ids=ids, dtype=torch.float32, device=triton_device)
    want = run(*make_case(n, 1, e, 1, 16, 16, e, True, ids=ids, dtype=torch.float64), 1, "reference")
    assert_close_all([t.cpu() for t in run(*case, 1, "triton")], want, **TOL[torch.float32])


@kernels
def test_triton_deterministic_mode_is_bitwise_reproducible(triton_device, monkeypatch):
    monkeypatch.setattr(triton_backend, "DETERMINISTIC", True)
    case = make_case(64, 4, 4, 1, 32, 16, 6, True, dtype=torch.float32, device=triton_device, seed=3)
    first, second = run(*case, 1, "triton"), run(*case, 1, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_deterministic_mode_follows_torch_setting(monkeypatch):
    monkeypatch.setattr(triton_backend, "DETERMINISTIC", False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert triton_backend.deterministic()
    finally:
        torch.use_deterministic_algorithms(before)
    assert triton_backend.deterministic() == before


@pytest.mark.parametrize("block_m", [16, 32])
def test_tile_schedule_covers_each_experts_rows_once_without_straddling(block_m):
    counts = torch.tensor([0, 5, 40, 0, 16, 1, 33])
    offsets = counts.cumsum(0).to(torch.int32)
    m = int(counts.sum())
    experts, starts, ends = triton_backend.tile_schedule(offsets, m, block_m)
    assert experts.shape[0] == -(-m // block_m) + len(counts)  # the host-known bound
    covered = torch.zeros(m, dtype=torch.long)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), offsets.long()])
    for e, a, b in zip(experts.tolist(), starts.tolist(), ends.tolist()):
        if a == b:
            continue
        assert b - a <= block_m and bounds[e] <= a < b <= bounds[e + 1]  # inside one expert's segment
        covered[a:b] += 1
    assert torch.equal(covered, torch.ones(m, dtype=torch.long))


def test_triton_is_the_default_on_cuda_only_when_available():
    from moeut.ops import default_backend

    assert default_backend("cpu") == "torch"
    if ON_GPU:
        assert default_backend("cuda") == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_triton_at_244m_shapes_on_gpu():
    # σ-MoE of moeut-244m: d 1024, 387 experts × 128, K 16; 2048 tokens
    for dtype, tol in ((torch.bfloat16, dict(atol=0.15, rtol=0.05)), (torch.float32, dict(atol=1e-3, rtol=1e-3))):
        up = make_case(2048, 1, 16, 16, 1024, 128, 387, False, dtype=dtype, device="cuda")
        want = run(*make_case(2048, 1, 16, 16, 1024, 128, 387, False, dtype=torch.float32, device="cuda"), 16, "torch")
        assert_close_all([t.float() for t in run(*up, 16, "triton")], want, **tol)


def test_autotune_modes_choose_config_lists():
    """MOEUT_TRITON_AUTOTUNE: full = every config, pruned = 3 holding the fixed one, off = the fixed one only."""
    from moeut.ops import triton_kernels as k

    for configs, fixed in ((k._gmm_configs, k._GMM_FIXED), (k._wgrad_configs, k._WGRAD_FIXED)):
        full, pruned, off = configs("full"), configs("pruned"), configs("off")
        assert len(full) == 8 and len(pruned) == 3 and len(off) == 1
        keys = lambda c: (tuple(c.kwargs.values()), c.num_warps, c.num_stages)  # noqa: E731
        assert {keys(c) for c in pruned} <= {keys(c) for c in full} and keys(off[0]) == keys(pruned[0])
        assert keys(off[0])[0] + keys(off[0])[1:] == fixed
