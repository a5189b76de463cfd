"""Wall clock and memory of training (paper, App. A.7): time per training iteration after warm-up and
peak memory, for a list of presets at the same effective batch, with AdamW (the paper's) or Muon
(``optimizer="muon"``: Muon for the hidden matrices, AdamW for the rest, as ``moeut train --optimizer muon``)
and in fp32 or bf16 autocast (``precision``, as ``moeut train --precision``).

Each preset is measured in a fresh Python process (so one preset's allocations cannot hide another's
peak) on random tokens: ``warmup`` full optimizer steps (forward, CE + regulariser, backward, AdamW),
then ``iters`` timed steps (device synchronised around each). Every preset sees the same effective batch
``batch_size × seq_len``; a step runs ``grad_accum`` micro-batches. On CUDA an out-of-memory error doubles
the accumulation and retries, as one would to fit a model on a GPU.

Memory, per device:

* CUDA: ``torch.cuda.max_memory_allocated`` over the whole measurement (weights, gradients, AdamW state,
  activations; not the caching allocator's reserve).
* CPU: peak resident set size of the process (``getrusage`` ``ru_maxrss``) minus the resident size just
  before the model was built (after one throwaway step of a narrow copy of the model has paged in the
  kernels and libraries): weights, gradients, optimizer state, activations and whatever the allocator
  keeps, as the operating system sees it. glibc is tuned as ``moeut train`` runs (:func:`moeut.runtime.tune_malloc`).

A preset is a name (see ``moeut info``), optionally with ModelConfig overrides:
``"sut-tiny"``, ``"moeut-tiny:ff_k=2,d_model=160"``.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moeut.errors import MoeutError
from moeut.fileio import atomic_write_json
from moeut.model import ModelConfig, build_model
from moeut.model.config import parse_preset
from moeut.report import format_table, pyplot, save_figure
from moeut.runtime import current_rss_bytes, peak_rss_bytes, progress, tune_malloc
from moeut.train.config import TrainConfig
from moeut.train.optimizers import build_optimizer
from moeut.train.step import autocast_for, train_step

_MARK = "WALLCLOCK_RESULT "


class WallclockError(MoeutError, ValueError):
    """A wall-clock measurement cannot run; the message names the preset and the fix."""


@dataclass
class WallclockRow:
    preset: str
    params: int
    batch_size: int
    seq_len: int
    grad_accum: int
    ms_per_iter: float
    ms_std: float
    tokens_per_s: float
    peak_memory_bytes: int
    memory_kind: str  # what peak_memory_bytes measures
    device: str
    iters: int
    warmup: int
    precision: str = "auto"
    optimizer: str = "adamw"


def measure_here(preset: str, model: dict[str, Any], batch_size: int, seq_len: int, grad_accum: int, device: str,
                 warmup: int, iters: int, backend: str | None = None, precision: str = "auto",
                 optimizer: str = "adamw", seed: int = 0) -> dict[str, Any]:
    """Measure in this process (the worker side; use :func:`measure` for a clean process per preset).
    A step is :func:`moeut.train.train_step` (CE + regulariser, backward, clipping at 0.25, the optimizer)."""
    dev = torch.device(device)
    cfg = ModelConfig.from_name(preset, **model)
    if batch_size % grad_accum:
        raise WallclockError(f"grad_accum={grad_accum} must divide batch_size={batch_size}")
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def step(net, opt, tokens, grad_accum) -> None:
        train_step(net, opt, tokens, grad_accum=grad_accum, grad_clip=0.25, autocast=autocast_for(precision, dev))

    if not cuda:  # page in the kernels and libraries with a narrow copy first, so the RSS delta is the run's
        try:
            small = build_model(cfg.replace(d_model=16, vocab_size=64), backend=backend)
            step(small, torch.optim.AdamW(small.parameters()), torch.randint(64, (2, 9)), 1)
            del small
        except Exception:  # noqa: BLE001 - an architecture that cannot be narrowed: no pre-warming
            pass
        gc.collect()
    rss0 = current_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(seed)
    net = build_model(cfg, backend=backend).to(dev)
    n_params = sum(p.numel() for p in net.parameters())
    opt = _optimizer(net, preset, model, optimizer)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(cfg.vocab_size, (batch_size, seq_len + 1), generator=g).to(dev)

    for _ in range(warmup):
        step(net, opt, tokens, grad_accum)
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step(net, opt, tokens, grad_accum)
        sync()
        times.append(time.perf_counter() - t)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda max_memory_allocated"
    else:
        peak, kind = max(0, peak_rss_bytes() - rss0), "cpu peak RSS - RSS before model build"
    mean = statistics.fmean(times)
    return asdict(WallclockRow(preset=preset + (":" + ",".join(f"{k}={v}" for k, v in model.items()) if model else ""),
                               params=n_params, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                               ms_per_iter=mean * 1e3, ms_std=(statistics.stdev(times) * 1e3 if len(times) > 1 else 0.0),
                               tokens_per_s=batch_size * seq_len / mean, peak_memory_bytes=int(peak), memory_kind=kind,
                               device=str(dev), iters=iters, warmup=warmup, precision=precision,
                               optimizer=optimizer))


def _optimizer(net: torch.nn.Module, preset: str, model: dict[str, Any], name: str) -> Any:
    """The optimizer ``moeut train --optimizer name`` builds, at the trainer's default settings (an unknown name is
    TrainConfig's ConfigError)."""
    return build_optimizer(net, net, TrainConfig(preset=preset, model_overrides=model, optimizer=name, lr=1e-4))


