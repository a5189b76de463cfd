"""The expert matmul: the oracle against brute force, every backend against the oracle, the errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeut.ops import Strategy, available_backends, current_policy, default_backend, expert_matmul, use_policy
from moeut.ops.strategy import BLOCKS, FEW_SLOTS, GROUPED_MM, LOOP, MM
from moeut.ops.blocks import Blocks, block_layout
from moeut.ops.grouped_mm_layout import grouped_mm_works
from moeut.ops.mm_loops import loop_mm, loop_mm_wgrad
from moeut.ops.plan import ExpertPlan, make_plan

FAST_BACKENDS = [b for b in available_backends() if b != "reference"]


def brute_force(x, ids, weight, gates, out_groups):
    """The contract's formula written as one einsum over a per-slot gathered weight (tiny shapes only)."""
    n, g_in, _ = x.shape
    s = ids.shape[1]
    x_slot = x.repeat_interleave(s // g_in, dim=1)  # [N, S, d_in]: slot s reads x[n, s // (S/G_in)]
    y = torch.einsum("nsi,nsio->nso", x_slot, weight[ids])  # [N, S, d_out]
    if gates is not None:
        y = y * gates.unsqueeze(-1)
    return y.unflatten(1, (out_groups, s // out_groups)).sum(2)  # slot s → group s // (S/G_out)


def make_case(n, g_in, s, g_out, d_in, d_out, n_experts, gated, *, seed=0, dtype=torch.float64,
              device="cpu", ids=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g_in, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(n_experts, d_in, d_out, generator=g, dtype=torch.float64) / d_in**0.5
    if ids is None:
        ids = torch.randint(0, n_experts, (n, s), generator=g)
    gates = torch.rand(n, s, generator=g, dtype=torch.float64) if gated else None
    grad = torch.randn(n, g_out, d_out, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return cast(x), ids.to(device), cast(w), cast(gates), cast(grad)


def run(x, ids, w, gates, grad, g_out, backend, **kw):
    """Forward and the gradients of x, weight and gates for the output cotangent ``grad``."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    if gates is not None:
        leaves.append(gates.detach().clone().requires_grad_())
    y = expert_matmul(leaves[0], ids, leaves[1], leaves[2] if gates is not None else None,
                      out_groups=g_out, backend=backend, **kw)
    y.backward(grad)
    return [y.detach()] + [t.grad for t in leaves]


def run_strategy(strategy: Strategy, x, ids, w, gates, grad, g_out):
    """:func:`run` through the custom op under an explicit ``strategy`` (one the policy would not pick for
    these inputs, e.g. the block layout in fp64, where it can be checked exactly)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    c = gates.detach().clone().requires_grad_() if gates is not None else None
    plan = make_plan(ids, w.shape[0])
    y, _, _ = torch.ops.moeut.expert_matmul(leaves[0], leaves[1], c, plan.perm, plan.inv_perm, plan.offsets, g_out,
                                            strategy.encode(), c is not None)
    y.backward(grad)
    return [y.detach()] + [t.grad for t in leaves + ([c] if c is not None else [])]


def assert_close_all(got, want, **tol):
    for name, a, b in zip(["out", "grad_x", "grad_weight", "grad_gates"], got, want):
        torch.testing.assert_close(a.double(), b.double(), msg=lambda m, name=name: f"{name}: {m}", **tol)


# ------------------------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("g_in,s,g_out,gated", [(1, 4, 4, False), (4, 4, 1, True), (2, 6, 3, True), (3, 6, 2, False)])
def test_reference_matches_brute_force_einsum(g_in, s, g_out, gated):
    x, ids, w, gates, grad = make_case(5, g_in, s, g_out, 3, 4, 3, gated, seed=s + g_in)
    got = run(x, ids, w, gates, grad, g_out, "reference")
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((gates,) if gated else ())]
    want_y = brute_force(leaves[0], ids, leaves[1], leaves[2] if gated else None, g_out)
    want_y.backward(grad)
    assert_close_all(got, [want_y.detach()] + [t.grad for t in leaves])


def test_reference_by_hand_on_one_row():
    # one row, two slots, expert 1 then expert 0, gates 2 and 3, summed into one group
    x = torch.tensor([[[1.0, 2.0]]])
    w = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]])  # expert 0 picks x[0], expert 1 picks x[1]
    y = expert_matmul(x, torch.tensor([[1, 0]]), w, torch.tensor([[2.0, 3.0]]), backend="reference")
    assert y.tolist() == [[[2.0 * 2.0 + 3.0 * 1.0]]]


# --------------------------------------------------------------------------- backends vs the oracle
@st.composite
def cases(draw):
    g_in = draw(st.sampled_from([1, 2, 3]))
    g_out = draw(st.sampled_from([1, 2, 3]))
    s = math.lcm(g_in, g_out) * draw(st.integers(1, 2))  # both G_in and G_out divide S
    return dict(
        n=draw(st.integers(0, 9)), g_in=g_in, s=s, g_out=g_out,
        d_in=draw(st.sampled_from([1, 3, 8, 16])), d_out=draw(st.sampled_from([1, 5, 8, 16])),
        n_experts=draw(st.integers(1, 6)), gated=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("gemm", ["auto", "loop", "grouped_mm"])
@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_backend_matches_reference_forward_and_gradients(backend, gemm, case):
    x, ids, w, gates, grad = make_case(**case)
    with use_policy(gemm=gemm):
        got = run(x, ids, w, gates, grad, case["g_out"], backend)
    want = run(x, ids, w, gates, grad, case["g_out"], "reference")
    assert got[0].shape == (case["n"], case["g_out"], w.shape[2])
    assert_close_all(got, want)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("gemm", ["grouped_mm", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g_in,s,g_out,gated", [(1, 4, 4, False), (4, 4, 1, True), (1, 4, 2, True)])
@pytest.mark.parametrize("d_in,d_out", [(16, 32), (32, 16)])  # gate on the input / the output side
def test_backend_gemm_paths_in_fp32_and_bf16(backend, gemm, dtype, g_in, s, g_out, gated, d_in, d_out, policy):
    # widths that are multiples of 16 bytes, so grouped_mm really runs where it is available
    if gemm == "grouped_mm" and not grouped_mm_works("cpu", dtype):
        pytest.skip(f"grouped_mm unavailable for cpu/{dtype}")
    policy(gemm=gemm)
    case = dict(n=37, g_in=g_in, s=s, g_out=g_out, d_in=d_in, d_out=d_out, n_experts=7, gated=gated, seed=s)
    got = run(*make_case(**case, dtype=dtype), g_out, backend)
    want = run(*make_case(**case, dtype=torch.float64), g_out, "reference")
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    assert_close_all(got, want, **tol)


@pytest.mark.parametrize("strategy", [Strategy(LOOP), Strategy(GROUPED_MM), Strategy(GROUPED_MM, True),
                                      Strategy(MM, True), Strategy(MM, False, bucket=3),
                                      Strategy(BLOCKS, True, bucket=4, max_block_waste=100.0),
                                      Strategy(BLOCKS, False, bucket=4, max_block_waste=100.0)],
                         ids=lambda s: s.encode())
@pytest.mark.parametrize("g_in,s,g_out,gated,d_in,d_out", [(1, 4, 4, False, 16, 8), (4, 4, 1, True, 8, 16),
                                                            (2, 4, 2, True, 16, 8)])
def test_every_strategy_matches_reference(strategy, g_in, s, g_out, gated, d_in, d_out):
    """Each kernel, chosen explicitly (whatever the policy would pick for fp32), with either gate side."""
    if strategy.kernel == GROUPED_MM and not grouped_mm_works("cpu", torch.float32):
        pytest.skip("grouped_mm unavailable for cpu/float32")
    case = dict(n=37, g_in=g_in, s=s, g_out=g_out, d_in=d_in, d_out=d_out, n_experts=7, gated=gated, seed=s)
    got = run_strategy(strategy, *make_case(**case, dtype=torch.float32), g_out)
    want = run(*make_case(**case), g_out, "reference")
    assert_close_all(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bucket", [1, 3, 4, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bucketed_mm_loop_is_exact(bucket, dtype):
    """The bucketed loop (CPU bf16's GEMMs) gives the exact per-expert products: extra rows borrowed from
    the next expert are overwritten, the tail goes through zero padding, the weight gradient's remainder
    rows through zeroed scratch; empty experts, counts that are multiples of the bucket, and a last
    expert that ends exactly at M are all in ``counts``."""
    counts = [0, 4, 5, 3, 8, 0, 1, 12]
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    plan = make_plan(ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))][:, None],
                     len(counts))
    g = torch.Generator().manual_seed(1)
    a = torch.randn(len(ids), 6, generator=g, dtype=dtype)
    b = torch.randn(len(counts), 6, 5, generator=g, dtype=dtype)
    gy = torch.randn(len(ids), 5, generator=g, dtype=dtype)
    bounds = [0] + torch.tensor(counts).cumsum(0).tolist()
    want_y = torch.cat([a[lo:hi] @ b[e] for e, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])
    want_w = torch.stack([a[lo:hi].t() @ gy[lo:hi] for lo, hi in zip(bounds, bounds[1:])])
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loop_mm(a, b, plan, bucket), want_y, **tol)
    torch.testing.assert_close(loop_mm(gy, b.transpose(1, 2), plan, bucket),
                               torch.cat([gy[lo:hi] @ b[e].t() for e, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]),
                               **tol)
    torch.testing.assert_close(loop_mm_wgrad(a, gy, plan, bucket), want_w, **tol)
    torch.testing.assert_close(loop_mm_wgrad(gy, a, plan, bucket), want_w.transpose(1, 2),
                               **tol)  # the zeroed side is the narrower one: here the first operand


@pytest.mark.parametrize("layout", ["loop", "blocks"])
@pytest.mark.parametrize("bucket", [0, 4, 64])
@pytest.mark.parametrize("g_in,s,g_out,gated", [(1, 4, 4, False), (4, 4, 1, True), (1, 4, 2, True)])
@pytest.mark.parametrize("d_in,d_out", [(16, 32), (32, 16)])
def test_cpu_bf16_expert_gemms_match_reference(layout, bucket, g_in, s, g_out, gated, d_in, d_out, policy,
                                               monkeypatch):
    """CPU bf16 never runs grouped_mm: its GEMMs are one ``bmm`` over equal blocks of rows (the block
    layout), or, past ``max_block_waste`` extra rows, a loop of ``mm`` over row counts rounded up to
    ``row_bucket`` (oneDNN builds a kernel per shape); forward and every gradient against the reference."""
    policy(row_bucket=bucket, max_block_waste=100.0 if layout == "blocks" else -1.0)
    rows, blocks = [], []  # each mm's slot-row count (a's rows, or for a weight gradient aᵀg its inner
    real_mm, real_bmm = torch.mm, torch.bmm  # size), and each bmm's block size

    def spy_mm(a, b, **kw):
        rows.append(a.shape[1] if a.stride(0) == 1 and a.shape[1] > 1 else a.shape[0])
        return real_mm(a, b, **kw)

    def spy_bmm(a, b, **kw):
        blocks.append(a.shape[2] if a.stride(1) == 1 and a.shape[2] > 1 else a.shape[1])
        return real_bmm(a, b, **kw)

    chosen = current_policy().choose(torch.device("cpu"), torch.bfloat16, 150 * s)
    assert chosen == (Strategy(BLOCKS, True, bucket, 100.0) if layout == "blocks" and bucket
                      else Strategy(MM, True, bucket))
    case = dict(n=150, g_in=g_in, s=s, g_out=g_out, d_in=d_in, d_out=d_out, n_experts=7, gated=gated, seed=s)
    want = run(*make_case(**case, dtype=torch.float64), g_out, "reference")
    monkeypatch.setattr(torch, "mm", spy_mm)
    monkeypatch.setattr(torch, "bmm", spy_bmm)
    got = run(*make_case(**case, dtype=torch.bfloat16), g_out, "torch")
    monkeypatch.setattr(torch, "mm", real_mm)
    monkeypatch.setattr(torch, "bmm", real_bmm)
    assert_close_all(got, want, atol=0.1, rtol=0.05)
    if layout == "blocks" and bucket:
        assert len(blocks) == 3 and not rows  # forward, input and weight gradient: one bmm each
        assert all(b % bucket == 0 for b in blocks), blocks
    else:
        assert not blocks and len(rows) >= 3 * 7 - 7  # forward, input and weight gradient per used expert
        if bucket > 1:  # every GEMM's row (or reduction) count is a multiple of the bucket
            assert all(r % bucket == 0 for r in rows), sorted(set(rows))


@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("g_in,s,g_out,gated,d_in,d_out", [
    (1, 4, 4, False, 6, 5), (4, 4, 1, True, 5, 6), (1, 4, 2, True, 6, 3), (2, 4, 2, True, 3, 6), (1, 1, 1, True, 4, 4)])
def test_block_layout_is_exact(save, g_in, s, g_out, gated, d_in, d_out):
    """The block layout (pad rows zeroed by every gather, one bmm per GEMM), chosen explicitly in fp64 where it
    can be checked exactly: the reference's forward and gradients to fp64 precision, empty experts and an
    expert whose rows fill its block included."""
    ids = torch.randint(0, 6, (41, s), generator=torch.Generator().manual_seed(s + d_in))
    ids[ids == 2] = 3  # expert 2 empty
    ids[:4, 0] = 5
    case = dict(n=41, g_in=g_in, s=s, g_out=g_out, d_in=d_in, d_out=d_out, n_experts=6, gated=gated, ids=ids)
    blocks = block_layout(make_plan(ids, 6), 4, 100.0)
    assert isinstance(blocks, Blocks) and blocks.block % 4 == 0
    assert torch.equal(blocks.perm[blocks.inv_perm], torch.arange(41 * s))  # every slot at its block row
    got = run_strategy(Strategy(BLOCKS, save, bucket=4, max_block_waste=100.0), *make_case(**case), g_out)
    want = run(*make_case(**case), g_out, "reference")
    assert_close_all(got, want, atol=1e-10, rtol=1e-10)


def test_block_layout_falls_back_to_the_loop_past_the_waste_limit():
    """One expert with most of the rows: blocks of its size would multiply the work, so the loop runs."""
    ids = torch.zeros(40, 2, dtype=torch.long)
    ids[:4, 1] = torch.arange(1, 5)
    plan = make_plan(ids, 5)
    assert block_layout(plan, 4, 0.5) is plan
    balanced = make_plan(torch.arange(80).remainder(5).view(40, 2), 5)
    assert isinstance(block_layout(balanced, 4, 0.5), Blocks)
    # and the op then runs the bucketed loop over the plain sorted rows, exactly
    x, ids, w, gates, grad = make_case(40, 1, 2, 1, 6, 5, 5, True, ids=ids)
    got = run_strategy(Strategy(BLOCKS, True, bucket=4, max_block_waste=0.5), x, ids, w, gates, grad, 1)
    assert_close_all(got, run(x, ids, w, gates, grad, 1, "reference"), atol=1e-10, rtol=1e-10)


def test_block_layout_only_for_cpu_bf16_and_fp16(policy):
    """oneDNN (bf16/fp16 on a CPU) builds a kernel per GEMM shape; MKL (fp32/fp64) and GPUs do not."""
    policy(row_bucket=4)
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float64):  # grouped_mm or the exact loop
        assert current_policy().choose(cpu, dtype, 10_000).kernel in (GROUPED_MM, MM)
        assert current_policy().choose(cpu, dtype, 10_000).bucket == 0
    for dtype in (torch.bfloat16, torch.float16):
        assert current_policy().choose(cpu, dtype, 10_000) == Strategy(BLOCKS, True, 4, 0.5)
    assert current_policy().choose(torch.device("cuda"), torch.bfloat16, 10_000).kernel != BLOCKS


