"""The fused σ-MoE experts (``moeut::sigma_moe``) equal two expert matmuls with a ReLU between them:
forward and every gradient, partial gradients, dtypes, autocast, opcheck."""

from __future__ import annotations

import pytest
import torch

from moeut.ops import Strategy, current_policy, expert_matmul, make_plan, sigma_moe_experts, use_policy
from moeut.ops import strategy as st


def _case(n, d, e, de, k, d_out=None, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    d_out = d_out or d
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    keys = torch.randn(e, d, de, generator=g, dtype=torch.float64) / d ** 0.5
    values = torch.randn(e, de, d_out, generator=g, dtype=torch.float64) / de ** 0.5
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k).long()
    gates = torch.rand(n, k, generator=g, dtype=torch.float64)
    grad = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, keys, values, gates, grad)] + [ids]


def _two_matmuls(x, ids, gates, keys, values):
    h = torch.relu(expert_matmul(x, ids, keys, backend="reference"))
    return expert_matmul(h, ids, values, gates, backend="reference").squeeze(1)


def _grads(fn, x, keys, values, gates, grad, ids, need=(True, True, True, True)):
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip((x, keys, values, gates), need)]
    y = fn(leaves[0], ids, leaves[3], leaves[1], leaves[2])
    y.backward(grad)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(37, 16, 7, 8, 3), (20, 8, 5, 16, 2), (9, 16, 4, 8, 4), (1, 8, 3, 8, 1),
                                   (3, 16, 40, 8, 2)])
@pytest.mark.parametrize("save", ["always", "never"])
def test_fused_sigma_moe_matches_two_reference_matmuls(shape, save, policy):
    policy(save_gathered=save)
    case = _case(*shape)
    fused = lambda x, ids, gates, keys, values: sigma_moe_experts(x, ids, gates, keys, values, backend="torch")  # noqa: E731
    for got, want in zip(_grads(fused, *case), _grads(_two_matmuls, *case)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("strategy", [Strategy(st.MM, save_rows=True), Strategy(st.MM, bucket=4),
                                      Strategy(st.BLOCKS, True, bucket=4, max_block_waste=100.0),
                                      Strategy(st.BLOCKS, False, bucket=8, max_block_waste=100.0)],
                         ids=lambda s: s.encode())
def test_fused_sigma_moe_under_every_sorted_strategy_is_exact(strategy):
    """The fused op's kernels, chosen explicitly (the block layout and the bucketed loop in fp64, where the
    policy would not pick them): the reference's forward and gradients to fp64 precision."""
    x, keys, values, gates, grad, ids = _case(37, 16, 7, 8, 3)
    plan = make_plan(ids, 7)

    def fused(x, ids, gates, keys, values):
        y, _, _ = torch.ops.moeut.sigma_moe(x, keys, values, gates, plan.perm, plan.inv_perm, plan.offsets,
                                            strategy.encode())
        return y

    for got, want in zip(_grads(fused, x, keys, values, gates, grad, ids),
                         _grads(_two_matmuls, x, keys, values, gates, grad, ids)):
        torch.testing.assert_close(got, want)


def test_fused_path_is_chosen_by_the_policy():
    """σ-MoE fuses its two projections on the sorted path; the few-slot strategy runs two matmuls, and a
    forced loop (which the fused op does not have) becomes the loop of mm."""
    cpu = torch.device("cpu")
    policy = current_policy()
    assert policy.choose(cpu, torch.float32, 10_000, fused=True).kernel in (st.GROUPED_MM, st.MM)
    assert policy.choose(cpu, torch.bfloat16, 10_000, fused=True).kernel == st.BLOCKS
    with use_policy(gemm="loop"):
        assert current_policy().choose(cpu, torch.float32, 10_000).kernel == st.LOOP
        assert current_policy().choose(cpu, torch.float32, 10_000, fused=True) == Strategy(st.MM)
    with use_policy(few_slots=64):
        assert current_policy().choose(cpu, torch.float32, 64, fused=True).kernel == st.FEW_SLOTS


def test_gate_on_the_output_side_when_experts_are_wider_than_the_output():
    case = _case(13, 8, 4, 32, 2, d_out=8)  # d_e 32 > d_out 8
    fused = lambda x, ids, gates, keys, values: sigma_moe_experts(x, ids, gates, keys, values, backend="torch")  # noqa: E731
    for got, want in zip(_grads(fused, *case), _grads(_two_matmuls, *case)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True)])
def test_partial_gradients(need):
    case = _case(17, 16, 5, 8, 2)
    fused = lambda x, ids, gates, keys, values: sigma_moe_experts(x, ids, gates, keys, values, backend="torch")  # noqa: E731
    got, want = _grads(fused, *case, need=need), _grads(_two_matmuls, *case, need=need)
    for g, w, n in zip(got[1:], want[1:], need):
        assert (g is None) == (not n)
        if n:
            torch.testing.assert_close(g, w)


def test_zero_tokens_and_fp32_and_autocast():
    x, keys, values, gates, grad, ids = _case(0, 8, 3, 8, 2, dtype=torch.float32)
    assert sigma_moe_experts(x, ids, gates, keys, values, backend="torch").shape == (0, 8)
    x, keys, values, gates, grad, ids = _case(11, 16, 5, 16, 2, dtype=torch.float32)
    got = sigma_moe_experts(x, ids, gates, keys, values, backend="torch")
    torch.testing.assert_close(got, _two_matmuls(x, ids, gates, keys, values), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sigma_moe_experts(x, ids, gates.float(), keys, values, backend="torch")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), got, atol=0.1, rtol=0.05)


def test_mismatched_plan_or_dtype_is_a_clear_error():
    x, keys, values, gates, grad, ids = _case(11, 16, 5, 8, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="plan"):
        sigma_moe_experts(x, ids, gates, keys, values, backend="torch", plan=make_plan(ids[:3], 5))
    with pytest.raises(TypeError, match="values dtype"):
        sigma_moe_experts(x, ids, gates, keys, values.double(), backend="torch")


@pytest.mark.parametrize("strategy", [Strategy(st.GROUPED_MM), Strategy(st.GROUPED_MM, save_rows=True),
                                      Strategy(st.BLOCKS, True, bucket=4, max_block_waste=100.0)],
                         ids=lambda s: s.encode())
def test_opcheck_fused_sigma_moe(strategy):
    x, keys, values, gates, _, ids = _case(13, 16, 5, 8, 2, dtype=torch.float32)
    plan = make_plan(ids, 5)
    args = (x.requires_grad_(), keys.requires_grad_(), values.requires_grad_(), gates.requires_grad_(),
            plan.perm, plan.inv_perm, plan.offsets, strategy.encode())
    torch.library.opcheck(torch.ops.moeut.sigma_moe.default, args)
