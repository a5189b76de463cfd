"""``grouped_mm``: whether it works here, and the operand layouts it accepts.

Its requirements (torch 2.8-2.13, ``aten/src/ATen/native/GroupedMMUtils.h`` and ``cuda/GroupedBlas.cpp``),
the same on CPU and CUDA unless stated:

* dtypes float32, bfloat16 or float16 for both operands; the output has ``mat_a``'s dtype (float64 is
  refused: that dtype takes the loop).
* each operand (2-D or 3-D) is row-major (last stride 1) or column-major (second-to-last stride 1), and
  its *other* inner stride is a multiple of 16 bytes (8 elements in bf16/fp16, 4 in fp32). The outer
  (expert) stride of a 3-D operand is not checked. Sizes are free: a ``[M, 412]`` view with row stride
  416 is accepted, and the kernel reads only the 412 columns (torch allocates its own outputs that way,
  so an output ``[M, N]`` has row stride ``N`` rounded up to 16 bytes).
* CUDA only: ``data_ptr`` 16-byte aligned (not checked on CPU).
* ``offs``: 1-D int32 cumulative end offsets, any values (empty groups are allowed).
* CUDA: the sync-free CUTLASS kernel runs only for bf16 operands and output on sm90/sm100. Other dtypes
  and devices go to torch's own fallback, which copies ``offs`` to the host (a sync) and loops over ``mm``.

So misaligned widths (moeut-44m's d_model 412 = 824 B in bf16, SwitchHead's d_head 82) are handled by
layout alone, never sent to a loop: gathered rows are written straight into buffers with a padded row
stride (:func:`aligned_empty`, no extra pass), other operands are copied into one when needed
(:func:`aligned`; for the weights one copy of ``W`` per call, a few MB, no cache to invalidate).
"""

from __future__ import annotations

import torch

from moeut.ops.mm_loops import loop_mm, loop_mm_wgrad
from moeut.ops.plan import make_plan

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
GROUPED_MM_EXISTS = _grouped_mm is not None  # in this torch (whether it works is grouped_mm_works)
_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
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
            (_grouped_mm(a, b, offs=plan.offsets), loop_mm(a, b, plan)),
            (_grouped_mm(g, b.transpose(1, 2), offs=plan.offsets), loop_mm(g, b.transpose(1, 2), plan)),
            (_grouped_mm(a.t(), g, offs=plan.offsets), loop_mm_wgrad(a, g, plan)),
        ]
        return all(got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
                   for got, want in checks)
    except Exception:  # noqa: BLE001 — any failure means "don't use it here"
        return False


@torch.compiler.assume_constant_result
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """:func:`_probe`, once per device type and dtype. A constant to ``torch.compile``, which calls it
    instead of tracing the probe's matmuls into the graph."""
    key = (device_type, dtype)
    if key not in _WORKS:
        _WORKS[key] = _probe(torch.device(device_type), dtype)
    return _WORKS[key]


def row_align(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: what grouped_mm wants an operand's non-unit inner stride to be a multiple of."""
    return max(1, 16 // torch.empty(0, dtype=dtype).element_size())


def _padded(k: int, dtype: torch.dtype) -> int:
    a = row_align(dtype)
    return -(-k // a) * a


def aligned_empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``shape`` tensor whose row stride is ``shape[-1]`` rounded up to 16 bytes (a view
    of a padded buffer; the padding is never read)."""
    k = shape[-1]
    kp = _padded(k, like.dtype)
    buf = like.new_empty(*shape[:-1], kp)
    return buf if kp == k else buf[..., :k]


def layout_ok(t: torch.Tensor) -> bool:
    """Does ``t`` (2-D or 3-D) meet grouped_mm's stride and pointer rules (see the module doc)?"""
    align = row_align(t.dtype)
    if t.device.type != "cpu" and t.data_ptr() % 16:
        return False
    s_m, s_n = t.stride(-2), t.stride(-1)
    if s_n == 1 and s_m >= max(1, t.shape[-1]):
        return s_m % align == 0
    if s_m == 1 and s_n >= max(1, t.shape[-2]):
        return s_n % align == 0
    return False


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if grouped_mm accepts its layout, else a copy with a padded row stride. A column-major
    ``t`` (e.g. ``weight.transpose(1, 2)``) is padded along its contiguous dimension and stays column-major."""
    if layout_ok(t):
        return t
    if t.stride(-2) == 1 and t.stride(-1) != 1:
        return aligned(t.transpose(-1, -2)).transpose(-1, -2)
    out = aligned_empty(tuple(t.shape), t)
    out.copy_(t)
    return out


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[M, K] x [E, K, N] -> [M, N]`` by grouped_mm, operands padded where their layout needs it (the
    result may have a padded row stride)."""
    if not a.shape[0]:
        return a.new_zeros(0, b.shape[2])
    return _grouped_mm(aligned(a), aligned(b), offs=offsets)


def grouped_mm_wgrad(a: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[M, K], [M, N] -> [E, K, N]``: per-expert ``aᵀ g`` by grouped_mm, contiguous."""
    if not a.shape[0]:
        return a.new_zeros(offsets.shape[0], a.shape[1], g.shape[1])
    return _grouped_mm(aligned(a).t(), aligned(g), offs=offsets).contiguous()