@pytest.mark.parametrize("save", ["always", "never"])
@pytest.mark.parametrize("gemm", ["grouped_mm", "loop"])
@pytest.mark.parametrize("g_in,s,g_out,d_in,d_out", [(1, 4, 4, 16, 8), (4, 4, 1, 8, 16), (2, 4, 2, 8, 8)])
@pytest.mark.parametrize("grads", ["all", "no_gates", "only_weight"])
def test_torch_backend_options_and_partial_gradients(save, gemm, g_in, s, g_out, d_in, d_out, grads, policy):
    # gathered rows saved or gathered again; gate on the input or output side; some inputs without grad
    policy(save_gathered=save, gemm=gemm)
    x, ids, w, gates, grad = make_case(11, g_in, s, g_out, d_in, d_out, 5, True, seed=g_in, dtype=torch.float32)
    outs = {}
    for backend in ("torch", "reference"):
        xx, ww, cc = (t.clone().requires_grad_(grads == "all" or (grads == "no_gates" and t is not gates)
                                               or t is w) for t in (x, w, gates))
        y = expert_matmul(xx, ids, ww, cc, out_groups=g_out, backend=backend)
        y.backward(grad)
        outs[backend] = [y.detach()] + [t.grad if t.grad is not None else torch.zeros(0) for t in (xx, ww, cc)]
    assert_close_all(outs["torch"], outs["reference"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_experts_with_no_rows_get_zero_weight_gradient(backend):
    # only experts 1 and 4 of 6 are used
    ids = torch.tensor([[1, 4], [4, 1], [1, 1]])
    x, ids, w, gates, grad = make_case(3, 1, 2, 1, 4, 5, 6, True, ids=ids)
    got = run(x, ids, w, gates, grad, 1, backend)
    assert_close_all(got, run(x, ids, w, gates, grad, 1, "reference"))
    assert torch.all(got[2][[0, 2, 3, 5]] == 0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
def test_every_expert_chosen_once_per_row_when_k_equals_e(backend, gated):
    n, e = 6, 5
    ids = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(i)) for i in range(n)])
    g_out = 1 if gated else e
    x, ids, w, gates, grad = make_case(n, 1, e, g_out, 4, 3, e, gated, ids=ids)
    assert_close_all(run(x, ids, w, gates, grad, g_out, backend),
                     run(x, ids, w, gates, grad, g_out, "reference"))


