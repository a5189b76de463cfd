"""The optimizer of a run: AdamW (the paper's), or Muon for the hidden matrices and AdamW for the rest.

Which parameter goes where, and why (:func:`muon_role`):

* **Muon** — the hidden linear maps, whose update is a matrix acting on activations: attention Q/K (and the
  dense baseline's V/O and MLP) ``nn.Linear`` weights (layout ``"linear"``, ``[out, in]``), and the expert
  tensors ``[E, in, out]`` of SwitchHead V/O, σ-MoE keys/values and SUT's attention and MLP experts (layout
  ``"experts"``: each expert orthogonalised on its own).
* **AdamW** — the embedding and the output head (a lookup table and a classifier over 8000 tokens: Muon's
  authors keep both on AdamW), every LayerNorm and bias, the routers (``sel_v``, ``sel_o``, ``expert_sel``,
  SUT's router MLPs: their rows are independent per-expert score vectors, not a map to orthogonalise), the
  halting gates, SUT's relative-position table and its per-expert biases.

Every parameter of at least two dimensions must be classified: a new kind of matrix raises instead of
silently landing in one optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeut.train.muon import Muon

# name parts that put a ≥2-D parameter on AdamW
_ADAMW_NAMES = ("embedding", "lm_head", "router", "sel_v", "sel_o", "expert_sel", "halting", "rel_pos")
_ADAMW_SUFFIXES = (".b1", ".b2")  # SUT's per-expert MLP biases [E, width]


def muon_role(name: str, p: torch.Tensor, linear_weights: set[str]) -> str:
    """"adamw", or the Muon layout ("linear" / "experts") of parameter ``name``."""
    if p.dim() < 2 or any(part in name for part in _ADAMW_NAMES) or name.endswith(_ADAMW_SUFFIXES):
        return "adamw"
    if name in linear_weights and p.dim() == 2:
        return "linear"
    if p.dim() == 3:
        return "experts"
    raise ValueError(f"parameter {name} {tuple(p.shape)} is neither an nn.Linear weight nor an [E, in, out] expert "
                     f"tensor: classify it in moeut.train.optimizers (Muon or AdamW) before training with Muon")


class MuonAdamW:
    """Muon and AdamW stepped together; ``param_groups`` lists both (each group keeps its own ``base_lr``)."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.optimizers = [muon, adamw]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.optimizers[0].state_dict(), "adamw": self.optimizers[1].state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizers[0].load_state_dict(state["muon"])
        self.optimizers[1].load_state_dict(state["adamw"])


def build_optimizer(model: nn.Module, wrapped: nn.Module, cfg) -> torch.optim.Optimizer | MuonAdamW:
    """The optimizer ``cfg.optimizer`` names, over ``wrapped``'s parameters (names read from ``model``, the
    unwrapped module: DDP/compile prefix them). Each group records its ``base_lr``, the peak of its schedule."""
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(wrapped.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
        opt.param_groups[0]["base_lr"] = cfg.lr
        return opt
    linear_weights = {f"{m_name}.weight" if m_name else "weight" for m_name, m in model.named_modules()
                      if isinstance(m, nn.Linear)}
    groups: dict[str, list[torch.Tensor]] = {"linear": [], "experts": [], "adamw": []}
    for name, p in model.named_parameters():
        groups[muon_role(name, p, linear_weights)].append(p)
    muon = Muon([{"params": groups[k], "layout": k} for k in ("linear", "experts") if groups[k]],
                lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum,
                lr_scale=cfg.muon_lr_scale)
    adamw = torch.optim.AdamW(groups["adamw"], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                              weight_decay=cfg.weight_decay)
    for g in muon.param_groups:
        g["base_lr"] = cfg.muon_lr
    adamw.param_groups[0]["base_lr"] = cfg.lr
    return MuonAdamW(muon, adamw)
