"""The training loop of the paper's recipe: AdamW, warmup + cosine (or WSD), clipping, CE + regulariser.

Resumable bit for bit on CPU: the data order is a pure function of (seed, step), and a checkpoint holds
the model, the optimizer, the step and the RNG states (:mod:`moeut.train.resume`).

:class:`Trainer` has one job per method: :meth:`~Trainer.setup` (data, run directory, model, wrapping,
optimizer, resume, logging), :meth:`~Trainer.fit` (the step loop), and per step :meth:`~Trainer.step`,
:meth:`~Trainer.log`, :meth:`~Trainer.evaluate`, :meth:`~Trainer.save` and :meth:`~Trainer.write_summary`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moeut.data import validation_batches
from moeut.data.mixture import TrainingData
from moeut.fileio import atomic_write_json
from moeut.model import build_model
from moeut.model.accounting import model_stats
from moeut.model.perplexity import window_nll
from moeut.run.checkpoint import checkpoint_path, list_checkpoints, save_checkpoint
from moeut.run.layout import CHECKPOINTS, SUMMARY
from moeut.runtime import progress, tune_malloc
from moeut.train.activation_checkpointing import apply_activation_checkpointing
from moeut.train.config import TrainConfig
from moeut.train.console import console_line, header_lines
from moeut.train.distributed import DistInfo, barrier, init_distributed, shutdown, wrap_model
from moeut.train.errors import TrainingError, TrainingStopped
from moeut.train.init_from import InitFromError, load_init_weights
from moeut.train.metrics import (MetricsLogger, WandbSink, balance_stats, depth_metrics, executed_depth_metrics,
                                 residual_norm_metrics, routing_stats)
from moeut.train.optimizers import build_optimizer
from moeut.train.preemption import StopSignals, agree
from moeut.train.resume import Progress, Resumed, checkpoint_state, prepare_run_dir, restore
from moeut.train.step import StepResult, autocast_for, train_step
from moeut.train.systems import PeakMemory, device_peak_tflops, train_flops_per_token

__all__ = ["Trainer", "TrainingError", "evaluate_ppl", "train"]


def train(cfg: TrainConfig, *, resume: bool = False, show_progress: bool = True,
          allow_schedule_change: bool = False, allow_tokenizer_mismatch: bool = False) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns the final summary (also in summary.json).

    ``allow_schedule_change``: on resume, accept a learning-rate schedule (steps, schedule settings) under
    which the steps already taken would have had other learning rates. ``allow_tokenizer_mismatch``: with
    ``cfg.init_from``, accept data tokenized differently from the source run (a warning instead of an error).
    """
    info = init_distributed(cfg.device)
    if info.device.type == "cpu":
        tune_malloc()  # glibc would mmap and unmap every large tensor (runtime.tune_malloc)
    trainer = Trainer(cfg, info)
    try:
        trainer.setup(resume=resume, allow_schedule_change=allow_schedule_change,
                      allow_tokenizer_mismatch=allow_tokenizer_mismatch)
        return trainer.fit(show_progress=show_progress)
    finally:
        trainer.release()
        shutdown(info)


def _monotonic() -> float:
    """The clock of time-based checkpoints (a function of its own, so that tests can move time)."""
    return time.monotonic()


@dataclass
class _Throughput:
    """Clocks of this process: tokens/s since it started, TFLOP/s over the optimizer steps since the last log."""

    t0: float
    window_time: float = 0.0
    window_steps: int = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


