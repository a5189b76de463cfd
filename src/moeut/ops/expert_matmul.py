"""The public expert matmul: validation, autocast, and the one place that picks a backend."""

from __future__ import annotations

import os
from typing import Callable

import torch

from moeut.ops.plan import ExpertPlan, make_plan
from moeut.ops.reference import expert_matmul_reference
from moeut.ops import torch_backend, triton_backend
from moeut.ops.torch_backend import expert_matmul_few_slots
from moeut.ops.library import expert_matmul_planned

# name -> fn(x [N, G_in, d_in], expert_ids [N, S], weight, gates | None, out_groups, plan | None)
def _planned(backend: str) -> Callable[..., torch.Tensor]:
    def run(x, ids, w, gates, g_out, plan):
        if backend == "torch" and ids.numel() <= torch_backend.FEW_SLOTS:
            return expert_matmul_few_slots(x, ids, w, gates, g_out)
        return expert_matmul_planned(x, w, gates, plan if plan is not None else make_plan(ids, w.shape[0]), g_out,
                                     backend)
    return run


_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": lambda x, ids, w, gates, g_out, plan: expert_matmul_reference(x, ids, w, gates, g_out),
    "torch": _planned("torch"),
    "triton": _planned("triton"),
}


def available_backends() -> list[str]:
    """Names usable with ``expert_matmul(..., backend=name)`` in this installation ("triton" only with
    the triton package and a CUDA GPU, or its interpreter)."""
    return [name for name in _BACKENDS if name != "triton" or triton_backend.is_available()]


def default_backend(device: torch.device | str) -> str:
    """The backend used when ``backend=None``: the fastest one available for ``device``.

    The single place that chooses: "triton" on a CUDA device when triton is installed, else "torch".
    Environment override: ``MOEUT_EXPERT_BACKEND`` (e.g. ``torch`` to compare on a GPU).
    """
    device = torch.device(device)
    forced = os.environ.get("MOEUT_EXPERT_BACKEND")
    if forced:
        return forced
    if device.type == "cuda" and triton_backend.is_available(device):
        return "triton"
    return "torch"


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype if autocast is on for ``device_type``, else None (torch >= 2.4 API)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):  # device type without autocast support
        return None
    return None


def expert_matmul(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weight: torch.Tensor,
    gates: torch.Tensor | None = None,
    *,
    out_groups: int | None = None,
    backend: str | None = None,
    plan: ExpertPlan | None = None,
) -> torch.Tensor:
    """Apply per-slot experts and sum slots into output groups; see :mod:`moeut.ops` for the contract.

    ``x [N, G_in, d_in]`` (or ``[N, d_in]``), ``expert_ids [N, S]``, ``weight [E, d_in, d_out]``,
    ``gates [N, S]`` or None → ``[N, G_out, d_out]``. ``plan`` (from :func:`make_plan` on the same
    ``expert_ids`` and ``E``) lets two calls share one sort; ``backend`` defaults to
    :func:`default_backend` of ``x.device``.
    """
    # ---- shapes
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, G_in, d_in] or [N, d_in], got shape {_shape(x)}")
    if x.dim() == 2:
        x = x.unsqueeze(1)
    n, g_in, d_in = x.shape
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dim() != 2 or expert_ids.shape[0] != n:
        raise ValueError(f"expert_ids must be [N, S] = [{n}, S] (N from x), got shape {_shape(expert_ids)}")
    s = expert_ids.shape[1]
    if s < 1 or s % g_in:
        raise ValueError(
            f"expert_ids has S = {s} slots, but S must be a positive multiple of x's G_in = {g_in} "
            f"(x shape {tuple(x.shape)})")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[1] != d_in:
        raise ValueError(f"weight must be [E, d_in, d_out] with d_in = {d_in} (from x), got shape {_shape(weight)}")
    n_experts, _, d_out = weight.shape
    if n_experts < 1:
        raise ValueError("weight must hold at least one expert (E >= 1)")
    if gates is not None and (not isinstance(gates, torch.Tensor) or tuple(gates.shape) != (n, s)):
        raise ValueError(f"gates must be [N, S] = [{n}, {s}] like expert_ids, got shape {_shape(gates)}")
    if out_groups is None:
        out_groups = s if gates is None else 1
    if not isinstance(out_groups, int) or isinstance(out_groups, bool) or out_groups < 1 or s % out_groups:
        raise ValueError(f"out_groups must be a positive divisor of S = {s}, got {out_groups!r}")

    # ---- dtypes and devices
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
        raise TypeError(f"expert_ids must be an integer tensor, got dtype {expert_ids.dtype}")
    if gates is not None and not gates.dtype.is_floating_point:
        raise TypeError(f"gates must be a floating-point tensor, got dtype {gates.dtype}")
    for name, t in (("expert_ids", expert_ids), ("weight", weight), ("gates", gates)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    autocast_dtype = compute_dtype = _autocast_dtype(x.device.type)
    if compute_dtype is None:
        if weight.dtype != x.dtype:
            raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype} (outside autocast)")
        compute_dtype = x.dtype
    # under autocast everything is cast to the autocast dtype (like F.linear); gates (fp32 from the
    # router) always follow the compute dtype. Casts happen here, so autograd casts gradients back.
    x, weight = x.to(compute_dtype), weight.to(compute_dtype)
    if gates is not None:
        gates = gates.to(compute_dtype)

    # ---- plan and backend
    if plan is not None:
        if not isinstance(plan, ExpertPlan):
            raise TypeError(f"plan must be an ExpertPlan from make_plan(), got {type(plan).__name__}")
        if plan.shape != (n, s) or plan.n_experts != n_experts or plan.device != x.device:
            raise ValueError(
                f"plan was made for expert_ids {plan.shape} with {plan.n_experts} experts on {plan.device}, "
                f"but this call has expert_ids ({n}, {s}) and weight with {n_experts} experts on {x.device}")
    if backend is None:
        backend = default_backend(x.device)
    fn = _BACKENDS.get(backend)
    if fn is None:
        raise ValueError(f"unknown expert_matmul backend {backend!r}; available: {available_backends()}")
    if backend == "triton":
        triton_backend.check_available(x.device)
    if backend == "reference" and x.device.type == "cpu" and expert_ids.numel():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"expert_ids must lie in [0, {n_experts}), found values in [{lo}, {hi}]")
    if autocast_dtype is None:
        return fn(x, expert_ids, weight, gates, out_groups, plan)
    # inputs are cast already; with autocast left on, ops inside the backend (e.g. ``sum``, which
    # autocast runs in fp32) would change the output dtype
    with torch.autocast(x.device.type, enabled=False):
        return fn(x, expert_ids, weight, gates, out_groups, plan)


