"""Fast pure-PyTorch expert matmul (CPU and GPU): sort slots by expert, one grouped GEMM, unsort.

Forward, with M = N·S slots sorted by expert through an :class:`~moeut.ops.plan.ExpertPlan`:

1. gather the input row of every sorted slot: ``a = x[perm // (S/G_in)]``            ``[M, d_in]``
2. grouped GEMM over the contiguous per-expert blocks: ``y_m = a_m @ W[e_m]``          ``[M, d_out]``
   (the gate ``c_m`` scales whichever of ``a_m`` / ``y_m`` is narrower)
3. unsort with a gather ``y[inv_perm]`` and sum the ``S/G_out`` slots of each output group.

Gathers + ``sum`` instead of ``index_add_``: gathers parallelise without atomics, so results are
deterministic on GPU too, and bf16 sums accumulate in fp32. A hand-written backward recomputes the
gather of ``x`` instead of saving the ``S/G_in`` times larger ``a``, and gets the gate gradient for free
from the input gradient: ``∂L/∂c_m = a_m · (g_m W_eᵀ)``.

The GEMM is ``torch.nn.functional.grouped_mm`` where this torch has it and it works for the device and
dtype (probed once per pair, then per call guarded: it rejects some strides), else a Python loop over the
experts with weights split once by ``unbind`` (never ``W[i]`` in the loop, never a weight per token).
"""

from __future__ import annotations

import os

import torch

from moeut.ops.plan import ExpertPlan, make_plan

# "auto": grouped_mm where it works, else the loop. "grouped_mm" / "loop": force one (benchmarks, tests).
GEMM_IMPL = os.environ.get("MOEUT_GEMM_IMPL", "auto")

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


