"""Triton kernels of the expert matmul (CVMM). Imported only when triton is installed.

Rows are processed in the order of an :class:`~moeut.ops.plan.ExpertPlan` (slots sorted by expert), cut
into *tiles* of ``BLOCK_M`` sorted positions that never straddle two experts (see
``moeut.ops.triton_backend.tile_schedule``), so every tile multiplies by exactly one expert matrix.

* :func:`gather_gmm_kernel` — ``Y[out_rows[m]] (+)= c_m · A[a_rows[m]] @ W[e]`` for the sorted positions
  ``m`` of a tile: the forward (``A = x``) and the input gradient (``A = ∂y``, ``W`` read transposed
  through its strides). Input rows are gathered by index and output rows scattered by index inside the
  kernel; with ``ATOMIC`` the slots of one token are summed straight into an fp32 output (the σ-MoE
  down-projection, SwitchHead's value/output projections), without it each slot writes its own row.
  With ``GATE_GRAD`` it also emits ``Σ_n (A[a_rows[m]] @ W[e])[n] · X[x_rows[m], n]`` per (m, column
  block), the gate gradient, before the gate is applied.
* :func:`wgrad_kernel` — ``∂W[e] = Σ_{m ∈ e} A[a_rows[m]]ᵀ (c_m · G[g_rows[m]])``: one program per
  (expert, d_in block, d_out block) looping over that expert's rows — a segment reduction, no atomics,
  hence bitwise reproducible.

All dots accumulate in fp32. For fp32 inputs the precision is explicit (``PREC``: "ieee", or "tf32" only
when ``torch.backends.cuda.matmul.allow_tf32`` says so).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moeut.ops.overrides import OVERRIDES


@triton.jit
def gather_gmm_kernel(
    A, A_ROWS, stride_am, stride_ak,
    W, stride_we, stride_wk, stride_wn,
    C,
    Y, Y_ROWS, stride_ym, stride_yn,
    X, X_ROWS, stride_xm, stride_xn, CG, stride_cgm,
    TILE_E, TILE_R0, TILE_R1,
    K, N,
    M_BUCKET,  # only part of the autotuning key: rows per expert, bucketed
    HAS_GATE: tl.constexpr, ATOMIC: tl.constexpr, STORE_Y: tl.constexpr, GATE_GRAD: tl.constexpr,
    IS_FP32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    r0 = tl.load(TILE_R0 + tile)
    r1 = tl.load(TILE_R1 + tile)
    e = tl.load(TILE_E + tile).to(tl.int64)
    offs_m = r0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < r1
    a_rows = tl.load(A_ROWS + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_end = tl.where(r0 < r1, K, 0)  # empty tiles (the schedule's padding) skip the loop

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(A + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if IS_FP32:
            acc = tl.dot(a, w, acc, input_precision=PREC)
        else:
            acc = tl.dot(a, w, acc)

    if GATE_GRAD:  # ∂c_m, partial over this column block: (A W)_m · X_m
        x_rows = tl.load(X_ROWS + offs_m, mask=mask_m, other=0).to(tl.int64)
        xv = tl.load(X + x_rows[:, None] * stride_xm + offs_n[None, :] * stride_xn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        tl.store(CG + offs_m * stride_cgm + pid_n, tl.sum(acc * xv, axis=1), mask=mask_m)
    if STORE_Y:
        if HAS_GATE:
            c = tl.load(C + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            acc = acc * c[:, None]
        y_rows = tl.load(Y_ROWS + offs_m, mask=mask_m, other=0).to(tl.int64)
        y_ptrs = Y + y_rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        y_mask = mask_m[:, None] & mask_n[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptrs, acc, mask=y_mask)
        else:
            tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def wgrad_kernel(
    A, A_ROWS, stride_am, stride_ak,
    G, G_ROWS, stride_gm, stride_gn,
    C, OFFSETS,
    GW, stride_we, stride_wk, stride_wn,
    K, N,
    M_BUCKET,  # only part of the autotuning key
    HAS_GATE: tl.constexpr, IS_FP32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    r1 = tl.load(OFFSETS + e)
    r0 = tl.load(OFFSETS + e - 1, mask=e > 0, other=0)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(r0, r1, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < r1
        a_rows = tl.load(A_ROWS + offs_m, mask=mask_m, other=0).to(tl.int64)
        g_rows = tl.load(G_ROWS + offs_m, mask=mask_m, other=0).to(tl.int64)
        a_t = tl.load(A + a_rows[None, :] * stride_am + offs_k[:, None] * stride_ak,
                      mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        g = tl.load(G + g_rows[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_M, BLOCK_N]
        if HAS_GATE:
            c = tl.load(C + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            g = (g.to(tl.float32) * c[:, None]).to(a_t.dtype)
        if IS_FP32:
            acc = tl.dot(a_t, g, acc, input_precision=PREC)
        else:
            acc = tl.dot(a_t, g, acc)
    tl.store(GW + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
             acc.to(GW.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


# MOEUT_TRITON_AUTOTUNE (moeut.ops.overrides): "full" (default) tunes over all configs below; "pruned" over 3
# per kernel; "off" uses one fixed config per kernel (no tuning, one compile per key: what a short GPU session
# can afford, see ../shared/notes/gpu-kernels.md §5 P0).
AUTOTUNE = OVERRIDES.triton_autotune
_GMM_FIXED, _WGRAD_FIXED = (128, 64, 4, 4), (64, 128, 128, 8, 3)


def _gmm_configs(mode: str = AUTOTUNE) -> list[triton.Config]:
    full = [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3),
            (128, 64, 4, 4), (64, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3)]
    chosen = {"full": full, "pruned": [_GMM_FIXED, (64, 64, 4, 3), (128, 128, 8, 3)], "off": [_GMM_FIXED]}[mode]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st) for bn, bk, w, st in chosen]


def _wgrad_configs(mode: str = AUTOTUNE) -> list[triton.Config]:
    full = [(32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 128, 128, 8, 3),
            (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (128, 64, 64, 8, 3), (64, 128, 64, 8, 4)]
    chosen = {"full": full, "pruned": [_WGRAD_FIXED, (64, 64, 64, 4, 3), (32, 64, 128, 4, 4)],
              "off": [_WGRAD_FIXED]}[mode]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bk, bn, w, st in chosen]


# Tuned launchers: the key holds the matrix widths, flags and the bucketed rows per expert (M_BUCKET),
# never the token count, so a new batch shape does not re-tune. ATOMIC outputs are zeroed between trials.
gather_gmm_tuned = triton.autotune(
    configs=_gmm_configs(), key=["K", "N", "M_BUCKET", "HAS_GATE", "ATOMIC", "GATE_GRAD", "BLOCK_M"],
    reset_to_zero=["Y"])(gather_gmm_kernel)
wgrad_tuned = triton.autotune(configs=_wgrad_configs(), key=["K", "N", "M_BUCKET", "HAS_GATE"])(wgrad_kernel)