def sigma_moe_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    backend: str | None = None,
    plan: ExpertPlan | None = None,
) -> torch.Tensor:
    """The experts of a σ-MoE layer: ``y = Σ_k gates[:, k] · ReLU(x @ keys[e_k]) @ values[e_k]``.

    ``x [N, d]``, ``expert_ids``/``gates [N, K]``, ``keys [E, d, d_e]``, ``values [E, d_e, d_out]`` →
    ``[N, d_out]``. Equal to two :func:`expert_matmul` calls with a ReLU between them (which is what the
    reference and Triton backends run); the torch backend fuses them so the hidden rows stay sorted by
    expert between the projections (``moeut::sigma_moe``).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be [N, d], got shape {_shape(x)}")
    for name, t, dims in (("keys", keys, 3), ("values", values, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be [E, d_in, d_out], got shape {_shape(t)}")
    if keys.shape[0] != values.shape[0] or keys.shape[2] != values.shape[1]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must be [E, d, d_e] and "
                         f"[E, d_e, d_out] with the same E and d_e")
    if backend is None:
        backend = default_backend(x.device)
    few = expert_ids.numel() <= torch_backend.FEW_SLOTS if isinstance(expert_ids, torch.Tensor) else False
    if backend != "torch" or few or not torch.is_tensor(gates) or gates.shape != expert_ids.shape:
        h = torch.relu(expert_matmul(x, expert_ids, keys, backend=backend, plan=plan))
        return expert_matmul(h, expert_ids, values, gates, backend=backend, plan=plan).squeeze(1)
    # validate as the first projection would (shapes, dtypes, devices, ids range, plan)
    if plan is None:
        plan = make_plan(expert_ids, keys.shape[0])
    compute_dtype = _autocast_dtype(x.device.type)
    if compute_dtype is None:
        for name, t in (("keys", keys), ("values", values)):
            if t.dtype != x.dtype:
                raise TypeError(f"{name} dtype {t.dtype} must match x dtype {x.dtype} (outside autocast)")
        compute_dtype = x.dtype
    if plan.shape != tuple(expert_ids.shape) or plan.n_experts != keys.shape[0] or x.shape[1] != keys.shape[1] \
            or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, expert_ids {tuple(expert_ids.shape)}, keys "
                         f"{tuple(keys.shape)}, plan for {plan.shape} with {plan.n_experts} experts")
    x, keys, values, gates = (t.to(compute_dtype) for t in (x, keys, values, gates))
    save_rows = torch_backend.saves_rows(x.device)
    with torch.autocast(x.device.type, enabled=False):  # inputs are cast; keep ops inside in that dtype
        y, _, _ = torch.ops.moeut.sigma_moe(x, keys, values, gates, plan.perm, plan.inv_perm, plan.offsets,
                                            save_rows)
    return y