@pytest.mark.parametrize("backend", available_backends())
def test_zero_rows_return_empty(backend):
    x, ids, w, gates, _ = make_case(0, 1, 3, 1, 4, 5, 2, True)
    y = expert_matmul(x, ids, w, gates, backend=backend)
    assert y.shape == (0, 1, 5)


def test_2d_input_is_read_as_one_group():
    x, ids, w, gates, _ = make_case(4, 1, 3, 1, 4, 5, 3, True)
    torch.testing.assert_close(expert_matmul(x.squeeze(1), ids, w, gates), expert_matmul(x, ids, w, gates))


def test_default_out_groups_is_s_without_gates_and_1_with_gates():
    x, ids, w, gates, _ = make_case(4, 1, 3, 1, 4, 5, 3, True)
    assert expert_matmul(x, ids, w).shape == (4, 3, 5)
    assert expert_matmul(x, ids, w, gates).shape == (4, 1, 5)


def test_shared_plan_gives_the_same_result_and_is_checked_against_the_call():
    x, ids, w, gates, grad = make_case(8, 1, 3, 1, 4, 5, 4, True)
    plan = make_plan(ids, 4)
    assert isinstance(plan, ExpertPlan)
    assert_close_all(run(x, ids, w, gates, grad, 1, "torch", plan=plan), run(x, ids, w, gates, grad, 1, "torch"))
    with pytest.raises(ValueError, match="plan was made for"):
        expert_matmul(x[:4], ids[:4], w, gates[:4], plan=plan)


