"""Training metrics: a JSONL file, TensorBoard event files (when installed), Weights & Biases (optional sink),
routing statistics, residual norms."""

from __future__ import annotations

import json
import math
import secrets
import string
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from moeut.model.accounting import executed_macs_per_token
from moeut.model.config import ModelConfig
from moeut.model.residual_norm import residual_norm_stats
from moeut.errors import MissingDependency
from moeut.fileio import atomic_write_text
from moeut.run.layout import METRICS, TENSORBOARD, WANDB, WANDB_RUN_ID


def routing_stats(counts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer application and expert kind: normalised entropy of expert usage (1 = uniform), fraction
    of experts that received no tokens, and the share of the most used expert."""
    stats: dict[str, float] = {}
    for kind, c in counts.items():
        c = c.double()
        n_experts = c.shape[-1]
        p = c / c.sum(-1, keepdim=True).clamp_min(1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(n_experts)
        dead = (c == 0).double().mean(-1)
        top = p.max(-1).values
        for layer in range(c.shape[0]):
            stats[f"routing/{kind}/L{layer}/entropy"] = entropy[layer].item()
            stats[f"routing/{kind}/L{layer}/dead_frac"] = dead[layer].item()
            stats[f"routing/{kind}/L{layer}/top_share"] = top[layer].item()
        stats[f"routing/{kind}/entropy_mean"] = entropy.mean().item()
        stats[f"routing/{kind}/dead_frac_mean"] = dead.mean().item()
    return stats


def balance_stats(per_layer: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss-free balancing: the load of the most and of the least used expert of each router of each distinct layer
    (``[G, experts]`` counts per kind, summed over the layer's applications and the step's tokens on every rank),
    relative to the mean load (1 = balanced; 0 = an expert chose no token): ``balance/{kind}/L{g}/max_load`` and
    ``min_load``, and the extremes over all layers ``balance/{kind}/max_load`` / ``min_load``."""
    stats: dict[str, float] = {}
    for kind, c in per_layer.items():
        c = c.double()
        rel = c / c.mean(-1, keepdim=True).clamp_min(1e-30)
        hi, lo = rel.max(-1).values.tolist(), rel.min(-1).values.tolist()
        for g in range(len(hi)):
            stats[f"balance/{kind}/L{g}/max_load"] = hi[g]
            stats[f"balance/{kind}/L{g}/min_load"] = lo[g]
        stats[f"balance/{kind}/max_load"] = max(hi)
        stats[f"balance/{kind}/min_load"] = min(lo)
    return stats


DEPTH_QUANTILES = (0.1, 0.5, 0.9)


def depth_metrics(depth: torch.Tensor, max_depth: int) -> dict[str, float]:
    """ACT: the per-token expected depth ``[N]`` (1 … ``max_depth`` applications) as ``act/mean_depth``, its
    quantiles ``act/depth_p10`` / ``p50`` / ``p90`` and a histogram ``act/depth_frac/{k}``: the fraction of
    tokens whose expected depth rounds to k, for k = 1 … max_depth."""
    d = depth.double().flatten()
    out = {"act/mean_depth": d.mean().item()}
    for q, v in zip(DEPTH_QUANTILES, torch.quantile(d, torch.tensor(DEPTH_QUANTILES, dtype=d.dtype)).tolist()):
        out[f"act/depth_p{round(q * 100)}"] = v
    bins = torch.bincount(d.round().long().clamp(1, max_depth) - 1, minlength=max_depth).double() / d.numel()
    for k in range(max_depth):
        out[f"act/depth_frac/{k + 1}"] = bins[k].item()
    return out


def executed_depth_metrics(executed: torch.Tensor, max_depth: int, cfg: ModelConfig, context: int
                           ) -> dict[str, float]:
    """MoEUT-ACT: what the forward passes actually ran — each token's executed number of group applications
    ``[N]`` as ``act/executed_mean_depth`` and a histogram ``act/executed_frac/{k}`` (k = 1 … max_depth), and the
    executed forward MACs per token, ``act/executed_macs_per_token`` (with the output head) and
    ``act/executed_layer_macs_per_token`` (:func:`moeut.model.accounting.executed_macs_per_token`)."""
    e = executed.double().flatten()
    out = {"act/executed_mean_depth": e.mean().item()}
    bins = torch.bincount(e.long().clamp(1, max_depth) - 1, minlength=max_depth).double() / e.numel()
    for k in range(max_depth):
        out[f"act/executed_frac/{k + 1}"] = bins[k].item()
    macs = executed_macs_per_token(cfg, e, context)
    out["act/executed_macs_per_token"] = macs["macs_per_token"]
    out["act/executed_layer_macs_per_token"] = macs["layer_macs_per_token"]
    return out


def residual_norm_metrics(hidden_states: Sequence[torch.Tensor]) -> dict[str, float]:
    """Flat metrics for the training log: ``resnorm/L{i}/residual`` and ``resnorm/L{i}/update`` (means over
    tokens of the residual entering application i and of its update), and ``resnorm/final``."""
    res, upd = residual_norm_stats(hidden_states)
    n_tok = hidden_states[0].shape[:-1].numel()
    out: dict[str, float] = {}
    for i in range(len(upd)):
        out[f"resnorm/L{i}/residual"] = res[i].item() / n_tok
        out[f"resnorm/L{i}/update"] = upd[i].item() / n_tok
    out["resnorm/final"] = res[-1].item() / n_tok
    return out


class MetricsSink(Protocol):
    """Somewhere else the metrics lines go (besides ``metrics.jsonl`` and TensorBoard)."""

    def log(self, step: int, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _new_wandb_id() -> str:
    """A fresh W&B run id (8 lowercase letters and digits, as W&B makes them)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbSink:
    """Weights & Biases: the same values as ``metrics.jsonl`` at the same steps, and the resolved configuration.

    W&B's files go to ``RUN/wandb/``; the run id is kept in ``RUN/wandb/moeut_run_id.txt``, so ``--resume``
    continues the same W&B run (``resume="allow"``). ``WANDB_MODE=offline`` works as usual (``wandb sync``
    uploads later). Steps logged again after a resume are dropped by W&B (they repeat earlier values).
    """

    def __init__(self, run_dir: Path, *, project: str, config: dict[str, Any], name: str = "", entity: str = ""):
        try:  # optional dependency: imported only when --wandb-project is given
            import wandb
        except ImportError:
            raise MissingDependency("--wandb-project needs the wandb package: pip install 'moeut[wandb]' "
                                    "(or pip install wandb)") from None
        folder = Path(run_dir) / WANDB
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if id_file.exists() else _new_wandb_id()
        atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=project, name=name or None, entity=entity or None, id=run_id, resume="allow",
                              dir=str(run_dir), config=config)

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        self.run.finish()


def _step_of(line: str) -> int:
    """The step of a metrics line; a line cut short by a killed process counts as after every step."""
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62


def _wait_to_sort_after(tb_dir: Path) -> None:
    """Readers apply a resumed writer's purge marker only to event files read before its own, and read them
    in name order: ``events.out.tfevents.<unix second>.<host>.<pid>.<n>``. A run resumed within the second
    its predecessor started (a fast crash) could get a name that sorts first — wait out that second."""
    newest = max((int(p.name.split(".")[3]) for p in tb_dir.glob("events.out.tfevents.*")
                  if p.name.split(".")[3].isdigit()), default=None)
    while newest is not None and int(time.time()) <= newest:
        time.sleep(0.05)


class MetricsLogger:
    """Appends one JSON line per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard and to the
    extra ``sinks`` (e.g. :class:`WandbSink`).

    ``resume_step``: the run continues after this step (0: from the start) in a directory an earlier process
    logged to; what that process logged after it is dropped — lines of ``metrics.jsonl`` are removed and
    TensorBoard hides the events from ``resume_step + 1`` on (``purge_step``) — so each step appears once.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, sinks: Sequence[MetricsSink] = (),
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS
        self.sinks = list(sinks) if enabled else []
        self._tb = None
        if enabled and resume_step is not None:
            self.truncate_after(resume_step)
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                if purge is not None:
                    _wait_to_sort_after(Path(run_dir) / TENSORBOARD)
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD), purge_step=purge)
            except ImportError:
                print("note: TensorBoard logging is off (pip install tensorboard, or the [dev] extra)")

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        for sink in self.sinks:
            sink.log(step, values)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint's step (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if _step_of(ln) <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))

    def flush(self) -> None:
        """Write what TensorBoard buffers (``metrics.jsonl`` is written line by line)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for sink in self.sinks:
            sink.close()
