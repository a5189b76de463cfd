"""Fast pure-PyTorch expert matmul (CPU and GPU): sort slots by expert, grouped GEMM, unsort.

The M = N·S slots are sorted by expert once through an :class:`~moeut.ops.plan.ExpertPlan` (shareable
between the two matmuls of a layer); then every expert's rows are contiguous and its GEMM is one call.
Two strategies, picked per device and dtype by :func:`strategy`:

``"grouped"`` — whole-tensor steps, no Python loop (no host sync on GPU):

1. gather the input row of every sorted slot: ``a = x[perm // (S/G_in)]``                 ``[M, d_in]``
2. one grouped GEMM: ``y_m = a_m @ W[e_m]`` with ``torch.nn.functional.grouped_mm`` (or
   ``torch._grouped_mm``), checked once per device/dtype (:func:`_grouped_mm_works`). Its layout rules
   (see "grouped_mm's requirements" below) are met by construction at every width: operands whose row
   stride is not a multiple of 16 bytes are given a padded row stride, never sent to a loop;
3. unsort (below). Backward: gather ``g``, two more grouped GEMMs. The gathered ``a`` is kept for backward
   on CPU (``SAVE_GATHERED``), gathered again on GPU.

``"loop"`` — expert by expert in Python, with *small reused buffers*: the rows of expert ``e`` are
gathered (and gated) into an L2-sized buffer right before its GEMM, and in backward its output-gradient
rows likewise, shared by its weight- and input-gradient GEMMs; nothing ``S/G_in`` times the size of ``x``
is materialised or kept. Weights are split once with ``unbind`` (never ``W[i]`` in the loop, never a
weight per token). It needs the per-expert counts on the host (a sync on GPU).

On a CPU in bf16/fp16 the GEMMs of the "grouped" strategy never run ``grouped_mm`` (oneDNN builds a kernel per
GEMM shape, :func:`_row_bucket`): the slots are laid out in equal blocks per expert (:class:`_Blocks`, pad rows
zeroed) and every GEMM is one ``bmm``; with a routing too unbalanced for blocks, a loop of ``mm`` over row
counts rounded up to ``ROW_BUCKET``.

``GEMM_IMPL`` (env ``MOEUT_GEMM_IMPL``): ``"auto"`` (default) = "grouped" where ``grouped_mm`` works,
else "loop" (torch without grouped_mm); ``"grouped_mm"`` / ``"loop"`` force one. Why "grouped" is the default
even where the loop's steps are faster in isolation: benchmarks/README.md ("design measurements").

grouped_mm's requirements (torch 2.8-2.13, ``aten/src/ATen/native/GroupedMMUtils.h`` and
``cuda/GroupedBlas.cpp``), the same on CPU and CUDA unless stated:

* dtypes float32, bfloat16 or float16 for both operands; the output has ``mat_a``'s dtype. (float64 is
  refused: that dtype takes the loop.)
* each operand (2-D or 3-D) is row-major (last stride 1) or column-major (second-to-last stride 1), and
  its *other* inner stride is a multiple of 16 bytes (8 elements in bf16/fp16, 4 in fp32). The outer
  (expert) stride of a 3-D operand is not checked. Sizes are free: a ``[M, 412]`` view with row stride
  416 is accepted, and the kernel reads only the 412 columns (torch allocates its own outputs that
  way, so an output ``[M, N]`` has row stride ``N`` rounded up to 16 bytes).
* CUDA only: ``data_ptr`` 16-byte aligned (not checked on CPU).
* ``offs``: 1-D int32 cumulative end offsets, any values (no alignment of group sizes is required;
  empty groups are allowed).
* CUDA: the sync-free CUTLASS kernel runs only for bf16 operands and output on sm90/sm100. Other dtypes
  and devices go to torch's own fallback, which copies ``offs`` to the host (a sync) and loops over
  ``mm``: no worse than our loop, but not sync-free.

So the misaligned widths of moeut-44m (d_model 412 = 824 B in bf16, SwitchHead d_head 82) are handled
by layout alone: gathered rows are written straight into buffers with a padded row stride
(:func:`_aligned_empty`, no extra pass), other operands are copied into one when needed
(:func:`_aligned`; for the weights that is one copy of ``W`` per call, a few MB, no cache to
invalidate), and the op's outputs and gradients are returned contiguous. Autograd is unaffected: the
custom op computes every gradient itself from the logical (unpadded) views.

Unsort: a gather ``y[inv_perm]`` when every slot is its own output group, else the sum of the
``S/G_out`` slots of each group: ``F.embedding_bag`` on CPU (gather and weighted sum in one pass, fp32
accumulation for bf16), gather + ``sum`` on GPU (deterministic).

The gate ``c_m`` scales whichever of the input row and the output row is narrower. On the output side it
is applied by the unsort (the embedding bag's per-sample weights), and with ``save_rows`` the ungated
output rows are kept so that ``∂L/∂c_m = (a_m W_e)·g_m`` is a row dot product at the narrow width; on
the input side (and without saved rows) ``∂L/∂c_m = a_m·(g_m W_eᵀ)`` reuses the input-gradient GEMM.
"""