def test_bf16_gates_or_fp32_gates_follow_the_compute_dtype():
    x, ids, w, gates, _ = make_case(4, 1, 3, 1, 8, 8, 3, True, dtype=torch.bfloat16)
    y = expert_matmul(x, ids, w, gates.float())
    assert y.dtype == torch.bfloat16


def test_cpu_autocast_bf16_casts_inputs_and_returns_fp32_gradients():
    x, ids, w, gates, grad = make_case(6, 1, 2, 1, 16, 16, 3, True, dtype=torch.float32)
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = expert_matmul(x, ids, w, gates)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.zeros(4)), r"x must be \[N, G_in, d_in\]"),
    (dict(expert_ids=torch.zeros(3, 2, dtype=torch.long)), r"expert_ids must be \[N, S\] = \[4, S\]"),
    (dict(expert_ids=torch.zeros(4, 3, dtype=torch.long), x=torch.zeros(4, 2, 8)), r"multiple of x's G_in = 2"),
    (dict(weight=torch.zeros(3, 7, 5)), r"weight must be \[E, d_in, d_out\] with d_in = 8"),
    (dict(gates=torch.zeros(4, 3)), r"gates must be \[N, S\] = \[4, 2\]"),
    (dict(out_groups=3), r"out_groups must be a positive divisor of S = 2"),
    (dict(expert_ids=torch.zeros(4, 2)), r"expert_ids must be an integer tensor"),
    (dict(weight=torch.zeros(3, 8, 5, dtype=torch.float64)), r"weight dtype torch.float64 must match x"),
    (dict(expert_ids=torch.full((4, 2), 3)), r"expert_ids must lie in \[0, 3\)"),
])
@pytest.mark.parametrize("backend", available_backends())
def test_bad_arguments_raise_errors_naming_the_argument(kwargs, match, backend):
    args = dict(x=torch.zeros(4, 8), expert_ids=torch.zeros(4, 2, dtype=torch.long), weight=torch.zeros(3, 8, 5),
                gates=None, out_groups=None)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        expert_matmul(args.pop("x"), args.pop("expert_ids"), args.pop("weight"), args.pop("gates"),
                      backend=backend, **args)


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown expert_matmul backend 'cuda-magic'.*'reference'.*'torch'"):
        expert_matmul(torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, 4, 4),
                      backend="cuda-magic")


