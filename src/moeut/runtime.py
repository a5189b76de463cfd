"""Process-level runtime helpers shared by every verb: device resolution, glibc malloc tuning, progress bars."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import resource
import sys
from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from moeut.errors import MoeutError

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


class DeviceError(MoeutError, ValueError):
    """A requested device does not exist on this machine."""


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The device a verb runs on: ``"auto"``/None is ``cuda:<local_rank>`` when CUDA is available, else the
    CPU; an explicit CUDA device on a machine without CUDA is an error (never a silent CPU fallback)."""
    if name is None or name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {str(name)!r} requested but CUDA is not available; use --device cpu")
    return dev


def cpu_has_native_bf16() -> bool:
    """Does oneDNN run bf16 natively on this CPU (AVX512-BF16 / AMX, e.g. AMD Zen 4, Intel Sapphire Rapids)?
    Without it bf16 matmuls are emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else ``platform.processor()``), to name the machine next to a figure."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def tune_malloc() -> bool:
    """Keep glibc from mmap-ing and unmapping every large tensor (docs/performance.md, the CPU section).

    Equivalent to ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``/``MALLOC_TOP_PAD_`` in the
    environment. Returns False (and does nothing) where glibc's ``mallopt`` is unavailable.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return False
    big = 2**31 - 1  # mallopt takes a C int
    ok = mallopt(_M_MMAP_THRESHOLD, big)
    ok &= mallopt(_M_TRIM_THRESHOLD, big)
    ok &= mallopt(_M_TOP_PAD, 2**30)
    return bool(ok)


def progress(it: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """The one progress bar of every verb: tqdm over ``it`` (or a manual bar when ``it`` is None), disabled
    (but still usable: ``update``, ``set_postfix``, ``write``, context manager) when ``enabled`` is False.
    ``kwargs`` go to tqdm (``total``, ``desc``, ``initial``, ``unit``, ``leave``…)."""
    return tqdm(it, disable=not enabled, dynamic_ncols=True, **kwargs)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage`` ``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
