"""Expert matmul (CVMM): the one operation every MoEUT expert layer is built on.

Contract
--------
``expert_matmul(x, expert_ids, weight, gates=None, *, out_groups=None, backend=None, plan=None)``

* ``x``: ``[N, G_in, d_in]`` (or ``[N, d_in]``, read as ``G_in = 1``) — N token rows, each holding
  ``G_in`` input vectors.
* ``expert_ids``: ``[N, S]`` integer expert index per row and *slot*; ``G_in`` divides ``S``.
  Slot ``s`` reads input vector ``x[n, s // (S // G_in)]``.
* ``weight``: ``[E, d_in, d_out]``, one matrix per expert.
* ``gates``: optional ``[N, S]`` per-slot scale (the σ-MoE / SwitchHead gate values). Gradients flow
  to ``x``, ``weight`` and ``gates``; never to ``expert_ids``.
* ``out_groups`` (``G_out``): divides ``S``; slot ``s`` is *summed* into output group
  ``s // (S // G_out)``. Defaults to ``S`` (no reduction) without gates and to ``1`` (sum over all
  slots) with gates.
* ``plan``: optional :class:`ExpertPlan` from ``make_plan(expert_ids, E)``: the sort of the slots by
  expert, made once and passed to every call with the same ids (the up- and down-projection of a σ-MoE
  layer; SwitchHead's value and output projections). Backends that do not sort ignore it.
* dtypes: ``weight`` has ``x``'s dtype; ``gates`` (fp32 from the router) is cast to it. Under
  ``torch.autocast`` for ``x``'s device, ``x``, ``weight`` and ``gates`` are cast to the autocast dtype
  (like ``F.linear``), and the output has that dtype.
* ``N = 0`` returns an empty ``[0, G_out, d_out]``; experts that get no rows get zero gradient. The
  output is a fresh tensor (in-place ops on it, e.g. ``relu_``, are fine).
* Bad shapes or dtypes raise ``ValueError`` / ``TypeError`` naming the argument and the expected shape.
  On CPU, ids outside ``[0, E)`` raise ``ValueError``; on GPU they are not checked (that would sync).

Returns ``[N, G_out, d_out]`` with
``out[n, s // (S/G_out)] += gates[n, s] · (x[n, s // (S/G_in)] @ weight[expert_ids[n, s]])``.

How MoEUT uses it (N tokens, d model width):

* σ-MoE up-projection:   ``x [N,1,d]``,  ids ``[N,K]``,  keys ``[N_E,d,d_e]``, no gates  → ``[N,K,d_e]``
* σ-MoE down-projection: ``x [N,K,d_e]``, ids ``[N,K]``, values, gates, ``G_out=1``        → ``[N,1,d]``
* SwitchHead values:     ``x [N,1,d]``,  ids ``[N,H·K_A]``, v, gates, ``G_out=H``         → ``[N,H,d_h]``
* SwitchHead output:     ``x [N,H,d_h]``, ids ``[N,H·K_A]``, o, gates, ``G_out=1``         → ``[N,1,d]``

Backends are chosen by name (``"reference"``: the slow masked loop, the oracle of the tests;
``"torch"``: sort + grouped GEMM in pure PyTorch, CPU and GPU; ``"triton"``: gather/scatter grouped-GEMM
kernels on CUDA, :mod:`moeut.ops.triton_backend`) or, with
``backend=None``, by :func:`default_backend` of ``x``'s device — the one place that picks.
:func:`available_backends` lists the names.

How the torch backend runs a call (a loop over experts, ``grouped_mm``, the block layout, or the few-slot
``bmm``) is decided in one place, :meth:`GemmPolicy.choose` (:mod:`moeut.ops.policy`), from the device,
dtype and number of slots; the environment's overrides are read once (:mod:`moeut.ops.overrides`), and
``with use_policy(gemm="loop"): ...`` changes the policy for a block of code.
"""

from moeut.ops.expert_matmul import available_backends, default_backend, expert_matmul, sigma_moe_experts
from moeut.ops.plan import ExpertPlan, make_plan
from moeut.ops.policy import GemmPolicy, current_policy, use_policy
from moeut.ops.strategy import Strategy

__all__ = ["expert_matmul", "sigma_moe_experts", "available_backends", "default_backend", "make_plan", "ExpertPlan",
           "GemmPolicy", "current_policy", "use_policy", "Strategy"]