def test_triton_backend_on_cpu_is_a_clear_error(monkeypatch):
    # without triton: "needs the triton package"; with it but no GPU: "runs on CUDA GPUs"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises((ImportError, ValueError), match="triton.*(package|CUDA)") as info:
        expert_matmul(torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, 4, 4),
                      backend="triton")
    assert "backend='torch'" in str(info.value)
    assert "triton" not in available_backends() or torch.cuda.is_available()


def test_default_backend_is_torch_on_cpu_and_listed():
    assert default_backend("cpu") == "torch"
    assert {"reference", "torch"} <= set(available_backends())


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemm", ["auto", "loop"])
@pytest.mark.parametrize("g_in,s,g_out,gated", [(1, 8, 8, False), (8, 8, 1, True), (1, 8, 4, True), (4, 8, 1, True)])
def test_backend_matches_reference_on_cuda(backend, dtype, gemm, g_in, s, g_out, gated, policy):
    policy(gemm=gemm)
    case = dict(n=300, g_in=g_in, s=s, g_out=g_out, d_in=64, d_out=128, n_experts=16, gated=gated, seed=1)
    got = run(*make_case(**case, dtype=dtype, device="cuda"), g_out, backend)
    want = run(*make_case(**case, dtype=torch.float64), g_out, "reference")
    # fp32 on CUDA may use TF32 matmuls
    tol = dict(atol=2e-2, rtol=1e-2) if dtype == torch.float32 else dict(atol=0.15, rtol=0.05)
    assert_close_all([t.cpu() for t in got], want, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_bf16():
    x, ids, w, gates, grad = make_case(64, 1, 4, 1, 32, 64, 8, True, dtype=torch.float32, device="cuda")
    w.requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = expert_matmul(x, ids, w, gates)
    assert y.dtype == torch.bfloat16
    y.float().backward(grad.float())
    assert w.grad.dtype == torch.float32
    want = expert_matmul(x.double().cpu(), ids.cpu(), w.detach().double().cpu(), gates.double().cpu(),
                         backend="reference")
    torch.testing.assert_close(y.double().cpu(), want, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
def test_output_can_be_modified_in_place(backend, gated):
    # e.g. torch.relu_ on the up-projection: the output must not be a view made inside the autograd.Function
    x, ids, w, gates, _ = make_case(6, 1, 2, 2 if not gated else 1, 8, 8, 3, gated, dtype=torch.float32)
    w.requires_grad_()
    y = torch.relu_(expert_matmul(x, ids, w, gates, backend=backend))
    y.sum().backward()
    want_w = w.detach().clone().requires_grad_()
    torch.relu(expert_matmul(x, ids, want_w, gates, backend="reference")).sum().backward()
    torch.testing.assert_close(w.grad, want_w.grad)


@pytest.mark.slow
def test_moe_layer_benchmark_quick_run_prints_json():
    # keeps benchmarks/moe_layer.py from rotting: a smoke run, no timing assertions
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_layer.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu"], capture_output=True,
                          text=True, timeout=120, check=True)
    out = json.loads(proc.stdout)
    assert {"torch", "threads", "device"} <= set(out)
    keys = {"layer", "d_model", "n_experts", "expert_size", "k", "backend", "ms", "dense_active_ms", "ratio_active"}
    assert {(r["layer"], r["backend"]) for r in out["results"]} >= {("sigma_moe", "torch"), ("switchhead", "torch")}
    for r in out["results"]:
        assert keys <= set(r) and r["ms"] > 0 and r["ratio_active"] == round(r["ms"] / r["dense_active_ms"], 3)


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_few_slots_decoding_path_matches_reference(case):
    """With few (row, slot) pairs the torch backend gathers weights and runs one bmm instead of sorting."""
    x, ids, w, gates, grad = make_case(**case)
    with use_policy(few_slots=10**9):
        assert current_policy().choose(x.device, x.dtype, ids.numel()).kernel == FEW_SLOTS
        got = run(x, ids, w, gates, grad, case["g_out"], "torch")
    assert got[0].shape == (case["n"], case["g_out"], w.shape[2])
    assert_close_all(got, run(x, ids, w, gates, grad, case["g_out"], "reference"))


@pytest.mark.parametrize("n_experts", [1, 7, 256, 257, 40000, 70000])  # uint8, int16 and int64 sort keys
def test_make_plan_sorts_stably_for_any_number_of_experts(n_experts):
    g = torch.Generator().manual_seed(n_experts)
    ids = torch.randint(0, n_experts, (97, 3), generator=g)
    ids[0, 0], ids[0, 1] = n_experts - 1, 0
    plan = make_plan(ids, n_experts)
    flat = ids.reshape(-1)
    want_sorted, want_perm = torch.sort(flat, stable=True)
    assert torch.equal(plan.perm, want_perm) and torch.equal(plan.sorted_ids, want_sorted)
    assert plan.sorted_ids.dtype == torch.int64 and plan.perm.dtype == torch.int64
    assert torch.equal(plan.perm[plan.inv_perm], torch.arange(flat.numel()))
    assert torch.equal(plan.offsets.long(), torch.bincount(flat, minlength=n_experts).cumsum(0))
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, "):
        make_plan(ids - 1, n_experts)  # a -1 would wrap around in a narrow key
