"""Running on several devices: process-group setup under torchrun, DDP / FSDP2 wrapping.

The model knows nothing of this: parallelism is applied from outside (torchtitan style).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {pref!r} requested but CUDA is not available; use --device cpu")
    return dev


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=pick_device(device_pref))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def wrap_model(model: nn.Module, info: DistInfo, fsdp: bool = False) -> nn.Module:
    """DDP, or FSDP2 with each distinct (shared) layer sharded exactly once, then the root.

    A shared layer is one module applied ``n_layers / G`` times per forward. FSDP2's defaults
    (``reshard_after_forward=True``, reshard after each backward) would all-gather it again at every
    application, forward and backward: ``2 · n_layers / G`` gathers per layer and step. Instead each layer
    keeps its unsharded parameters from its first application in the forward until its last use in the
    backward (the backward of its first application) — one all-gather per layer and step, and one
    reduce-scatter. Memory: the G distinct layers' full parameters are resident during the step (as the
    interleaved applications L0 L1 … L0 L1 … need them anyway); their optimizer state stays sharded.
    """
    if not info.distributed:
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:  # torch < 2.6
            raise RuntimeError("--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from e
        for layer in model.layers:  # a shared layer is one module, applied n_layers/G times
            fully_shard(layer, reshard_after_forward=False)
        fully_shard(model)
        _reshard_shared_layers_after_last_use(model)
        ignore_fsdp_view_output_warning({type(m).__name__ for m in (*model.layers, model)})
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


# torch's text (torch/distributed/fsdp/_fully_shard/_fsdp_state.py, ``_register_pre_backward_hook``) up to the
# wrapped class's name, which FSDP2 prefixes with "FSDP" (FSDPMoEUTLayer, FSDPMoEUTLM, ...).
_VIEW_OUTPUT_WARNING = "FSDP2-wrapped module ({}) returned a view tensor"


def ignore_fsdp_view_output_warning(fsdp_class_names: set[str]) -> None:
    """Silence FSDP2's "returned a view tensor" warning for these wrapped classes only (a false alarm for them).

    FSDP2 registers its pre-backward hook (the all-gather before a module's backward) on every output that
    requires grad, and warns when one is a view, because an in-place op on a view rebases its autograd
    history and drops that tensor's hook. The moeut modules return views beside their main output: a layer
    its values ``v`` (a transpose, part of the KV pair) and the attention routers' logits (an unflatten); the
    LM its logits (``F.linear`` on ``[B, T, d]`` returns a view). Their main outputs — the layer's residual
    stream, the LM's cross-entropy and regulariser — are not views, and every view output is computed on the
    way to them (``v`` feeds the attention, the router logits the gates, the logits the cross-entropy). So
    the hook on a main output fires before any backward node of the module runs, whatever happens to the
    views; nothing in moeut modifies those views in place either. tests/train/test_fsdp_gathers.py checks that
    premise on every model kind, and the two-rank runs of tests/train/test_train.py check the warning is gone
    and compare the losses, gradient norms and weights with one process.

    The filter matches torch's message for exactly these class names and nothing else: the same warning
    for any other FSDP2-wrapped module (a user's own) still shows.
    """
    for name in sorted(fsdp_class_names):
        warnings.filterwarnings("ignore", message=re.escape(_VIEW_OUTPUT_WARNING.format(name)),
                                category=UserWarning, module=r"torch\.distributed\.fsdp\.")


class _ReshardAfterThisBackward(torch.autograd.Function):
    """Identity on a layer's input; its backward runs right after that application's FSDP post-backward, so
    the next post-backward (the layer's earlier application) reshards again."""

    @staticmethod
    def forward(ctx, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        ctx.layer = layer
        return x.view_as(x)  # a view of the layer's *input*: FSDP2 checks only outputs for views (see above)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        ctx.layer.set_reshard_after_backward(True)
        return None, grad


def _reshard_shared_layers_after_last_use(model: nn.Module) -> None:
    """Forward hooks that keep each FSDP2 shared layer unsharded across its applications in the backward.

    At a layer's second application of a forward, resharding after backward is switched off, and the
    application's input passes through :class:`_ReshardAfterThisBackward`, which switches it back on once
    the backward reaches that application: only the post-backward of the first application (the layer's
    last use) reshards. Hooks do nothing without grad (evaluation) or inside the backward (recomputation).
    """
    uses: dict[int, int] = {}

    def start(_module: nn.Module, _args: Any) -> None:
        uses.clear()

    def application(layer: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return None
        n = uses[id(layer)] = uses.get(id(layer), 0) + 1
        if n != 2 or not (args and isinstance(args[0], torch.Tensor) and args[0].requires_grad):
            return None
        layer.set_reshard_after_backward(False)
        return (_ReshardAfterThisBackward.apply(layer, args[0]), *args[1:])

    model.register_forward_pre_hook(start, prepend=True)
    for layer in model.layers:
        layer.register_forward_pre_hook(application, prepend=True)  # before FSDP's: its node runs after FSDP's


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
