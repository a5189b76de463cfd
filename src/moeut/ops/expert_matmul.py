"""The public expert matmul: validation, autocast, and the one place that picks a backend."""

from __future__ import annotations

import torch

from moeut.ops import strategy as st
from moeut.ops import triton_backend
from moeut.ops.few_slots import expert_matmul_few_slots
from moeut.ops.library import expert_matmul_planned, sigma_moe_planned
from moeut.ops.overrides import OVERRIDES
from moeut.ops.plan import ExpertPlan, make_plan
from moeut.ops.policy import current_policy
from moeut.ops.reference import expert_matmul_reference
from moeut.ops.strategy import Strategy

_BACKENDS = ("reference", "torch", "triton")


def available_backends() -> list[str]:
    """Names usable with ``expert_matmul(..., backend=name)`` in this installation ("triton" only with
    the triton package and a CUDA GPU, or its interpreter)."""
    return [name for name in _BACKENDS if name != "triton" or triton_backend.is_available()]


def default_backend(device: torch.device | str) -> str:
    """The backend used when ``backend=None``: the fastest one available for ``device``.

    The single place that chooses: "triton" on a CUDA device when triton is installed, else "torch".
    Environment override: ``MOEUT_EXPERT_BACKEND`` (e.g. ``torch`` to compare on a GPU; read at import,
    :mod:`moeut.ops.overrides`).
    """
    device = torch.device(device)
    if OVERRIDES.expert_backend:
        return OVERRIDES.expert_backend
    if device.type == "cuda" and triton_backend.is_available(device):
        return "triton"
    return "torch"


def _run(backend: str, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gates: torch.Tensor | None,
         g_out: int, plan: ExpertPlan | None) -> torch.Tensor:
    """Validated, cast inputs through ``backend``; for "torch" the policy chooses the strategy here, once."""
    if backend == "reference":
        return expert_matmul_reference(x, ids, w, gates, g_out)
    if backend == "triton":
        strategy = Strategy(st.TRITON)
    else:
        strategy = current_policy().choose(x.device, x.dtype, ids.numel())
        if strategy.kernel == st.FEW_SLOTS:
            return expert_matmul_few_slots(x, ids, w, gates, g_out)
    plan = plan if plan is not None else make_plan(ids, w.shape[0])
    return expert_matmul_planned(x, w, gates, plan, g_out, strategy)


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


def _check_shapes(x: torch.Tensor, expert_ids, weight, gates, out_groups) -> int:
    """Raise ``ValueError`` naming the argument whose shape is wrong; return ``G_out`` (its default filled in)."""
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
    if weight.shape[0] < 1:
        raise ValueError("weight must hold at least one expert (E >= 1)")
    if gates is not None and (not isinstance(gates, torch.Tensor) or tuple(gates.shape) != (n, s)):
        raise ValueError(f"gates must be [N, S] = [{n}, {s}] like expert_ids, got shape {_shape(gates)}")
    if out_groups is None:
        out_groups = s if gates is None else 1
    if not isinstance(out_groups, int) or isinstance(out_groups, bool) or out_groups < 1 or s % out_groups:
        raise ValueError(f"out_groups must be a positive divisor of S = {s}, got {out_groups!r}")
    return out_groups


def _check_dtypes_and_devices(x: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor,
                              gates: torch.Tensor | None) -> torch.dtype | None:
    """Raise ``TypeError``/``ValueError`` for a wrong dtype or device; return the autocast dtype, if on."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
        raise TypeError(f"expert_ids must be an integer tensor, got dtype {expert_ids.dtype}")
    if gates is not None and not gates.dtype.is_floating_point:
        raise TypeError(f"gates must be a floating-point tensor, got dtype {gates.dtype}")
    for name, t in (("expert_ids", expert_ids), ("weight", weight), ("gates", gates)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    autocast_dtype = _autocast_dtype(x.device.type)
    if autocast_dtype is None and weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype} (outside autocast)")
    return autocast_dtype


def _check_plan(plan: ExpertPlan | None, x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int) -> None:
    if plan is None:
        return
    if not isinstance(plan, ExpertPlan):
        raise TypeError(f"plan must be an ExpertPlan from make_plan(), got {type(plan).__name__}")
    if plan.shape != tuple(expert_ids.shape) or plan.n_experts != n_experts or plan.device != x.device:
        raise ValueError(
            f"plan was made for expert_ids {plan.shape} with {plan.n_experts} experts on {plan.device}, "
            f"but this call has expert_ids {tuple(expert_ids.shape)} and weight with {n_experts} experts on "
            f"{x.device}")


def _check_backend(backend: str, x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown expert_matmul backend {backend!r}; available: {available_backends()}")
    if backend == "triton":
        triton_backend.check_available(x.device)
    if backend == "reference" and x.device.type == "cpu" and expert_ids.numel():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"expert_ids must lie in [0, {n_experts}), found values in [{lo}, {hi}]")


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
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, G_in, d_in] or [N, d_in], got shape {_shape(x)}")
    if x.dim() == 2:
        x = x.unsqueeze(1)
    out_groups = _check_shapes(x, expert_ids, weight, gates, out_groups)
    autocast_dtype = _check_dtypes_and_devices(x, expert_ids, weight, gates)
    # under autocast everything is cast to the autocast dtype (like F.linear); gates (fp32 from the
    # router) always follow the compute dtype. Casts happen here, so autograd casts gradients back.
    compute_dtype = autocast_dtype or x.dtype
    x, weight = x.to(compute_dtype), weight.to(compute_dtype)
    if gates is not None:
        gates = gates.to(compute_dtype)
    _check_plan(plan, x, expert_ids, weight.shape[0])
    if backend is None:
        backend = default_backend(x.device)
    _check_backend(backend, x, expert_ids, weight.shape[0])
    if autocast_dtype is None:
        return _run(backend, x, expert_ids, weight, gates, out_groups, plan)
    # inputs are cast already; with autocast left on, ops inside the backend (e.g. ``sum``, which
    # autocast runs in fp32) would change the output dtype
    with torch.autocast(x.device.type, enabled=False):
        return _run(backend, x, expert_ids, weight, gates, out_groups, plan)


def _check_sigma_shapes(x, keys, values) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be [N, d], got shape {_shape(x)}")
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be [E, d_in, d_out], got shape {_shape(t)}")
    if keys.shape[0] != values.shape[0] or keys.shape[2] != values.shape[1]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must be [E, d, d_e] and "
                         f"[E, d_e, d_out] with the same E and d_e")


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
    reference and Triton backends, and the few-slot strategy, run); the torch backend fuses them so the
    hidden rows stay sorted by expert between the projections (``moeut::sigma_moe``).
    """
    _check_sigma_shapes(x, keys, values)
    if backend is None:
        backend = default_backend(x.device)
    strategy = None
    if backend == "torch" and torch.is_tensor(expert_ids) and torch.is_tensor(gates) \
            and gates.shape == expert_ids.shape:
        compute_dtype = _autocast_dtype(x.device.type) or x.dtype
        strategy = current_policy().choose(x.device, compute_dtype, expert_ids.numel(), fused=True)
    if strategy is None or strategy.kernel == st.FEW_SLOTS:
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
    with torch.autocast(x.device.type, enabled=False):  # inputs are cast; keep ops inside in that dtype
        return sigma_moe_planned(x, keys, values, gates, plan, strategy)
