"""The Triton expert matmul (CVMM) for CUDA GPUs: forward, input/weight/gate gradients.

Same contract and plan as the torch backend (see :mod:`moeut.ops`); called through the
``moeut::expert_matmul`` custom op (:mod:`moeut.ops.library`). Kernels live in
:mod:`moeut.ops.triton_kernels`; this module schedules them.

* Forward ``y = Σ_slots c · x W_e``: :func:`~moeut.ops.triton_kernels.gather_gmm_kernel` gathers the
  input rows of each tile by index, multiplies by the tile's expert and scatters to the output rows by
  index — no sorted copy of ``x`` and no unsort pass. Where slots are summed (``out_groups < S``) it adds
  into an fp32 output with atomics; in **deterministic mode** it writes every slot to its own fp32 row and
  sums them in a fixed order instead.
* Backward: the same kernel with ``∂y`` and ``W`` transposed gives ``∂x`` (and, fused, ``∂c``);
  :func:`~moeut.ops.triton_kernels.wgrad_kernel` gives ``∂W`` as a segment reduction per expert (never
  atomics, in either mode).

Deterministic mode is on when ``torch.are_deterministic_algorithms_enabled()`` or ``MOEUT_DETERMINISTIC=1``
(:mod:`moeut.ops.overrides`, or :data:`DETERMINISTIC` is set); results are then bitwise reproducible run to
run.

``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (slow; used by the tests where the installed
triton supports it). Without CUDA and without the interpreter, asking for this backend is an error.
"""

from __future__ import annotations

import importlib

import torch

from moeut.ops.overrides import OVERRIDES, triton_interpreting
from moeut.ops.plan import ExpertPlan

DETERMINISTIC = OVERRIDES.deterministic
_INSTALL_HINT = "install it with `pip install 'moeut[triton]'` (CUDA GPUs only), or use backend='torch'"


def interpreting() -> bool:
    """Is triton's CPU interpreter on (``TRITON_INTERPRET=1``)?"""
    return triton_interpreting()


def is_available(device: torch.device | str | None = None) -> bool:
    """Can the Triton backend run on ``device`` (default: any)? Needs triton and CUDA (or the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if interpreting():
        return True
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available()


def check_available(device: torch.device) -> None:
    """Raise a clear error when the Triton backend cannot run on ``device``."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError(f"expert_matmul backend 'triton' needs the triton package: {_INSTALL_HINT}") from e
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"expert_matmul backend 'triton' runs on CUDA GPUs, but the tensors are on {device}; use "
            f"backend='torch' (or None for automatic), or set TRITON_INTERPRET=1 to run the kernels slowly "
            f"on the CPU for testing")


def deterministic() -> bool:
    return DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


def _kernels():
    # via sys.modules: the tests re-import the kernels with TRITON_INTERPRET set (decided at decoration)
    return importlib.import_module("moeut.ops.triton_kernels")


def _block_m(rows_per_expert: float) -> int:
    """Tile height from the mean rows per expert (host-side, no sync); also the autotuning bucket."""
    for bm in (16, 32, 64):
        if rows_per_expert <= bm * 1.5:
            return bm
    return 128