# --------------------------------------------------------------------------------------------- GEMMs
def _loop_mm(a: torch.Tensor, b: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """``out[m] = a[m] @ b[e_m]``; ``a [M, K]`` sorted by expert, ``b [E, K, N]``."""
    counts = plan.counts_list()
    out = a.new_empty(a.shape[0], b.shape[2])
    for a_e, b_e, out_e, n in zip(a.split(counts), b.unbind(0), out.split(counts), counts):
        if n:
            torch.mm(a_e, b_e, out=out_e)
    return out


def _loop_mm_wgrad(a: torch.Tensor, g: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """``out[e] = Σ_{m in e} a[m]ᵀ g[m]``; ``a [M, K]``, ``g [M, N]`` sorted by expert → ``[E, K, N]``."""
    counts = plan.counts_list()
    out = a.new_empty(plan.n_experts, a.shape[1], g.shape[1])
    for a_e, g_e, out_e, n in zip(a.split(counts), g.split(counts), out.unbind(0), counts):
        if n:
            torch.mm(a_e.t(), g_e, out=out_e)
        else:
            out_e.zero_()
    return out


def _reference_check(device: torch.device, dtype: torch.dtype) -> bool:
    """Does ``grouped_mm`` exist and agree with the loop on this device/dtype (empty groups included)?"""
    if _grouped_mm is None:
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        counts = [3, 0, 5, 8]
        e, k, n = len(counts), 16, 32
        a = torch.randn(sum(counts), k, generator=gen).to(device, dtype)
        b = torch.randn(e, k, n, generator=gen).to(device, dtype)
        g = torch.randn(sum(counts), n, generator=gen).to(device, dtype)
        ids = torch.repeat_interleave(torch.arange(e), torch.tensor(counts))[None].to(device)
        plan = make_plan(ids, e)
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        checks = [
            (_grouped_mm(a, b, offs=plan.offsets), _loop_mm(a, b, plan)),
            (_grouped_mm(g, b.transpose(1, 2), offs=plan.offsets), _loop_mm(g, b.transpose(1, 2), plan)),
            (_grouped_mm(a.t(), g, offs=plan.offsets), _loop_mm_wgrad(a, g, plan)),
        ]
        return all(
            got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
            for got, want in checks
        )
    except Exception:  # noqa: BLE001 — any failure means "don't use it here"
        return False


def _use_grouped_mm(t: torch.Tensor) -> bool:
    if GEMM_IMPL == "loop":
        return False
    if GEMM_IMPL == "grouped_mm":
        return True
    key = (t.device.type, t.dtype)
    ok = _GROUPED_MM_OK.get(key)
    if ok is None:
        ok = _GROUPED_MM_OK[key] = _reference_check(t.device, t.dtype)
    return ok


def grouped_mm(a: torch.Tensor, b: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """``[M, K] x [E, K, N] -> [M, N]`` over the expert blocks of ``plan`` (``b`` may be a transposed view)."""
    if a.shape[0] and _use_grouped_mm(a):
        try:
            return _grouped_mm(a, b, offs=plan.offsets)
        except RuntimeError:  # e.g. "strides should be multiple of 16 bytes" for odd widths
            if GEMM_IMPL == "grouped_mm":
                raise
    return _loop_mm(a, b, plan)


def grouped_mm_wgrad(a: torch.Tensor, g: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """``[M, K], [M, N] -> [E, K, N]``: per-expert ``aᵀ g`` (the weight gradient)."""
    if a.shape[0] and _use_grouped_mm(a):
        try:
            return _grouped_mm(a.t(), g, offs=plan.offsets)
        except RuntimeError:
            if GEMM_IMPL == "grouped_mm":
                raise
    return _loop_mm_wgrad(a, g, plan)


# ------------------------------------------------------------------------------------ the operation
def _unsort_reduce(y: torch.Tensor, plan: ExpertPlan, n: int, groups: int) -> torch.Tensor:
    """Sorted ``[M, D]`` → ``[N, groups, D]``, summing the ``S/groups`` slots of each group."""
    s = plan.shape[1]
    out = y.index_select(0, plan.inv_perm)
    if groups == s:
        return out.view(n, groups, y.shape[1])
    return out.view(n, groups, s // groups, y.shape[1]).sum(2)


class _ExpertMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gates, plan, g_out):
        n, g_in, d_in = x.shape
        s = plan.shape[1]
        d_out = weight.shape[2]
        ctx.plan, ctx.g_out = plan, g_out
        ctx.save_for_backward(x, weight, gates)
        if n == 0 or s == 0:
            return x.new_zeros(n, g_out, d_out)

        a = x.reshape(n * g_in, d_in).index_select(0, plan.rows(s // g_in))
        c = None
        if gates is not None:
            c = gates.reshape(-1).index_select(0, plan.perm).unsqueeze(1)
            if d_in <= d_out:
                a.mul_(c)
        y = grouped_mm(a, weight, plan)
        if c is not None and d_in > d_out:
            y.mul_(c)
        return _unsort_reduce(y, plan, n, g_out)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, gates = ctx.saved_tensors
        plan, g_out = ctx.plan, ctx.g_out
        n, g_in, d_in = x.shape
        s = plan.shape[1]
        d_out = weight.shape[2]
        need_x, need_w, need_c = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_c = None
        if n == 0 or s == 0:
            return (torch.zeros_like(x) if need_x else None, torch.zeros_like(weight) if need_w else None,
                    torch.zeros_like(gates) if need_c else None, None, None)

        # the output gradient of every sorted slot (contiguous: grouped_mm's CPU path needs it)
        g = grad_out.reshape(n * g_out, d_out).index_select(0, plan.rows(s // g_out))
        a = x.reshape(n * g_in, d_in).index_select(0, plan.rows(s // g_in))
        c = None if gates is None else gates.reshape(-1).index_select(0, plan.perm).unsqueeze(1)

        if need_w:
            # ∂L/∂W_e = Σ c_m a_mᵀ g_m; scale the narrower of a, g
            if c is None:
                grad_w = grouped_mm_wgrad(a, g, plan)
            elif d_in <= d_out:
                grad_w = grouped_mm_wgrad(a * c, g, plan)
            else:
                grad_w = grouped_mm_wgrad(a, g * c, plan)
        if need_x or need_c:
            t = grouped_mm(g, weight.transpose(1, 2), plan)  # g_m W_eᵀ, [M, d_in]
            if need_c:
                grad_c = (a * t).sum(1).index_select(0, plan.inv_perm).view_as(gates)
            if need_x:
                if c is not None:
                    t.mul_(c)
                grad_x = _unsort_reduce(t, plan, n, g_in)
        return grad_x, grad_w, grad_c, None, None


def expert_matmul_torch(x, weight, gates, plan: ExpertPlan, out_groups: int) -> torch.Tensor:
    """Backend entry point; inputs already validated, same dtype and device, ``x`` 3D."""
    return _ExpertMatmul.apply(x, weight, gates, plan, out_groups)
