"""The torch backend at widths whose rows are not 16-byte multiples (moeut-44m: d_model 412, d_head 82).

grouped_mm refuses such row strides; the backend pads the row stride instead of looping over experts.
These tests check the layout rule against the real op, the padded path against the reference op
(forward and every gradient, fp32 and bf16), and that no per-expert loop (host sync) runs where
grouped_mm is the path. On a CPU, bf16 takes the block layout or the bucketed loop of ``mm`` instead
(:mod:`moeut.ops.policy`): there the same tests check that path at the same widths, and that it never builds a
padded operand.
"""

from __future__ import annotations

import pytest
import torch

from moeut.ops import current_policy, expert_matmul, grouped_mm_layout, sigma_moe_experts, sorted_gemm, use_policy
from moeut.ops import strategy as st
from moeut.ops.grouped_mm_layout import aligned, aligned_empty, grouped_mm_works, layout_ok
from moeut.ops.plan import ExpertPlan, make_plan
from moeut.ops.reference import expert_matmul_reference

ODD_WIDTHS = [412, 82, 3, 7]
DTYPES = [torch.float32, torch.bfloat16]


def _have_grouped_mm(dtype: torch.dtype) -> bool:
    return grouped_mm_works("cpu", dtype)  # the backend's own cached probe


def _grouped_path(dtype: torch.dtype) -> bool:
    """Does the backend run grouped_mm (with padded rows) for CPU tensors of ``dtype``?"""
    return current_policy().choose(torch.device("cpu"), dtype, 10_000).kernel == st.GROUPED_MM


def _boom(what: str):
    def boom(*_a, **_k):
        raise AssertionError(what)
    return boom


@pytest.fixture
def expected_path(monkeypatch):
    """``expected_path(dtype)``: where grouped_mm is the path for ``dtype``, make every per-expert loop
    (and the host sync it starts with) raise; where the bucketed loop is (CPU bf16), make building a
    padded-stride operand raise instead."""
    for dtype in DTYPES:  # probe first: the probe compares grouped_mm against the loop
        _have_grouped_mm(dtype)

    def expect(dtype: torch.dtype) -> None:
        if _grouped_path(dtype):  # every loop over experts starts with the host sync of counts_list
            monkeypatch.setattr(ExpertPlan, "counts_list", _boom("the per-expert loop fallback ran"))
        else:
            boom = _boom("a padded operand was built for the mm loop")
            monkeypatch.setattr(sorted_gemm, "aligned_empty", boom)
            monkeypatch.setattr(grouped_mm_layout, "aligned", boom)
    return expect


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(412, 8), (8, 412), (16, 82), (82, 16), (3, 7), (7, 3), (16, 16)])
def test_layout_rule_agrees_with_grouped_mm(dtype, rows, cols):
    """_layout_ok says "accepted" exactly when grouped_mm accepts the operand (here, on CPU)."""
    if not _have_grouped_mm(dtype):
        pytest.skip(f"grouped_mm unavailable for cpu/{dtype}")
    offs = torch.tensor([2, 2, 5], dtype=torch.int32)
    a = torch.randn(5, rows, dtype=dtype)
    b = torch.randn(3, rows, cols, dtype=dtype)
    try:
        grouped_mm_layout._grouped_mm(a, b, offs=offs)
        accepted = True
    except RuntimeError as e:
        assert "16 bytes" in str(e)
        accepted = False
    assert accepted == (layout_ok(a) and layout_ok(b))
    # padded copies are always accepted and give the same product as a loop of mm
    got = grouped_mm_layout.grouped_mm(a, b, offs)
    want = torch.cat([a[:2] @ b[0], a[2:5] @ b[2]])
    torch.testing.assert_close(got[:2].float(), want[:2].float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[2:].float(), want[2:].float(), atol=1e-2, rtol=1e-2)
    # a column-major operand (a transposed weight) is padded along its contiguous dimension
    bt = aligned(b.transpose(1, 2))
    assert bt.stride(-2) == 1 and layout_ok(bt) and torch.equal(bt, b.transpose(1, 2))


def test_padded_buffers_have_16_byte_row_strides():
    like = torch.empty(0, dtype=torch.bfloat16)
    t = aligned_empty((5, 412), like)
    assert t.shape == (5, 412) and t.stride() == (416, 1)
    assert aligned_empty((5, 3), torch.empty(0)).stride() == (4, 1)
    assert aligned_empty((5, 16), like).is_contiguous()