def tile_schedule(offsets: torch.Tensor, m: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Cut the sorted positions into tiles of at most ``block_m`` rows of one expert each.

    Returns int32 ``(expert, start, end)`` per tile, padded with empty tiles (start = end = 0) to the
    bound ``ceil(M / block_m) + E`` that the host knows without a sync.
    """
    n_experts = offsets.shape[0]
    ends = offsets.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    per_expert = (ends - starts + block_m - 1) // block_m
    tile_end = per_expert.cumsum(0)
    t = torch.arange(triton_cdiv(m, block_m) + n_experts, device=offsets.device)
    e = torch.searchsorted(tile_end, t, right=True)
    valid = e < n_experts
    e_c = e.clamp(max=n_experts - 1)
    r0 = starts[e_c] + (t - (tile_end[e_c] - per_expert[e_c])) * block_m
    r1 = torch.minimum(r0 + block_m, ends[e_c])
    zero = torch.zeros_like(r0)
    return (e_c.to(torch.int32), torch.where(valid, r0, zero).to(torch.int32),
            torch.where(valid, r1, zero).to(torch.int32))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _prec(dtype: torch.dtype) -> tuple[bool, str]:
    is_fp32 = dtype == torch.float32
    tf32 = is_fp32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32
    return is_fp32, ("tf32" if tf32 else "ieee")


def _launch_gmm(a2d, a_rows, weight, transpose_w, c, out_rows, n_out_rows, reduce, out_dtype, plan,
                x_for_gate=None, x_rows=None, store_y=True):
    """``out[out_rows[m]] (+)= c_m · a2d[a_rows[m]] @ W_e(ᵀ)``; returns ``(out, gate_grad_sorted | None)``."""
    k = _kernels()
    m = plan.perm.shape[0]
    e = weight.shape[0]
    kdim, ndim = (weight.shape[2], weight.shape[1]) if transpose_w else (weight.shape[1], weight.shape[2])
    swk, swn = (weight.stride(2), weight.stride(1)) if transpose_w else (weight.stride(1), weight.stride(2))
    block_m = _block_m(m / e)
    tiles = tile_schedule(plan.offsets, m, block_m)
    device = a2d.device
    atomic = reduce and not deterministic()
    if not store_y:
        y = torch.empty(1, ndim, device=device, dtype=torch.float32)
        y_rows = out_rows
    elif not reduce:
        y = torch.empty(n_out_rows, ndim, device=device, dtype=out_dtype)
        y_rows = out_rows
    elif atomic:
        y = torch.zeros(n_out_rows, ndim, device=device, dtype=torch.float32)
        y_rows = out_rows
    else:  # deterministic: each slot its own fp32 row (flat slot order), summed below
        y = torch.empty(m, ndim, device=device, dtype=torch.float32)
        y_rows = plan.perm
    gate_grad = x_for_gate is not None
    cg = torch.zeros(m if gate_grad else 1, triton_cdiv(ndim, 16), device=device, dtype=torch.float32)
    xg = x_for_gate if gate_grad else a2d
    is_fp32, prec = _prec(a2d.dtype)
    args = (a2d, a_rows, a2d.stride(0), a2d.stride(1),
            weight, weight.stride(0), swk, swn,
            c if c is not None else a2d,
            y, y_rows, y.stride(0), y.stride(1),
            xg, x_rows if gate_grad else a_rows, xg.stride(0), xg.stride(1), cg, cg.stride(0),
            *tiles, kdim, ndim, block_m)
    flags = dict(HAS_GATE=c is not None and store_y, ATOMIC=atomic and store_y, STORE_Y=store_y,
                 GATE_GRAD=gate_grad, IS_FP32=is_fp32, PREC=prec, BLOCK_M=block_m)
    n_tiles = tiles[0].shape[0]
    if interpreting():
        k.gather_gmm_kernel[(n_tiles, triton_cdiv(ndim, 32))](*args, **flags, BLOCK_N=32, BLOCK_K=32)
    else:
        k.gather_gmm_tuned[lambda meta: (n_tiles, triton_cdiv(ndim, meta["BLOCK_N"]))](*args, **flags)
    if store_y and reduce and not atomic:
        y = y.view(n_out_rows, m // n_out_rows, ndim).sum(1)
    if store_y and y.dtype != out_dtype:
        y = y.to(out_dtype)
    return y, (cg.sum(1) if gate_grad else None)


def _launch_wgrad(a2d, a_rows, g2d, g_rows, c, plan, weight_shape, dtype):
    k = _kernels()
    e, kdim, ndim = weight_shape
    m = plan.perm.shape[0]
    gw = torch.empty(weight_shape, device=a2d.device, dtype=dtype)
    is_fp32, prec = _prec(a2d.dtype)
    args = (a2d, a_rows, a2d.stride(0), a2d.stride(1), g2d, g_rows, g2d.stride(0), g2d.stride(1),
            c if c is not None else a2d, plan.offsets, gw, gw.stride(0), gw.stride(1), gw.stride(2),
            kdim, ndim, _block_m(m / e))
    flags = dict(HAS_GATE=c is not None, IS_FP32=is_fp32, PREC=prec)
    if interpreting():
        k.wgrad_kernel[(e, triton_cdiv(kdim, 32), triton_cdiv(ndim, 32))](
            *args, **flags, BLOCK_M=16, BLOCK_K=32, BLOCK_N=32)
    else:
        k.wgrad_tuned[lambda meta: (e, triton_cdiv(kdim, meta["BLOCK_K"]), triton_cdiv(ndim, meta["BLOCK_N"]))](
            *args, **flags)
    return gw


# --------------------------------------------------------------------------- backend entry points
def forward(x: torch.Tensor, weight: torch.Tensor, gates: torch.Tensor | None, plan: ExpertPlan, g_out: int,
            save_rows: bool, need_gate_grad: bool):
    """``(y [N, G_out, d_out], None, None)``: backward reads ``x`` again (gathers are cheap on a GPU)."""
    check_available(x.device)
    n, g_in, d_in = x.shape
    s, d_out = plan.shape[1], weight.shape[2]
    if n == 0 or s == 0:
        return x.new_zeros(n, g_out, d_out), None, None
    x2d = x.reshape(n * g_in, d_in)
    c = None if gates is None else gates.reshape(-1).index_select(0, plan.perm)
    y, _ = _launch_gmm(x2d, plan.rows(s // g_in), weight, False, c, plan.rows(s // g_out), n * g_out,
                       g_out != s, x.dtype, plan)
    return y.view(n, g_out, d_out), None, None


def backward(grad_out: torch.Tensor, x: torch.Tensor, a, a_in, weight: torch.Tensor,
             gates: torch.Tensor | None, plan: ExpertPlan, g_out: int, need_x: bool, need_w: bool, need_c: bool):
    check_available(x.device)
    n, g_in, d_in = x.shape
    s, d_out = plan.shape[1], weight.shape[2]
    if n == 0 or s == 0:
        return (x.new_zeros(x.shape) if need_x else None, torch.zeros_like(weight) if need_w else None,
                torch.zeros_like(gates) if need_c else None)
    x2d = x.reshape(n * g_in, d_in)
    g2d = grad_out.reshape(n * g_out, d_out)
    rows_in, rows_out = plan.rows(s // g_in), plan.rows(s // g_out)
    c = None if gates is None else gates.reshape(-1).index_select(0, plan.perm)
    grad_x = grad_w = grad_c = None
    if need_x or need_c:
        gx, gc_sorted = _launch_gmm(g2d, rows_out, weight, True, c, rows_in, n * g_in, g_in != s, x.dtype, plan,
                                    x_for_gate=x2d if need_c else None, x_rows=rows_in, store_y=need_x)
        if need_x:
            grad_x = gx.view(n, g_in, d_in)
        if need_c:
            grad_c = gc_sorted.index_select(0, plan.inv_perm).view_as(gates).to(gates.dtype)
    if need_w:
        grad_w = _launch_wgrad(x2d, rows_in, g2d, rows_out, c, plan, tuple(weight.shape), weight.dtype)
    return grad_x, grad_w, grad_c