class Trainer:
    """One training run in one process (one rank under torchrun)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.out)
        self.memory = PeakMemory(info.device)
        self.memory.start()
        self.wrapped: nn.Module | None = None
        self.progress = Progress()
        self.last: dict[str, Any] = {}  # the newest step's metrics

    # ------------------------------------------------------------------ setup

    def setup(self, *, resume: bool, allow_schedule_change: bool, allow_tokenizer_mismatch: bool) -> None:
        """Open the data, check the run directory, build and wrap the model, restore a checkpoint, start logging."""
        cfg, info = self.cfg, self.info
        self.data = TrainingData.open(cfg.data)  # one directory, or a weighted mixture (validation: the first's val)
        self.model_cfg = cfg.model_config()
        if self.model_cfg.vocab_size != self.data.vocab_size:
            self.model_cfg = self.model_cfg.replace(vocab_size=self.data.vocab_size)
        init_weights, origin = None, ""
        if cfg.init_from and not (resume and list_checkpoints(self.run_dir)):  # before the run directory is made
            try:
                init_weights, origin = load_init_weights(self.model_cfg, cfg.init_from, self.data.tokenizer_sha256,
                                                         allow_tokenizer_mismatch=allow_tokenizer_mismatch)
            except InitFromError as e:
                raise TrainingError(str(e)) from e
        resumed = prepare_run_dir(self.run_dir, cfg, self.model_cfg, self.data, resume, info, allow_schedule_change)
        self._build(resumed, init_weights, origin)
        if cfg.batch_size % (info.world_size * cfg.grad_accum):
            raise TrainingError(f"batch_size={cfg.batch_size} must be divisible by world_size×grad_accum="
                                f"{info.world_size}×{cfg.grad_accum}")
        self.sampler = self.data.sampler(batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                                         rank=info.rank, world_size=info.world_size)
        self._start_logging(resume)

    def _build(self, resumed: Resumed | None, init_weights: dict[str, Any] | None, origin: str) -> None:
        """The model (from the checkpoint or the init weights), its wrappers, the optimizer and its state."""
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed)
        self.model = build_model(self.model_cfg, backend=cfg.backend)
        if resumed is not None:
            self.progress = resumed.progress
            self.model.load_state_dict(resumed.model)
        elif init_weights is not None:  # weights only: the optimizer, schedule, step and data start afresh
            self.model.load_state_dict(init_weights)
            if info.is_main:
                print(f"init       {origin}; fresh optimizer and schedule")
        self.model.to(info.device)
        apply_activation_checkpointing(self.model, cfg.activation_checkpointing)  # before FSDP/compile wrap it
        wrapped = wrap_model(self.model, info, cfg.fsdp)  # FSDP2 replaces parameters: build the optimizer after
        if cfg.compile:  # checkpoints keep reading ``model``: parameter names stay unprefixed
            wrapped = torch.compile(wrapped)
        self.wrapped = wrapped
        self.optimizer = build_optimizer(self.model, wrapped, cfg)
        if resumed is not None:
            restore(self.model, self.optimizer, resumed, info, sharded=cfg.fsdp and info.distributed)
        self.autocast = autocast_for(cfg.precision, info.device)

    def _start_logging(self, resume: bool) -> None:
        cfg, info = self.cfg, self.info
        sinks = []
        if cfg.wandb_project and info.is_main:
            sinks.append(WandbSink(self.run_dir, project=cfg.wandb_project, name=cfg.wandb_run_name,
                                   entity=cfg.wandb_entity, config={"train": cfg.to_dict(),
                                                                    "model": json.loads(self.model_cfg.to_json())}))
        # on resume, what an earlier process logged after the checkpoint's step is dropped: it is logged again
        self.logger = MetricsLogger(self.run_dir, enabled=info.is_main, sinks=sinks,
                                    resume_step=self.progress.step if resume else None)
        self.stats = {**model_stats(self.model_cfg, context=cfg.seq_len), "hardware": _hardware(info.device)}
        if info.is_main:
            print("\n".join(header_lines(cfg, self.model_cfg, self.stats, info, self.data, self.data.val,
                                         self.autocast, self.progress.step)), flush=True)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.schedule = cfg.lr_schedule()
        self.schedules = {g["base_lr"]: dataclasses.replace(self.schedule, peak=g["base_lr"])
                          for g in self.optimizer.param_groups}
        self.depth_sampler = cfg.depth_sampler()
        per_token = train_flops_per_token(self.model_cfg, cfg.seq_len)
        self.flops_per_step = per_token * self.tokens_per_step / info.world_size
        self.peak_tflops = device_peak_tflops(info.device, cfg.peak_tflops)

    # ------------------------------------------------------------------ the loop

    def fit(self, show_progress: bool = True) -> dict[str, Any]:
        """Run the steps from the current one to ``cfg.steps``; returns the summary. On SIGINT/SIGTERM: finish
        the step, checkpoint it and raise :class:`TrainingStopped` (:mod:`moeut.train.preemption`)."""
        cfg, info = self.cfg, self.info
        self.start_step = self.progress.step
        show_bar = show_progress and info.is_main
        self.bar = progress(total=cfg.steps, initial=self.start_step, desc="train", enabled=show_bar)
        self.clock = _Throughput(t0=time.perf_counter())
        self.last_save = _monotonic()
        try:
            if self.progress.eval_pending:
                self._pending_evaluation()
            with StopSignals(quiet=not info.is_main) as signals:
                for step in range(self.start_step, cfg.steps):
                    res = self.step(step)
                    self.log(step + 1, res, console=not show_bar)
                    signum, save_due = agree([signals.signum or 0, self._save_due()], info.device,
                                             info.distributed)
                    self.after_step(step + 1, stop=bool(signum), save_due=bool(save_due))
                    if signum:
                        raise TrainingStopped(int(signum), step + 1, cfg.steps, checkpoint_path(self.run_dir, step + 1),
                                              self.run_dir, distributed=info.distributed, quiet=not info.is_main)
        finally:
            self.bar.close()
            self.logger.close()
        summary = _read_summary(self.run_dir) if info.is_main else {}
        if info.is_main and summary:
            print(f"done: {summary['step']} steps, {summary['tokens_seen']:,} tokens, "
                  f"validation perplexity {summary['val_ppl']:.2f}, {summary['wall_time_s']:.0f} s")
        return summary

    def after_step(self, done: int, *, stop: bool, save_due: bool) -> None:
        """The evaluation, checkpoint and summary due after step ``done``. When stopping, the evaluation is left
        for the resumed run (a complete one could outlast a preemption's grace period) and a checkpoint is due."""
        cfg = self.cfg
        is_last = done == cfg.steps
        eval_due = bool(cfg.eval_every and done % cfg.eval_every == 0) or is_last
        if eval_due and stop:
            self.progress.eval_pending = True
        elif eval_due:
            self.evaluate(done, complete=is_last)
        if stop or save_due or self._scheduled_save(done):
            self.save(done)
        if self.info.is_main and (eval_due or stop):
            self.write_summary(done)

    def _scheduled_save(self, done: int) -> bool:
        return bool(self.cfg.save_every and done % self.cfg.save_every == 0) or done == self.cfg.steps

    def _save_due(self) -> bool:
        """``save_every_minutes`` have passed since the last checkpoint (or since this process started)."""
        minutes = self.cfg.save_every_minutes
        return minutes > 0 and _monotonic() - self.last_save >= 60 * minutes

    def _pending_evaluation(self) -> None:
        """The evaluation a signal postponed, on the restored weights: logged at its step as if never stopped."""
        done = self.progress.step
        self.evaluate(done, complete=done == self.cfg.steps)
        self.progress.eval_pending = False
        if self._scheduled_save(done):  # that checkpoint holds the evaluation in an uninterrupted run
            self.save(done)
        if self.info.is_main:  # the stopped process wrote the step's training metrics; add the evaluation
            summary = _read_summary(self.run_dir)
            if summary.get("step") == done:
                atomic_write_json(self.run_dir / SUMMARY, {**summary, "val_ppl": self.progress.val_ppl,
                                                           "wall_time_s": self.wall_time()})
            else:
                self.write_summary(done)

    def step(self, step: int) -> StepResult:
        """Optimizer step ``step`` (0-based) at its learning rate; fills :attr:`last` with its metrics."""
        cfg, info = self.cfg, self.info
        lr = self.schedule.lr(step)
        for group in self.optimizer.param_groups:  # each group on its own peak (Muon's may differ from AdamW's)
            group["lr"] = lr if group["base_lr"] == cfg.lr else self.schedules[group["base_lr"]].lr(step)
        batch = self.sampler.batch(step)
        repeats = self.depth_sampler.repeats(cfg.seed, step) if self.depth_sampler else None
        t_step = time.perf_counter()
        res = train_step(self.wrapped, self.optimizer, batch, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                         autocast=self.autocast, device=info.device, distributed=info.distributed, repeats=repeats)
        self.clock.window_time += time.perf_counter() - t_step  # train_step ends in .item(): the device is done
        self.clock.window_steps += 1
        if not (math.isfinite(res.ce) and math.isfinite(res.reg)):
            raise TrainingError(f"loss became {res.ce + res.reg} at step {step + 1}; training stopped. The last "
                                f"good checkpoint is kept in {self.run_dir / CHECKPOINTS}: lower --lr or "
                                f"check the data, then --resume")
        self.progress.step = step + 1
        self.progress.tokens_seen += self.tokens_per_step
        tok_s = (step + 1 - self.start_step) * self.tokens_per_step / max(self.clock.elapsed(), 1e-9)
        tflops = self.flops_per_step * self.clock.window_steps / max(self.clock.window_time, 1e-9) / 1e12
        self.last = {"train_loss": res.ce, "reg_loss": res.reg, "lr": lr, "grad_norm": res.grad_norm,
                     "tokens_seen": self.progress.tokens_seen, "tok_per_s": tok_s, "tflops": tflops,
                     "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                     "peak_memory_bytes": self.memory.peak_bytes()}
        if self.model_cfg.loss_free and res.expert_counts is not None:  # after the optimizer step; global counts
            self.last.update(balance_stats(self.model.update_selection_bias(res.expert_counts)))
        if self.model_cfg.act_target_depth and res.executed_depth is not None:  # the depth budget's halting shift
            self.last["act/halt_shift"] = self.model.update_halt_shift(res.executed_depth.mean().item())
            self.last["act/lambda"] = self.model.act_lambda.item()
        if repeats is not None:
            self.last["depth/repeats"] = repeats
        if cfg.optimizer == "muon":
            self.last["lr_muon"] = self.schedules[cfg.muon_lr].lr(step)
        return res

    def log(self, done: int, res: StepResult, console: bool) -> None:
        """The step's metrics line (every ``log_every`` steps, and with routing or residual norms), the bar."""
        cfg, last = self.cfg, self.last
        want_routing = cfg.routing_every > 0 and done % cfg.routing_every == 0
        if want_routing and res.expert_counts is not None:
            last.update(routing_stats(res.expert_counts))
        if res.depth is not None:  # ACT: mean and distribution of the per-token depth, every step
            last.update(depth_metrics(res.depth, self._max_depth()))
        if res.executed_depth is not None:  # MoEUT-ACT: the depth and MACs the forward passes ran
            last.update(executed_depth_metrics(res.executed_depth, self._max_depth(), self.model_cfg, cfg.seq_len))
        want_norms = cfg.residual_norm_every > 0 and done % cfg.residual_norm_every == 0
        if want_norms:
            last.update(_residual_norms(self.wrapped, self.data.val, cfg, self.autocast, self.info))
        if done % max(cfg.log_every, 1) == 0 or want_routing or want_norms or done == cfg.steps:
            if self.info.is_main:
                self.logger.log(done, {**last, **self.data.tokens_per_source(self.sampler, done)})
                if console:
                    print(console_line(done, last), flush=True)
            self.clock.window_time, self.clock.window_steps = 0.0, 0
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{res.ce:.3f}", reg=f"{res.reg:+.4f}", lr=f"{last['lr']:.2e}",
                             gnorm=f"{res.grad_norm:.3f}", tok_s=f"{last['tok_per_s']:,.0f}",
                             tflops=f"{last['tflops']:.3g}", mem=f"{last['peak_memory_bytes'] / 2**20:,.0f}MiB")

    def _max_depth(self) -> int:
        """The largest ACT depth a step can report: group applications for MoEUT, layer applications for SUT
        (whose group is one layer), up to the most a sampled depth allows."""
        cfg = self.model_cfg
        trained = cfg.n_layers if cfg.is_sut else cfg.n_repeats
        return max(trained, self.depth_sampler.high) if self.depth_sampler else trained

    def evaluate(self, done: int, complete: bool) -> None:
        """Validation perplexity after step ``done`` (``eval_batches`` batches, or all when ``complete``)."""
        cfg = self.cfg
        limit = None if complete else (cfg.eval_batches or None)
        batches = validation_batches(self.data.val, cfg.seq_len, cfg.batch_size, max_batches=limit)
        self.progress.val_ppl = val_ppl = evaluate_ppl(self.wrapped, batches)
        if self.info.is_main:
            self.logger.log(done, {"val_ppl": val_ppl, "val_loss": math.log(val_ppl)})
            self.bar.write(f"step {done}: validation perplexity {val_ppl:.2f}")

    def wall_time(self) -> float:
        """Training time of this run so far, earlier processes included."""
        return self.progress.wall_time_s + self.clock.elapsed()

    def save(self, done: int) -> None:
        """Checkpoint after step ``done`` (every rank takes part: FSDP2 gathers; rank 0 writes)."""
        progress_now = Progress(step=done, tokens_seen=self.progress.tokens_seen, wall_time_s=self.wall_time(),
                                val_ppl=self.progress.val_ppl, eval_pending=self.progress.eval_pending)
        state = checkpoint_state(self.model, self.optimizer, self.cfg, self.model_cfg, self.data.tokenizer_sha256,
                                 self.info, progress_now)
        if self.info.is_main:
            self.logger.flush()  # the logs reach at least the checkpoint's step, even if the process dies next
            save_checkpoint(self.run_dir, done, state, keep=self.cfg.keep_checkpoints)
        barrier(self.info)
        self.last_save = _monotonic()

    def write_summary(self, done: int) -> None:
        last = self.last
        summary = {"step": done, "train_loss": last.get("train_loss"), "reg_loss": last.get("reg_loss"),
                   "val_ppl": self.progress.val_ppl, "tokens_seen": last.get("tokens_seen"),
                   "wall_time_s": self.wall_time(), "tok_per_s": last.get("tok_per_s"),
                   "grad_norm": last.get("grad_norm"), "tflops": last.get("tflops"), "mfu": last.get("mfu"),
                   "peak_memory_bytes": last.get("peak_memory_bytes"), "peak_memory_kind": self.memory.kind,
                   "params_total": self.stats["params_total"],
                   "active_params_per_token": self.stats["active_params_per_token"],
                   "hardware": self.stats.get("hardware"),
                   "act_mean_depth": last.get("act/mean_depth"),  # ACT models: the last step's mean depth
                   "act_executed_depth": last.get("act/executed_mean_depth"),  # MoEUT-ACT: … as run
                   "act_executed_macs_per_token": last.get("act/executed_macs_per_token")}
        atomic_write_json(self.run_dir / SUMMARY, summary)

    def release(self) -> None:
        """Drop the DDP/FSDP wrapper (its reducer holds the process group) while the group is still registered:
        destroyed after it, the group's destructor joins gloo threads that may wait for the GIL (a hang)."""
        self.wrapped = None


@torch.no_grad()
def _residual_norms(model: torch.nn.Module, val_ds, cfg: TrainConfig, autocast, info: DistInfo) -> dict[str, float]:
    """Mean residual and update norm of every layer application on the first validation batch (every rank
    runs the same forward pass, so DDP/FSDP stay in step)."""
    batch = next(iter(validation_batches(val_ds, cfg.seq_len, max(1, cfg.batch_size // cfg.grad_accum),
                                         max_batches=1)), None)
    if batch is None:
        return {}
    with autocast or contextlib.nullcontext():
        out = model(batch[:, :-1].to(info.device), output_hidden_states=True)
    return residual_norm_metrics(out.hidden_states) if out.hidden_states is not None else {}


def _hardware(device: torch.device) -> str:
    """What the run trained on, for the compute analysis: the GPU model and rank count, or the CPU threads."""
    if device.type == "cuda":
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return f"{torch.cuda.get_device_name(device)} ×{ranks}"
    n = torch.get_num_threads()
    return f"cpu {platform.machine()} ({n} thread{'s' if n != 1 else ''})"


def evaluate_ppl(model: torch.nn.Module, batches) -> float:
    """Validation perplexity over non-overlapping windows (:func:`moeut.model.perplexity.window_nll`)."""
    totals = window_nll(model, batches)
    if totals.tokens == 0:
        raise TrainingError("the validation set holds no complete window of seq_len+1 tokens: use a smaller "
                            "--seq-len or re-run `moeut prepare` with a larger --val-fraction")
    return totals.ppl


def _read_summary(run_dir: Path) -> dict[str, Any]:
    p = run_dir / SUMMARY
    return json.loads(p.read_text()) if p.exists() else {}