def _case(n, g_in, s, d_in, d_out, e, gated, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g_in, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(e, d_in, d_out, generator=g, dtype=torch.float64) / d_in ** 0.5
    ids = torch.randint(0, e, (n, s), generator=g)
    ids[0, 0] = e - 1  # the last expert is used; expert 1 may be empty
    ids[ids == 1] = 0
    gates = torch.rand(n, s, generator=g, dtype=torch.float64) if gated else None
    return x, ids, w, gates


def _fwd_bwd(fn, x, w, gates, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    gl = gates.detach().clone().requires_grad_() if gates is not None else None
    y = fn(leaves[0], leaves[1], gl)
    y.backward(grad)
    return [y.detach(), leaves[0].grad, leaves[1].grad] + ([gl.grad] if gl is not None else [])


@pytest.mark.parametrize("save", ["cpu", "never"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", ODD_WIDTHS)
@pytest.mark.parametrize("g_in, s, g_out, gated, other", [
    (1, 2, 1, True, 16),   # σ-MoE down-projection like: odd d_out, summed slots, gated
    (1, 2, 2, False, 16),  # up-projection like, odd d_in (width on the input side below)
    (2, 4, 2, True, 5),    # SwitchHead like: groups on both sides, both widths odd
])
def test_padded_grouped_path_matches_reference(width, dtype, save, g_in, s, g_out, gated, other, expected_path,
                                               policy):
    if not _have_grouped_mm(dtype):
        pytest.skip(f"grouped_mm unavailable for cpu/{dtype}")
    policy(save_gathered=save)
    expected_path(dtype)
    for d_in, d_out in ((width, other), (other, width)):
        x, ids, w, gates = _case(24, g_in, s, d_in, d_out, 4, gated, seed=width + d_in)
        grad = torch.randn(24, g_out, d_out, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        cast = [None if t is None else t.to(dtype) for t in (x, w, gates, grad)]
        got = _fwd_bwd(lambda a, b, c: expert_matmul(a, ids, b, c, out_groups=g_out, backend="torch"), *cast)
        # the reference in fp64 on the same (rounded) inputs
        want = _fwd_bwd(lambda a, b, c: expert_matmul_reference(a, ids, b, c, g_out),
                        *[None if t is None else t.double() for t in cast])
        for name, a, b in zip(["y", "grad_x", "grad_w", "grad_gates"], got, want):
            assert a.dtype == dtype and a.shape == b.shape, name
            assert a.is_contiguous(), name
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert _rel_err(a, b) < tol, f"{name} at d_in {d_in}, d_out {d_out}: rel err {_rel_err(a, b):.2e}"


@pytest.mark.parametrize("save", ["cpu", "never"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d, d_e", [(412, 128), (82, 7), (3, 16), (7, 3)])
@pytest.mark.parametrize("bucket", [4, 64])  # CPU bf16's row bucket (borrowed rows, tail padding / all tail)
def test_fused_sigma_moe_at_odd_widths_matches_reference(d, d_e, dtype, save, bucket, expected_path, policy):
    if not _have_grouped_mm(dtype):
        pytest.skip(f"grouped_mm unavailable for cpu/{dtype}")
    policy(save_gathered=save, row_bucket=bucket)
    expected_path(dtype)
    g = torch.Generator().manual_seed(d * d_e)
    n, k, e = 20, 3, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    keys = torch.randn(e, d, d_e, generator=g, dtype=torch.float64) / d ** 0.5
    values = torch.randn(e, d_e, d, generator=g, dtype=torch.float64) / d_e ** 0.5
    ids = torch.randint(0, e, (n, k), generator=g)
    gates = torch.rand(n, k, generator=g, dtype=torch.float64)
    grad = torch.randn(n, d, generator=g, dtype=torch.float64)
    ins = [t.to(dtype) for t in (x, keys, values, gates)]

    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        y = fn(*leaves)
        y.backward(grad.to(y.dtype))
        return [y.detach()] + [t.grad for t in leaves]

    plan = make_plan(ids, e)
    got = run(lambda a, w1, w2, c: sigma_moe_experts(a, ids, c, w1, w2, backend="torch", plan=plan), ins)

    def ref(a, w1, w2, c):
        h = torch.relu(expert_matmul_reference(a.unsqueeze(1), ids, w1, None, k))
        return expert_matmul_reference(h, ids, w2, c, 1).squeeze(1)

    want = run(ref, [t.double() for t in ins])
    for name, a, b in zip(["y", "grad_x", "grad_keys", "grad_values", "grad_gates"], got, want):
        assert a.dtype == dtype and a.shape == b.shape and a.is_contiguous(), name
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert _rel_err(a, b) < tol, f"{name} at d {d}, d_e {d_e}: rel err {_rel_err(a, b):.2e}"


def test_float64_has_no_grouped_mm_and_takes_the_loop():
    """The path choice is explicit: grouped_mm's dtypes are fp32/bf16/fp16; fp64 runs a loop (of ``mm`` over
    the gathered rows on a CPU, where they are kept for backward)."""
    assert not grouped_mm_works("cpu", torch.float64)
    assert current_policy().choose(torch.device("cpu"), torch.float64, 10_000).kernel == st.MM
    with use_policy(save_gathered="never"):
        assert current_policy().choose(torch.device("cpu"), torch.float64, 10_000).kernel == st.LOOP
    if _have_grouped_mm(torch.float32):
        assert current_policy().choose(torch.device("cpu"), torch.float32, 10_000).kernel == st.GROUPED_MM


@pytest.mark.parametrize("save_rows", [False, True])
@pytest.mark.parametrize("d_in, d_out, gated", [(7, 3, True), (82, 5, False), (5, 82, True)])
def test_opcheck_at_odd_widths(d_in, d_out, gated, save_rows):
    """The ops still pass opcheck at misaligned widths (contiguity of outputs and gradients is checked
    directly in the tests above: opcheck does not compare strides)."""
    if not _have_grouped_mm(torch.bfloat16):
        pytest.skip("grouped_mm unavailable for cpu/bf16")
    g = torch.Generator().manual_seed(0)
    n, s, e = 13, 4, 5
    x = torch.randn(n, 1, d_in, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(e, d_in, d_out, generator=g).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, e, (n, s), generator=g)
    gates = torch.rand(n, s, generator=g).to(torch.bfloat16).requires_grad_() if gated else None
    plan = make_plan(ids, e)
    strategy = current_policy().choose(x.device, x.dtype, n * s)._replace(save_rows=save_rows).encode()
    torch.library.opcheck(torch.ops.moeut.expert_matmul.default,
                          (x, w, gates, plan.perm, plan.inv_perm, plan.offsets, 1 if gated else s, strategy,
                           gated))
    if gated:
        values = torch.randn(e, d_out, d_in, generator=g).to(torch.bfloat16).requires_grad_()
        torch.library.opcheck(torch.ops.moeut.sigma_moe.default,
                              (x.detach().squeeze(1).requires_grad_(), w, values, gates, plan.perm, plan.inv_perm,
                               plan.offsets, strategy))
