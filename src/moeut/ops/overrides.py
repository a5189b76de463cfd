"""The environment variables that override how the expert matmul runs: read here, once, at import.

Every ``MOEUT_*`` variable the ops honour is read by :func:`read` and nowhere else, so the list below is
complete and a typo in a value fails at import with the variable's name instead of silently meaning the
default. Code reads the parsed values from :data:`OVERRIDES` (the torch backend through its
:class:`~moeut.ops.policy.GemmPolicy`); tests and benchmarks that want another choice use the API
(:func:`moeut.ops.policy.use_policy`), not the environment.

=============================  ==========  =============================================================
variable                       default     meaning
=============================  ==========  =============================================================
``MOEUT_EXPERT_BACKEND``       (unset)     ``torch`` | ``triton`` | ``reference``: the backend used when
                                           ``backend=None`` (:func:`moeut.ops.default_backend`)
``MOEUT_GEMM_IMPL``            ``auto``    torch backend: ``auto`` | ``grouped_mm`` | ``loop``
                                           (:class:`~moeut.ops.policy.GemmPolicy.gemm`)
``MOEUT_SAVE_GATHERED``        ``cpu``     torch backend: keep the gathered input rows for backward on
                                           ``cpu`` only, ``always`` or ``never``
``MOEUT_CPU_ROW_BUCKET``       ``64``      torch backend, CPU bf16/fp16: expert row counts rounded up to a
                                           multiple of this (0: exact counts, no block layout)
``MOEUT_CPU_MAX_BLOCK_WASTE``  ``0.5``     torch backend, CPU bf16/fp16: the block layout while it adds at
                                           most this fraction of pad rows (negative: never)
``MOEUT_DETERMINISTIC``        ``0``       ``1``: the Triton backend sums slots in a fixed order
``MOEUT_TRITON_AUTOTUNE``      ``full``    ``full`` | ``pruned`` | ``off``: Triton configs tuned
=============================  ==========  =============================================================

``TRITON_INTERPRET`` is Triton's own switch (its CPU interpreter); :func:`triton_interpreting` reads it when
asked, because tests set it in a subprocess before triton is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Overrides:
    """The parsed ``MOEUT_*`` variables (see the module doc for each one's meaning)."""

    expert_backend: str | None = None
    gemm: str = "auto"
    save_gathered: str = "cpu"
    cpu_row_bucket: int = 64
    cpu_max_block_waste: float = 0.5
    deterministic: bool = False
    triton_autotune: str = "full"


_CHOICES = {"MOEUT_GEMM_IMPL": ("auto", "grouped_mm", "loop"), "MOEUT_SAVE_GATHERED": ("cpu", "always", "never"),
            "MOEUT_TRITON_AUTOTUNE": ("full", "pruned", "off")}


def _choice(environ: Mapping[str, str], name: str, default: str) -> str:
    value = environ.get(name, default)
    if value not in _CHOICES[name]:
        raise ValueError(f"{name} must be one of {', '.join(_CHOICES[name])}, got {value!r}")
    return value


def _number(environ: Mapping[str, str], name: str, default: str, kind: type) -> int | float:
    try:
        return kind(environ.get(name, default))
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {environ[name]!r}") from None


def read(environ: Mapping[str, str] = os.environ) -> Overrides:
    """Parse the overrides from ``environ``; a bad value raises ``ValueError`` naming the variable."""
    return Overrides(
        expert_backend=environ.get("MOEUT_EXPERT_BACKEND") or None,
        gemm=_choice(environ, "MOEUT_GEMM_IMPL", "auto"),
        save_gathered=_choice(environ, "MOEUT_SAVE_GATHERED", "cpu"),
        cpu_row_bucket=int(_number(environ, "MOEUT_CPU_ROW_BUCKET", "64", int)),
        cpu_max_block_waste=float(_number(environ, "MOEUT_CPU_MAX_BLOCK_WASTE", "0.5", float)),
        deterministic=environ.get("MOEUT_DETERMINISTIC", "0") == "1",
        triton_autotune=_choice(environ, "MOEUT_TRITON_AUTOTUNE", "full"),
    )


def triton_interpreting() -> bool:
    """Is Triton's CPU interpreter on (``TRITON_INTERPRET=1``)? Read on every call (see the module doc)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


OVERRIDES: Overrides = read()