from __future__ import annotations

import itertools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moeut.ops.plan import ExpertPlan, make_plan

GEMM_IMPL = os.environ.get("MOEUT_GEMM_IMPL", "auto")  # "auto" | "loop" | "grouped_mm"
# "grouped" strategy: keep the gathered input rows for backward ("cpu": on CPU only; "always"; "never")
SAVE_GATHERED = os.environ.get("MOEUT_SAVE_GATHERED", "cpu")
# CPU bf16/fp16: per-expert GEMM row counts rounded up to a multiple of this (see _row_bucket)
ROW_BUCKET = int(os.environ.get("MOEUT_CPU_ROW_BUCKET", "64"))

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


# ------------------------------------------------------------------------------- grouped GEMMs
def _loop_mm(a: torch.Tensor, b: torch.Tensor, plan: ExpertPlan, bucket: int = 0) -> torch.Tensor:
    """``out[m] = a[m] @ b[e_m]``; ``a [M, K]`` sorted by expert, ``b [E, K, N]`` (may be a view).

    ``bucket > 0``: every GEMM gets a row count rounded up to a multiple of ``bucket`` (see
    :func:`_row_bucket`). An expert's extra rows are the next expert's first rows, read from ``a`` and
    written to ``out``; going in expert order, the next expert then overwrites them with its own result
    (each output row depends on its input row only). Experts too close to the end for that go through a
    zero-padded scratch buffer.
    """
    counts = plan.counts_list()
    m = a.shape[0]
    out = a.new_empty(m, b.shape[2])
    start = 0
    for b_e, n in zip(b.unbind(0), counts):
        if n:
            rows = -(-n // bucket) * bucket if bucket else n
            if start + rows <= m:
                torch.mm(a[start:start + rows], b_e, out=out[start:start + rows])
            else:  # the tail: pad a copy
                pad = a.new_zeros(rows, a.shape[1])
                pad[:n] = a[start:start + n]
                out[start:start + n] = torch.mm(pad, b_e)[:n]
        start += n
    return out


def _loop_mm_wgrad(a: torch.Tensor, g: torch.Tensor, plan: ExpertPlan, bucket: int = 0) -> torch.Tensor:
    """``out[e] = Σ_{m in e} a[m]ᵀ g[m]``; ``a [M, K]``, ``g [M, N]`` sorted by expert → ``[E, K, N]``.

    ``bucket > 0``: the rows are the GEMM's reduction dimension, so no other expert's rows may join in.
    Each expert's largest multiple of ``bucket`` rows is one GEMM; the remaining ``< bucket`` rows of all
    experts are gathered into ``[E, bucket, ·]`` blocks (rows past an expert's end zeroed on the narrower
    side) and added by one batched GEMM of fixed shape.
    """
    counts = plan.counts_list()
    e, k, n_out = plan.n_experts, a.shape[1], g.shape[1]
    out = a.new_empty(e, k, n_out)
    start = 0
    for out_e, n in zip(out.unbind(0), counts):
        whole = n - n % bucket if bucket else n
        if whole:
            torch.mm(a[start:start + whole].t(), g[start:start + whole], out=out_e)
        else:
            out_e.zero_()
        start += n
    if bucket and any(n % bucket for n in counts):
        ends = plan.offsets.long()
        tails = ends - (ends - torch.cat([ends.new_zeros(1), ends[:-1]])) % bucket  # first row past the whole part
        j = torch.arange(bucket, device=a.device)
        valid = (tails.unsqueeze(1) + j) < ends.unsqueeze(1)  # [E, bucket]
        rows = torch.where(valid, tails.unsqueeze(1) + j, 0).view(-1)
        a_r, g_r = a.index_select(0, rows), g.index_select(0, rows)
        mask = valid.view(-1, 1).to(a.dtype)
        if k <= n_out:
            a_r.mul_(mask)
        else:
            g_r.mul_(mask)
        out.baddbmm_(a_r.view(e, bucket, k).transpose(1, 2), g_r.view(e, bucket, n_out))
    return out


def _cpu_low_precision(t: torch.Tensor) -> bool:
    """bf16/fp16 on a CPU: the expert GEMMs run as one ``bmm`` over equal blocks (:func:`_blocked`) or a loop
    of ``mm`` with bucketed row counts, never through grouped_mm (see :func:`_row_bucket`)."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _row_bucket(t: torch.Tensor) -> int:
    """Row multiple for the per-expert GEMMs of ``t``'s device and dtype; 0 = exact row counts.

    On a CPU, bf16/fp16 matmuls run through oneDNN, which builds (JIT-compiles) a kernel for every new
    GEMM shape and caches 1024 of them. Expert row counts change with every batch, so with exact counts
    nearly every expert GEMM built a new kernel (about 1 ms, against tens of µs to run it): moeut-small's
    bf16 training step took 3.4x its fp32 step (benchmarks/README.md). Rounded up to a multiple of
    ``ROW_BUCKET`` rows, the shapes come from a small set that stays cached. fp32 (MKL, no per-shape
    kernels) and GPUs keep exact counts. Env ``MOEUT_CPU_ROW_BUCKET`` (0: exact counts).

    These GEMMs never go through grouped_mm on a CPU: its CPU kernel is itself a loop of ``mm``, and
    oneDNN's bf16 ``mm`` turns NaN or Inf in the padding of a row-padded operand (the layout grouped_mm
    needs at widths like 82) into NaN results; the loop reads contiguous operands only.
    """
    return max(ROW_BUCKET, 0) if _cpu_low_precision(t) else 0


def _grouped_kernel(t: torch.Tensor) -> bool:
    """Do the "grouped" strategy's GEMMs run grouped_mm for operands like ``t`` (else a loop of mm)?
    Only then are gathered rows written with a padded row stride."""
    return strategy(t) == "grouped" and _grouped_mm_ok(t) and not _cpu_low_precision(t)


# CPU bf16/fp16: use the block layout (below) while it costs at most this fraction of extra rows
MAX_BLOCK_WASTE = float(os.environ.get("MOEUT_CPU_MAX_BLOCK_WASTE", "0.5"))


class _Blocks(NamedTuple):
    """The sorted layout with every expert's rows padded to one block of ``block`` rows: expert ``e`` owns
    rows ``[e·block, e·block + count_e)`` of an ``[E·block, ·]`` tensor, so each GEMM over all experts is one
    ``bmm``. Quacks like :class:`~moeut.ops.plan.ExpertPlan` for the code below (``perm`` holds slot 0 at the
    pad rows, ``inv_perm`` the block position of every slot); ``pads`` lists the pad rows, which every
    gather into this layout zeroes, so they add nothing to a weight gradient."""

    shape: tuple[int, int]
    n_experts: int
    perm: torch.Tensor
    inv_perm: torch.Tensor
    offsets: torch.Tensor
    pads: torch.Tensor
    block: int

    rows = ExpertPlan.rows  # perm // ratio, the same rule

    def counts_list(self) -> list[int]:
        return [self.block] * self.n_experts


def blocks_possible(t: torch.Tensor) -> bool:
    """May :func:`_blocked` choose the block layout for tensors like ``t`` (then the number of rows the ops
    keep for backward depends on the routing)?"""
    return _row_bucket(t) > 0 and MAX_BLOCK_WASTE >= 0


def _blocked(plan: ExpertPlan, t: torch.Tensor) -> "ExpertPlan | _Blocks":
    """``plan`` in the block layout for GEMMs on tensors like ``t``, or ``plan`` itself.

    CPU bf16/fp16 only (where :func:`_row_bucket` is on): the blocks are the largest expert's row count
    rounded up to the bucket, used while they add at most ``MAX_BLOCK_WASTE`` of extra rows. oneDNN's bf16
    ``bmm`` over equal blocks ran the expert GEMMs 1.9-2.7x faster than a loop of ``mm`` over the experts at
    3-12 % extra rows (benchmarks/README.md); past the limit (a very unbalanced routing) the loop runs.
    A function of the routing counts alone, so forward and backward agree.
    """
    if not blocks_possible(t) or isinstance(plan, _Blocks):
        return plan
    bucket = _row_bucket(t)
    counts = plan.counts_list()
    m, e = sum(counts), plan.n_experts
    if not m:
        return plan
    block = -(-max(counts) // bucket) * bucket
    if e * block > (1 + MAX_BLOCK_WASTE) * m:
        return plan
    dev = plan.perm.device
    # expert e's rows are e·block + j for j < count_e, in sorted order: the block row of every sorted slot
    used = (torch.arange(block, device=dev) < torch.tensor(counts, device=dev).unsqueeze(1)).view(-1)
    pos = used.nonzero().squeeze(1)  # [M]
    perm = plan.perm.new_zeros(e * block).index_copy_(0, pos, plan.perm)
    return _Blocks(plan.shape, e, perm, pos.index_select(0, plan.inv_perm),
                   torch.arange(1, e + 1, device=dev, dtype=torch.int32) * block,
                   (~used).nonzero().squeeze(1), block)


def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
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
        plan = make_plan(torch.repeat_interleave(torch.arange(e), torch.tensor(counts))[None].to(device), e)
        tol = 2e-2 if dtype in (torch.float32, torch.float64) else 1e-1  # "works", not "is precise"
        checks = [
            (_grouped_mm(a, b, offs=plan.offsets), _loop_mm(a, b, plan)),
            (_grouped_mm(g, b.transpose(1, 2), offs=plan.offsets), _loop_mm(g, b.transpose(1, 2), plan)),
            (_grouped_mm(a.t(), g, offs=plan.offsets), _loop_mm_wgrad(a, g, plan)),
        ]
        return all(got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
                   for got, want in checks)
    except Exception:  # noqa: BLE001 — any failure means "don't use it here"
        return False


def _grouped_mm_ok(t: torch.Tensor) -> bool:
    key = (t.device.type, t.dtype)
    if key not in _GROUPED_MM_OK:
        _GROUPED_MM_OK[key] = _grouped_mm_works(t.device, t.dtype)
    return _GROUPED_MM_OK[key]


# --------------------------------------------------------------------------- grouped_mm's layouts
def _row_align(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: what grouped_mm wants an operand's non-unit inner stride to be a multiple of."""
    return max(1, 16 // torch.empty(0, dtype=dtype).element_size())


def _padded(k: int, dtype: torch.dtype) -> int:
    a = _row_align(dtype)
    return -(-k // a) * a


def _aligned_empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``shape`` tensor whose row stride is ``shape[-1]`` rounded up to 16 bytes (a view
    of a padded buffer; the padding is never read)."""
    k = shape[-1]
    kp = _padded(k, like.dtype)
    buf = like.new_empty(*shape[:-1], kp)
    return buf if kp == k else buf[..., :k]


def _layout_ok(t: torch.Tensor) -> bool:
    """Does ``t`` (2-D or 3-D) meet grouped_mm's stride and pointer rules (see the module doc)?"""
    align = _row_align(t.dtype)
    if t.device.type != "cpu" and t.data_ptr() % 16:
        return False
    s_m, s_n = t.stride(-2), t.stride(-1)
    if s_n == 1 and s_m >= max(1, t.shape[-1]):
        return s_m % align == 0
    if s_m == 1 and s_n >= max(1, t.shape[-2]):
        return s_n % align == 0
    return False


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if grouped_mm accepts its layout, else a copy with a padded row stride. A column-major
    ``t`` (e.g. ``weight.transpose(1, 2)``) is padded along its contiguous dimension and stays column-major."""
    if _layout_ok(t):
        return t
    if t.stride(-2) == 1 and t.stride(-1) != 1:
        return _aligned(t.transpose(-1, -2)).transpose(-1, -2)
    out = _aligned_empty(tuple(t.shape), t)
    out.copy_(t)
    return out


def _gather_rows(src: torch.Tensor, rows: torch.Tensor, aligned: bool,
                 plan: "ExpertPlan | _Blocks | None" = None) -> torch.Tensor:
    """``src[rows]`` (``src [R, D]``), written straight into a padded-stride buffer when ``aligned``; with a
    block-layout ``plan`` (:class:`_Blocks`) its pad rows are zeroed."""
    if isinstance(plan, _Blocks):
        return src.index_select(0, rows).index_fill_(0, plan.pads, 0)
    if not aligned:
        return src.index_select(0, rows)
    out = _aligned_empty((rows.shape[0], src.shape[1]), src)
    return torch.index_select(src, 0, rows, out=out)


def _scaled(t: torch.Tensor, c: torch.Tensor, aligned: bool) -> torch.Tensor:
    """``t * c`` as a new tensor, in a padded-stride buffer when ``aligned``."""
    return torch.mul(t, c, out=_aligned_empty(tuple(t.shape), t)) if aligned else t * c


def grouped_mm(a: torch.Tensor, b: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """``[M, K] x [E, K, N] -> [M, N]`` over the expert blocks of ``plan`` (``b`` may be a transposed view).

    With a block-layout ``plan`` (:class:`_Blocks`, CPU bf16/fp16) one ``bmm``; under the "grouped" strategy
    grouped_mm (operands padded by :func:`_aligned` if their row stride is misaligned; the result may have a
    padded row stride); else the Python loop (row counts bucketed on CPU bf16/fp16, :func:`_row_bucket`).
    """
    if isinstance(plan, _Blocks):
        e, blk = plan.n_experts, plan.block
        return _fresh_view(torch.bmm(a.reshape(e, blk, a.shape[1]), b), (e * blk, b.shape[2]))
    if _grouped_kernel(a):
        if not a.shape[0]:
            return a.new_zeros(0, b.shape[2])
        return _grouped_mm(_aligned(a), _aligned(b), offs=plan.offsets)
    return _loop_mm(a, b, plan, _row_bucket(a))


def grouped_mm_wgrad(a: torch.Tensor, g: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """``[M, K], [M, N] -> [E, K, N]``: per-expert ``aᵀ g`` (the weight gradient), contiguous."""
    if isinstance(plan, _Blocks):  # the pad rows are zero in both (gathered into the layout)
        e, blk = plan.n_experts, plan.block
        return torch.bmm(a.reshape(e, blk, a.shape[1]).transpose(1, 2), g.reshape(e, blk, g.shape[1]))
    if _grouped_kernel(a):
        if not a.shape[0]:
            return a.new_zeros(plan.n_experts, a.shape[1], g.shape[1])
        return _grouped_mm(_aligned(a).t(), _aligned(g), offs=plan.offsets).contiguous()
    return _loop_mm_wgrad(a, g, plan, _row_bucket(a))


# --------------------------------------------------------------------------------- the strategy
def strategy(x: torch.Tensor) -> str:
    """``"grouped"`` or ``"loop"`` for an input like ``x`` (its device and dtype); see the module doc."""
    if GEMM_IMPL == "loop":
        return "loop"
    if GEMM_IMPL == "grouped_mm":
        return "grouped"
    return "grouped" if _grouped_mm_ok(x) else "loop"


def gemm_impl(device: torch.device | str, dtype: torch.dtype) -> str:
    """What the torch backend's expert GEMMs run for ``device``/``dtype``: ``"grouped_mm"``, ``"loop"``, or
    ``"loop, rows bucketed to B"`` (CPU bf16/fp16, see :func:`_row_bucket`)."""
    t = torch.empty(0, device=device, dtype=dtype)
    if _grouped_kernel(t):
        return "grouped_mm"
    bucket = _row_bucket(t)
    return f"loop, rows bucketed to {bucket}" if bucket > 1 else "loop"


def _save_gathered_inputs(device: torch.device) -> bool:
    """"grouped": keep the gathered (and gated) input rows for backward instead of gathering again?

    On CPU yes: gathering again costs more than the memory (benchmarks/README.md). On GPU no: gathers are
    cheap there, memory is not.
    """
    return SAVE_GATHERED == "always" or (SAVE_GATHERED == "cpu" and device.type == "cpu")


# --------------------------------------------------------------------------------------- unsort
def _fresh_view(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t.view(shape)`` for a tensor made here, returned as a tensor of its own rather than a view (an op
    output that is a view of an intermediate could not be modified in place by the caller)."""
    return torch.ops.aten._unsafe_view(t, shape)


def _unsort_reduce(y: torch.Tensor, plan: ExpertPlan, n: int, groups: int,
                   gates: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted ``[M, D]`` → ``[N, groups, D]``, summing the ``S/groups`` slots of each group, each scaled by
    its gate first when ``gates`` (``[N, S]``, in slot order) is given.

    Returns a fresh tensor, not a view (callers may apply in-place ops to the op's output).
    """
    s, d = plan.shape[1], y.shape[1]
    if groups == s:  # a pure permutation: a gather (faster than the scatter ``index_copy_``)
        out = y.new_empty(n, groups, d)
        torch.index_select(y, 0, plan.inv_perm, out=out.view(n * groups, d))
        return out if gates is None else out.mul_(gates.reshape(n, groups, 1))
    bags = plan.inv_perm.view(n * groups, s // groups)  # the sorted positions of each group's slots
    if y.device.type == "cpu":
        # embedding_bag is a gather and a (weighted) sum in one pass, accumulating in fp32 for bf16:
        # 2.6x faster than index_add_ in fp32, 10x faster than gather + sum in bf16, and the gate multiply
        # comes free (benchmarks/README.md). Deterministic: each bag is summed in slot order.
        w = None if gates is None else gates.reshape(n * groups, s // groups)
        return _fresh_view(F.embedding_bag(bags, y, mode="sum", per_sample_weights=w), (n, groups, d))
    # GPU: gather + sum (deterministic, unlike a scatter with atomics; bf16 summed in fp32)
    g = y.index_select(0, plan.inv_perm).view(n, groups, s // groups, d)
    if gates is not None:
        g.mul_(gates.reshape(n, groups, s // groups, 1))  # g is a fresh gather: no second [M, D] buffer
    return g.sum(2)


# ------------------------------------------------------------------------------- loop strategy
def _loop_forward(x2d, rows, weight, plan, c, scale_input):
    """``y_m = (c_m·) a_m @ W_e`` expert by expert, each ``a_e`` gathered into a small reused buffer."""
    counts = plan.counts_list()
    d_in, d_out = x2d.shape[1], weight.shape[2]
    y = x2d.new_empty(rows.shape[0], d_out)
    buf = x2d.new_empty(max(counts), d_in)
    c_split = c.split(counts) if c is not None else itertools.repeat(None)
    for r_e, c_e, w_e, y_e, n in zip(rows.split(counts), c_split, weight.unbind(0), y.split(counts), counts):
        if not n:
            continue
        a_e = buf[:n]
        torch.index_select(x2d, 0, r_e, out=a_e)
        if c_e is not None and scale_input:
            a_e.mul_(c_e)
        torch.mm(a_e, w_e, out=y_e)
        if c_e is not None and not scale_input:
            y_e.mul_(c_e)
    return y


def _loop_backward(x2d, rows_in, g2d, rows_out, weight, plan, c, scale_input, need_x, need_w, need_c):
    """Sorted ``∂x`` rows ``[M, d_in]`` (or None), ``∂W`` ``[E, d_in, d_out]``, sorted ``∂c`` ``[M]``.

    Per expert, its input rows and output-gradient rows are gathered into small reused buffers that
    both of its GEMMs (``aᵀg`` and ``g Wᵀ``) then read from cache.
    """
    counts = plan.counts_list()
    m, d_in, d_out, big = rows_in.shape[0], x2d.shape[1], weight.shape[2], max(counts)
    grad_w = weight.new_empty(weight.shape) if need_w else None
    t = x2d.new_empty(m, d_in) if need_x else None  # sorted ∂x rows
    grad_c = x2d.new_empty(m) if need_c else None
    need_a = need_w or need_c
    a_buf = x2d.new_empty(big, d_in) if need_a else None
    g_buf = x2d.new_empty(big, d_out)
    gated_buf = None
    if need_w and c is not None:  # the gated side of ∂W = Σ c aᵀ g
        gated_buf = x2d.new_empty(big, d_in if scale_input else d_out)
    t_buf = x2d.new_empty(big, d_in) if need_c and not need_x else None

    def split(t):
        return t.split(counts) if t is not None else itertools.repeat(None)

    for r_in, r_out, c_e, w_e, gw_e, t_e, gc_e, n in zip(
            rows_in.split(counts), rows_out.split(counts), split(c), weight.unbind(0),
            grad_w.unbind(0) if need_w else itertools.repeat(None), split(t), split(grad_c), counts):
        if not n:
            if need_w:
                gw_e.zero_()
            continue
        g_e = g_buf[:n]
        torch.index_select(g2d, 0, r_out, out=g_e)
        if need_a:
            a_e = a_buf[:n]
            torch.index_select(x2d, 0, r_in, out=a_e)
        if need_w:
            if c_e is None:
                torch.mm(a_e.t(), g_e, out=gw_e)
            elif scale_input:
                torch.mm(torch.mul(a_e, c_e, out=gated_buf[:n]).t(), g_e, out=gw_e)
            else:
                torch.mm(a_e.t(), torch.mul(g_e, c_e, out=gated_buf[:n]), out=gw_e)
        if need_x or need_c:
            if t_e is None:
                t_e = t_buf[:n]
            torch.mm(g_e, w_e.t(), out=t_e)  # g W_eᵀ
            if need_c:  # ∂c_m = a_m · (g_m W_eᵀ)
                torch.sum(a_e * t_e, 1, out=gc_e)
            if need_x and c_e is not None:
                t_e.mul_(c_e)
    return t, grad_w, grad_c


# ------------------------------------------------------------------------------------ the operation
# Called by the ``moeut::expert_matmul`` custom op (moeut.ops.library), which owns autograd.
def saves_rows(device: torch.device) -> bool:
    """Will :func:`forward` be asked to return the gathered input rows for backward? (see
    :func:`_save_gathered_inputs`; the loop strategy re-reads ``x`` instead)."""
    return GEMM_IMPL != "loop" and _save_gathered_inputs(device)


def forward(x: torch.Tensor, weight: torch.Tensor, gates: torch.Tensor | None, plan: ExpertPlan, g_out: int,
            save_rows: bool, need_gate_grad: bool):
    """``(y [N, G_out, d_out], a, side)``. With ``save_rows`` the backward's inputs are returned instead of
    gathered again: ``a`` the ungated gathered input rows (when backward reads them: ∂W with the gate on
    the output side, ∂c with it on the input side) and ``side`` the gated input rows (gate on the input
    side) or the ungated output rows ``a_m W_e`` (gate on the output side, with ∂c wanted: ∂c is then a
    row dot product at the narrow width ``d_out``). Otherwise both are None."""
    n, g_in, d_in = x.shape
    s, d_out = plan.shape[1], weight.shape[2]
    scale_input = gates is not None and d_in <= d_out  # gate the narrower side
    if n == 0 or s == 0:
        return x.new_zeros(n, g_out, d_out), None, None
    x2d = x.reshape(n * g_in, d_in)
    out_gates = gates if gates is not None and not scale_input else None
    if strategy(x) == "loop" and not save_rows:
        c = gates.reshape(-1).index_select(0, plan.perm).unsqueeze(1) if scale_input else None
        y = _loop_forward(x2d, plan.rows(s // g_in), weight, plan, c, scale_input)
        return _unsort_reduce(y, plan, n, g_out, out_gates), None, None
    plan = _blocked(plan, x)  # CPU bf16: every expert's rows in one block of equal size
    rows = plan.rows(s // g_in)
    # a gate on the input side multiplies the sorted rows; one on the output side is applied by the reduce
    c = gates.reshape(-1).index_select(0, plan.perm).unsqueeze(1) if scale_input else None  # [M, 1]
    grouped = _grouped_kernel(x)  # padded row strides for grouped_mm
    mm = grouped_mm  # (which runs the loop under the loop strategy)
    # [M, d_in], sorted by expert; a padded row stride for grouped_mm unless it is returned (op outputs
    # are contiguous), in which case grouped_mm pads a copy if the width needs it
    a = _gather_rows(x2d, rows, aligned=grouped and not save_rows, plan=plan)
    side = None
    if scale_input:
        a_in = a * c if save_rows and need_gate_grad else a.mul_(c)  # keep ungated a for ∂c
        y = mm(a_in, weight, plan)
        side, a = a_in, (a if a is not a_in else None)
    else:
        y = mm(a, weight, plan)
        if out_gates is not None and save_rows and need_gate_grad:
            side = y.contiguous()  # ungated rows for ∂c (an op output: contiguous)
    y = _unsort_reduce(y, plan, n, g_out, out_gates)
    if not save_rows:
        return y, None, None
    return y, a, side


def backward(grad_out: torch.Tensor, x: torch.Tensor, a: torch.Tensor | None, side: torch.Tensor | None,
             weight: torch.Tensor, gates: torch.Tensor | None, plan: ExpertPlan, g_out: int,
             need_x: bool, need_w: bool, need_c: bool):
    """``(∂x, ∂W, ∂gates)`` (None where not needed) from what :func:`forward` returned.

    Gate on the output side (``d_out < d_in``): ``g̃_m = c_m g_m`` serves both ``∂W_e = Σ a_mᵀ g̃_m`` and
    ``∂x_m = g̃_m W_eᵀ``, and ``∂c_m = (a_m W_e)·g_m`` reads the saved ungated output rows (width ``d_out``)
    when forward kept them; otherwise ``∂c_m = a_m·(g_m W_eᵀ)`` at width ``d_in``. Gate on the input side:
    ``∂W_e = Σ (c_m a_m)ᵀ g_m``, ``t_m = g_m W_eᵀ``, ``∂c_m = a_m·t_m``, ``∂x_m = c_m t_m`` (all at ``d_in``).
    """
    n, g_in, d_in = x.shape
    s, d_out = plan.shape[1], weight.shape[2]
    if n == 0 or s == 0:
        return (x.new_zeros(x.shape) if need_x else None, torch.zeros_like(weight) if need_w else None,
                torch.zeros_like(gates) if need_c else None)
    scale_input = gates is not None and d_in <= d_out
    # contiguous(): gathering rows of a broadcast gradient (e.g. of ``.sum()``) is 8x slower
    g2d = grad_out.contiguous().view(n * g_out, d_out)
    loop = strategy(x) == "loop" and a is None and side is None
    if not loop:
        plan = _blocked(plan, x)  # as forward chose
    c = None if gates is None else gates.reshape(-1).index_select(0, plan.perm).unsqueeze(1)
    rows_in, rows_out = plan.rows(s // g_in), plan.rows(s // g_out)
    grad_x = grad_w = grad_c = None

    if loop:
        t, grad_w, gc = _loop_backward(x.reshape(n * g_in, d_in), rows_in, g2d, rows_out, weight, plan, c,
                                       scale_input, need_x, need_w, need_c)
        if need_c:
            grad_c = gc.index_select(0, plan.inv_perm).view_as(gates)
        if need_x:
            grad_x = _unsort_reduce(t, plan, n, g_in)
        return grad_x, grad_w, grad_c

    grouped = _grouped_kernel(x)  # padded row strides for grouped_mm
    a_in = side if scale_input else None  # gated input rows
    y_raw = side if not scale_input else None  # ungated output rows
    out_gated = c is not None and not scale_input
    narrow_c = out_gated and y_raw is not None  # ∂c from the saved output rows
    need_a = (need_c or (need_w and a_in is None)) if scale_input else (need_w or (need_c and not narrow_c))
    if a is None and need_a:  # not kept: gather again
        a = _gather_rows(x.reshape(n * g_in, d_in), rows_in, aligned=grouped, plan=plan)
    mm, wgrad = grouped_mm, grouped_mm_wgrad
    g = _gather_rows(g2d, rows_out, aligned=grouped, plan=plan)  # [M, d_out]
    if narrow_c:
        g_c = _scaled(g, c, grouped) if need_w or need_x else None  # c_m g_m, [M, d_out]
        if need_w:
            grad_w = wgrad(a, g_c, plan)
        if need_c:
            grad_c = (y_raw * g).sum(1).index_select(0, plan.inv_perm).view_as(gates)
        if need_x:
            grad_x = _unsort_reduce(mm(g_c, weight.transpose(1, 2), plan), plan, n, g_in)
        return grad_x, grad_w, grad_c
    if need_w:  # ∂L/∂W_e = Σ_m c_m a_mᵀ g_m, with c applied to the narrower side
        if c is None:
            grad_w = wgrad(a, g, plan)
        elif scale_input:
            grad_w = wgrad(a_in if a_in is not None else _scaled(a, c, grouped), g, plan)
        else:
            grad_w = wgrad(a, _scaled(g, c, grouped), plan)
    if need_x or need_c:
        t = mm(g, weight.transpose(1, 2), plan)  # g_m W_eᵀ, [M, d_in]
        if need_c:  # ∂L/∂c_m = (a_m W_e) · g_m = a_m · t_m
            grad_c = (a * t).sum(1).index_select(0, plan.inv_perm).view_as(gates)
        if need_x:  # ∂x_m = c_m t_m, the gate applied by the reduce
            grad_x = _unsort_reduce(t, plan, n, g_in, gates)
    return grad_x, grad_w, grad_c


# ----------------------------------------------------------------------------- few slots (decoding)
FEW_SLOTS = 64  # at or below this many (row, slot) pairs, skip the sort: gather weights and one bmm


def expert_matmul_few_slots(x: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor,
                            gates: torch.Tensor | None, out_groups: int) -> torch.Tensor:
    """The contract for a handful of slots (e.g. one token per step while decoding).

    Gathering a weight matrix per slot is ruinous for a training batch, but with a few slots it replaces
    the sort, the per-expert GEMM dispatch and the unsort by one gather and one ``bmm``.
    """
    n, g_in, d_in = x.shape
    s, d_out = expert_ids.shape[1], weight.shape[2]
    xs = x.repeat_interleave(s // g_in, dim=1) if g_in != s else x  # slot s reads x[:, s // (S/G_in)]
    w = weight[expert_ids.reshape(-1)]  # [N·S, d_in, d_out]
    y = torch.bmm(xs.reshape(n * s, 1, d_in), w).view(n, s, d_out)
    if gates is not None:
        y = y * gates.unsqueeze(-1)
    if out_groups != s:
        y = y.view(n, out_groups, s // out_groups, d_out).sum(2)
    return y


# --------------------------------------------------------------------- σ-MoE experts, fused (CPU path)
def sigma_moe_forward(x2d: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor,
                      plan: ExpertPlan, save_rows: bool):
    """``y = Σ_k c_k · ReLU(x W₁[e_k]) W₂[e_k]`` with both projections in one sorted order.

    The hidden rows stay sorted by expert between the two GEMMs: no unsort of ``h`` after the
    up-projection and no gather before the down-projection (and likewise for ``∂h`` in backward), which
    two separate expert matmuls need. Returns ``(y [N, d], a | None, h)`` where ``a`` are the gathered
    input rows (kept on CPU, see :func:`_save_gathered_inputs`) and ``h`` the sorted post-ReLU hidden rows.
    """
    n, d = x2d.shape
    k = plan.shape[1]
    if n == 0 or k == 0:
        return x2d.new_zeros(n, values.shape[2]), None, x2d.new_zeros(0, keys.shape[2])
    plan = _blocked(plan, x2d)  # CPU bf16: every expert's rows in one block of equal size
    rows = plan.rows(k)
    grouped = _grouped_kernel(x2d)
    a = _gather_rows(x2d, rows, aligned=grouped and not save_rows, plan=plan)  # [M, d] (returned when save_rows)
    h = grouped_mm(a, keys, plan).relu_()  # [M, d_e], row stride padded by grouped_mm if d_e needs it
    # Σ_k c_k (h_k W₂): the gates are applied by the reduce, so no pass over the rows multiplies them
    y = _fresh_view(_unsort_reduce(grouped_mm(h, values, plan), plan, n, 1, gates), (n, values.shape[2]))
    return y, (a if save_rows else None), h.contiguous()  # an op output: contiguous, as its fake says


def sigma_moe_backward(grad_y: torch.Tensor, x2d: torch.Tensor, a: torch.Tensor | None, h: torch.Tensor,
                       keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor, plan: ExpertPlan,
                       need_x: bool, need_keys: bool, need_values: bool, need_gates: bool):
    """``(∂x, ∂W₁, ∂W₂, ∂gates)`` (None where not needed); see :func:`sigma_moe_forward`.

    With ``t = ∂y_m W₂ᵀ``: ``∂c_m = h_m · t_m``, ``∂h_m = c_m t_m ⊙ [h_m > 0]``, ``∂W₂ = Σ c_m h_mᵀ ∂y_m``.
    """
    n, d = x2d.shape
    k = plan.shape[1]
    if n == 0 or k == 0:
        return (torch.zeros_like(x2d) if need_x else None, torch.zeros_like(keys) if need_keys else None,
                torch.zeros_like(values) if need_values else None, torch.zeros_like(gates) if need_gates else None)
    plan = _blocked(plan, x2d)  # as forward chose
    rows = plan.rows(k)
    c = gates.reshape(-1).index_select(0, plan.perm).unsqueeze(1)
    grouped = _grouped_kernel(x2d)
    g = _gather_rows(grad_y.contiguous(), rows, aligned=grouped, plan=plan)  # [M, d]
    grad_x = grad_keys = grad_values = grad_gates = None
    if need_values:
        grad_values = (grouped_mm_wgrad(_scaled(h, c, grouped), g, plan) if keys.shape[2] <= values.shape[2]
                       else grouped_mm_wgrad(h, _scaled(g, c, grouped), plan))
    if need_x or need_keys or need_gates:
        t = grouped_mm(g, values.transpose(1, 2), plan)  # [M, d_e]
        if need_gates:
            grad_gates = (t * h).sum(1).index_select(0, plan.inv_perm).view_as(gates)
        dh = torch.ops.aten.threshold_backward(t.mul_(c), h, 0)  # c_m t_m where h_m > 0, one pass
        if need_keys:
            if a is None:
                a = _gather_rows(x2d, rows, aligned=grouped, plan=plan)
            grad_keys = grouped_mm_wgrad(a, dh, plan)
        if need_x:
            grad_x = _fresh_view(_unsort_reduce(grouped_mm(dh, keys.transpose(1, 2), plan), plan, n, 1), (n, d))
    return grad_x, grad_keys, grad_values, grad_gates