def measure(spec: str, *, batch_size: int, seq_len: int, device: str = "cpu", grad_accum: int = 1, warmup: int = 2,
            iters: int = 5, backend: str | None = None, precision: str = "auto", optimizer: str = "adamw",
            timeout: float | None = None) -> WallclockRow:
    """One preset in a fresh process; on CUDA out-of-memory, double ``grad_accum`` and retry."""
    preset, model = parse_preset(spec)
    ModelConfig.from_name(preset, **model)  # a clear error for an unknown preset before any process starts
    while True:
        job = dict(preset=preset, model=model, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                   device=device, warmup=warmup, iters=iters, backend=backend, precision=precision, optimizer=optimizer)
        proc = subprocess.run([sys.executable, "-m", "moeut.train.wallclock", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
        if proc.returncode != 0 or not lines:
            raise WallclockError(f"measuring {spec} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        res = json.loads(lines[-1][len(_MARK):])
        if res.get("oom"):
            if grad_accum >= batch_size:
                raise WallclockError(f"{spec}: out of memory even with micro-batches of one sequence")
            grad_accum *= 2
            while batch_size % grad_accum:
                grad_accum += 1
            continue
        return WallclockRow(**res)


def wallclock(presets: Sequence[str], *, batch_size: int = 16, seq_len: int = 256, device: str = "cpu",
              grad_accum: int = 1, warmup: int = 2, iters: int = 5, backend: str | None = None,
              precision: str = "auto", optimizer: str = "adamw", show_progress: bool = False) -> list[WallclockRow]:
    rows = []
    for spec in progress(presets, total=len(presets), desc="wallclock", enabled=show_progress):
        rows.append(measure(spec, batch_size=batch_size, seq_len=seq_len, device=device, grad_accum=grad_accum,
                            warmup=warmup, iters=iters, backend=backend, precision=precision, optimizer=optimizer))
    return rows


def _short(label: str, n: int = 40) -> str:
    return label if len(label) <= n else label[:n - 1] + "…"


def table(rows: Sequence[WallclockRow]) -> str:
    base = rows[0].ms_per_iter if rows else 1.0
    body = [[_short(r.preset), f"{r.params / 1e6:.2f}M", f"{r.batch_size}×{r.seq_len}", r.grad_accum,
             f"{r.ms_per_iter:.1f} ± {r.ms_std:.1f}", f"{r.ms_per_iter / base:.2f}×", f"{r.tokens_per_s:,.0f}",
             f"{r.peak_memory_bytes / 2**20:,.0f} MiB"] for r in rows]
    note = (f"\nmemory: {rows[0].memory_kind}; {rows[0].warmup} warm-up + {rows[0].iters} timed steps on "
            f"{rows[0].device}, {rows[0].optimizer}, precision {rows[0].precision}") if rows else ""
    return format_table(["model", "params", "batch", "accum", "ms/iter", "rel. time", "tokens/s", "peak memory"],
                        body) + note


def plot(rows: Sequence[WallclockRow], path: str | Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [_short(r.preset, 24) for r in rows]
    axes[0].bar(names, [r.ms_per_iter for r in rows], yerr=[r.ms_std for r in rows], color="tab:orange")
    axes[0].set_ylabel("ms per training iteration")
    axes[1].bar(names, [r.peak_memory_bytes / 2**20 for r in rows], color="tab:green")
    axes[1].set_ylabel("peak memory, MiB")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    if rows:
        fig.suptitle(f"batch {rows[0].batch_size}×{rows[0].seq_len} on {rows[0].device} "
                     f"({rows[0].memory_kind})", fontsize=9)
    return save_figure(fig, path)


def run(presets: Sequence[str], out: str | Path, **kw: Any) -> dict[str, Any]:
    rows = wallclock(presets, **kw)
    out = Path(out)
    j = atomic_write_json(out / "wallclock.json", {"analysis": "wallclock", "rows": [asdict(r) for r in rows]})
    png = plot(rows, out / "wallclock.png")
    return {"rows": rows, "table": table(rows), "files": [j, png]}


def _worker(arg: str) -> int:
    tune_malloc()  # as `moeut train`/`moeut demo` run

    job = json.loads(arg)
    try:
        res = measure_here(**job)
    except torch.cuda.OutOfMemoryError:
        res = {"oom": True}
    print(_MARK + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
