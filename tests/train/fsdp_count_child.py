"""Run under torchrun (2 gloo ranks): count FSDP2 all-gathers and reduce-scatters of one training step.

Prints one JSON line on rank 0: {"all_gathers": n, "reduce_scatters": m, "loss": [...]}.
``--per-application`` wraps the shared layers the old way (FSDP2 defaults: re-gathered at every application).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from moeut.model import build_model
from moeut.model.config import ModelConfig
from moeut.train.distributed import init_distributed, shutdown, wrap_model
from moeut.train.step import train_step
from tests.train.conftest import TINY_MODEL

COUNTS = {"all_gathers": 0, "reduce_scatters": 0}


def _counting(name: str, key: str) -> None:
    real = getattr(dist, name, None)
    if real is None:
        return

    def wrapped(*args, **kwargs):
        COUNTS[key] += 1
        return real(*args, **kwargs)

    setattr(dist, name, wrapped)


def main() -> None:
    per_application = "--per-application" in sys.argv
    grad_accum = 2 if "--grad-accum" in sys.argv else 1
    applications = int(sys.argv[sys.argv.index("--applications") + 1]) if "--applications" in sys.argv else 2
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("moeut-tiny", **{**TINY_MODEL, "vocab_size": 64,
                                                       "n_layers": applications * TINY_MODEL["group_size"]}))
    if per_application:
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = wrap_model(model, info, fsdp=True)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    for name in ("all_gather_into_tensor", "all_gather_single", "_all_gather_base"):
        _counting(name, "all_gathers")
    for name in ("reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base"):
        _counting(name, "reduce_scatters")
    g = torch.Generator().manual_seed(1)
    losses, per_step = [], []
    for _ in range(3):
        before = dict(COUNTS)
        batch = torch.randint(0, 64, (4, 17), generator=g)[info.rank * 2:(info.rank + 1) * 2]
        res = train_step(wrapped, opt, batch, grad_accum=grad_accum, grad_clip=0.25, distributed=True)
        losses.append(res.ce)
        per_step.append({k: COUNTS[k] - before[k] for k in COUNTS})
    if info.is_main:
        print(json.dumps({"per_step": per_step, "loss": losses, "applications": model.cfg.n_layers // len(model.layers),
                          "distinct_layers": len(model.layers)}), flush=True)
    shutdown(info)


if __name__ == "__main__":
    main()
