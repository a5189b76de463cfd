"""Muon for the hidden matrices of a MoE model: every expert's matrix orthogonalised on its own.

Muon (Jordan et al. 2024) replaces a matrix's momentum update by its nearest semi-orthogonal matrix, computed
with a few Newton–Schulz iterations. ``torch.optim.Muon`` takes 2-D matrices only; MoEUT keeps its experts as
``[n_experts, d_in, d_out]`` tensors, where each ``[d_in, d_out]`` slice is one expert's own linear map with its
own rows of the batch — so it is orthogonalised on its own (a batched Newton–Schulz over the expert axis), never
as one flattened matrix. The iteration is torch's (bf16, the quintic coefficients of Keller Jordan's Muon).

The learning-rate scaling by shape is explicit (:func:`lr_scale`): ``"match_rms_adamw"`` (Moonshot's "Muon is
Scalable", the default: 0.2·√max(fan_in, fan_out), so that AdamW's learning rate and weight decay carry over)
or ``"original"`` (Keller Jordan's √max(1, fan_out / fan_in)).

Under FSDP2 a parameter is a DTensor sharded along its first dimension: an expert tensor then holds whole
experts on each rank and is orthogonalised locally; a 2-D matrix is gathered, orthogonalised (on every rank
alike) and its shard taken back. Under DDP every rank holds the full, all-reduced gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's defaults
LR_SCALES = ("match_rms_adamw", "original")
LAYOUTS = ("linear", "experts")  # linear: [fan_out, fan_in] (nn.Linear); experts: [E, fan_in, fan_out]


def orthogonalize(g: Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> Tensor:
    """The Newton–Schulz approximation of the orthogonal factor of each matrix ``g[..., m, n]`` (in bf16, as
    torch.optim.Muon); for a single 2-D matrix it is exactly torch's ``_zeropower_via_newtonschulz``."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) if gram.dim() == 3 else \
            torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a) if x.dim() == 3 else torch.addmm(x, update, x, beta=a)
    return x.mT if tall else x


def fans(shape: torch.Size, layout: str) -> tuple[int, int]:
    """(fan_in, fan_out) of one matrix of a parameter with this layout."""
    if layout == "linear":
        return shape[-1], shape[-2]
    return shape[-2], shape[-1]


def lr_scale(shape: torch.Size, layout: str, rule: str) -> float:
    """The factor on the learning rate of one matrix, by its shape."""
    fan_in, fan_out = fans(shape, layout)
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_in, fan_out))
    if rule == "original":
        return math.sqrt(max(1.0, fan_out / fan_in))
    raise ValueError(f"unknown Muon lr scale {rule!r}; choose one of {LR_SCALES}")


class Muon(torch.optim.Optimizer):
    """Muon with decoupled weight decay and Nesterov momentum, for 2-D matrices and stacks of expert matrices.

    Each param group names its ``layout`` (:data:`LAYOUTS`): ``"linear"`` for ``nn.Linear`` weights, ``"experts"``
    for ``[E, d_in, d_out]`` tensors. The step per parameter is torch.optim.Muon's: ``buf ← μ·buf + (1-μ)·g``
    (lerp), ``u = lerp(g, buf, μ)`` (Nesterov), ``θ ← θ·(1 - lr·wd) - lr·scale·NS(u)``.
    """

    def __init__(self, params: Iterable[dict[str, Any]], lr: float, weight_decay: float = 0.01,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7,
                 lr_scale: str = "match_rms_adamw"):
        if lr_scale not in LR_SCALES:
            raise ValueError(f"unknown Muon lr scale {lr_scale!r}; choose one of {LR_SCALES}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        eps=eps, lr_scale=lr_scale, layout="linear")
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["layout"] not in LAYOUTS:
                raise ValueError(f"Muon param group layout {group['layout']!r}: expected one of {LAYOUTS}")
            for p in group["params"]:
                if p.dim() != (2 if group["layout"] == "linear" else 3):
                    raise ValueError(f"Muon: a {group['layout']} parameter must be "
                                     f"{'2' if group['layout'] == 'linear' else '3'}-D, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                ortho = _orthogonalize_param(update, group)
                scale = lr_scale(p.shape, group["layout"], group["lr_scale"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(ortho.to(p.dtype), alpha=-group["lr"] * scale)
        return loss


def _orthogonalize_param(update: Tensor, group: dict[str, Any]) -> Tensor:
    """NS of a parameter's update; a DTensor shard of whole experts locally, a sharded matrix gathered."""
    kw = dict(steps=group["ns_steps"], eps=group["eps"])
    if not _is_dtensor(update):
        return orthogonalize(update, **kw)
    from torch.distributed.tensor import DTensor, distribute_tensor

    if group["layout"] == "experts" and _sharded_only_on_dim0(update):  # each rank holds whole expert matrices
        local = orthogonalize(update.to_local(), **kw)
        return DTensor.from_local(local, update.device_mesh, update.placements, run_check=False,
                                  shape=update.shape, stride=update.stride())
    full = orthogonalize(update.full_tensor(), **kw)  # every rank computes the same matrix
    return distribute_tensor(full, update.device_mesh, update.placements)


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor: no FSDP2 either
        return False
    return isinstance(t, DTensor)


def _sharded_only_on_dim0(t: Tensor) -> bool:
    from torch.distributed.tensor import Replicate, Shard

    return all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0) for pl in t.placements)
