"""One optimizer step of the paper's recipe — the only place it is written (the trainer, the wall-clock
measurement and the step benchmark all call :func:`train_step`).

    loss = CE(logits, next tokens) + regulariser          averaged over ``grad_accum`` micro-batches
                                                         (the CE from the model's head: ``targets=``)
    ‖g‖ = global gradient norm (before clipping); clip to κ when κ > 0; AdamW step
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class StepResult:
    ce: float  # mean next-token cross-entropy over the step's tokens (global mean under DDP/FSDP)
    reg: float  # mean regulariser
    grad_norm: float  # total gradient norm before clipping
    expert_counts: dict[str, torch.Tensor] | None  # routing counts summed over micro-batches (and ranks)
    # ACT models: every token's expected depth (LMOutput.depth) over the step's micro-batches (and ranks), [N]
    depth: torch.Tensor | None = None
    # MoEUT-ACT: every token's executed number of group applications (LMOutput.executed_depth), [N]
    executed_depth: torch.Tensor | None = None


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager | None:
    """bf16 autocast for ``precision="bf16"``, or ``"auto"`` on CUDA; None = fp32."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return None
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, *,
               grad_accum: int = 1, grad_clip: float = 0.0,
               autocast: contextlib.AbstractContextManager | None = None,
               device: torch.device | None = None, distributed: bool = False,
               repeats: int | None = None) -> StepResult:
    """One optimizer step over ``batch`` ``[B, T+1]`` (this rank's rows), in ``grad_accum`` micro-batches;
    ``repeats``: apply the group of shared layers that many times (None = the trained depth)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    if device is not None:
        batch = batch.to(device, non_blocking=True)
    micro = batch.chunk(grad_accum)
    zero = torch.zeros((), device=batch.device)
    ce_sum, reg_sum, counts, depths, executed = zero.clone(), zero.clone(), None, [], []
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1
        no_sync = distributed and not sync and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast or contextlib.nullcontext():
                # the model's head computes the CE (maybe in chunks)
                out = model(mb[:, :-1], targets=mb[:, 1:], **({} if repeats is None else {"repeats": repeats}))
            ce = out.ce
            loss = (ce + out.reg_loss) / len(micro)
            loss.backward()
        ce_sum += ce.detach() / len(micro)
        reg_sum += out.reg_loss.detach() / len(micro)
        if out.expert_counts is not None:
            counts = out.expert_counts if counts is None else {k: counts[k] + v for k, v in out.expert_counts.items()}
        if out.depth is not None:
            depths.append(out.depth.detach().flatten().float())
        if out.executed_depth is not None:
            executed.append(out.executed_depth.detach().flatten().float())
    # max_norm=inf only measures: the scale factor is clamped to exactly 1
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    if distributed:  # report the global mean (every rank has the same number of rows)
        both = torch.stack([ce_sum, reg_sum])
        dist.all_reduce(both)
        ce_sum, reg_sum = both / dist.get_world_size()
        if counts is not None:
            for v in counts.values():
                dist.all_reduce(v)
    depth = _all_tokens(depths, distributed)
    return StepResult(ce=ce_sum.item(), reg=reg_sum.item(), grad_norm=float(grad_norm), expert_counts=counts,
                      depth=depth, executed_depth=_all_tokens(executed, distributed))


def _all_tokens(per_micro_batch: list[torch.Tensor], distributed: bool) -> torch.Tensor | None:
    """A per-token quantity of the step's micro-batches, of every rank under DDP/FSDP (each holds as many)."""
    if not per_micro_batch:
        return None
    local = torch.cat(per_micro_batch)
    if not distributed:
        return local
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return torch.cat(gathered)
