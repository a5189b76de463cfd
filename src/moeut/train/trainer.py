"""The training loop of the paper's recipe: AdamW, warmup + cosine (or WSD), clipping, CE + regulariser.

Resumable bit for bit on CPU: the data order is a pure function of (seed, step), and a checkpoint holds
the model, the optimizer, the step and the RNG states.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moeut.data import validation_batches
from moeut.data.mixture import TrainingData
from moeut.errors import MoeutError
from moeut.fileio import atomic_write_json, atomic_write_text
from moeut.model import build_model
from moeut.model.accounting import model_stats
from moeut.model.perplexity import window_nll
from moeut.run.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from moeut.run.layout import CHECKPOINTS, MODEL_CONFIG, SUMMARY, TOKENIZER_JSON, TOKENIZER_MODEL, TRAIN_CONFIG
from moeut.runtime import cpu_has_native_bf16, progress, tune_malloc
from moeut.train.activation_checkpointing import apply_activation_checkpointing
from moeut.train.config import TrainConfig
from moeut.train.distributed import DistInfo, barrier, init_distributed, shutdown, wrap_model
from moeut.train.init_from import InitFromError, load_init_weights
from moeut.train.metrics import MetricsLogger, WandbSink, depth_metrics, residual_norm_metrics, routing_stats
from moeut.train.step import autocast_for, train_step
from moeut.train.systems import PeakMemory, device_peak_tflops, train_flops_per_token


class TrainingError(MoeutError, RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


# settings that may change when a run is resumed: they do not change what is computed (the schedule's are
# checked separately, see _check_schedule_change)
_RESUMABLE_CHANGES = ("data", "steps", "eval_every", "save_every", "keep_checkpoints", "log_every", "device",
                      "residual_norm_every", "compile", "activation_checkpointing", "peak_tflops", "wandb_project",
                      "wandb_run_name", "wandb_entity")
_SCHEDULE_FIELDS = ("schedule", "decay_steps", "decay_fraction", "decay_shape")


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
    memory = PeakMemory(info.device)
    memory.start()
    try:
        run_dir = Path(cfg.out)
        data = TrainingData.open(cfg.data)  # one directory, or a weighted mixture (validation: the first's val)
        train_ds, val_ds = data, data.val
        model_cfg = cfg.model_config()
        if model_cfg.vocab_size != train_ds.vocab_size:
            model_cfg = model_cfg.replace(vocab_size=train_ds.vocab_size)
        init_weights, origin = None, ""
        if cfg.init_from and not (resume and list_checkpoints(run_dir)):  # checked before the run directory is made
            try:
                init_weights, origin = load_init_weights(model_cfg, cfg.init_from, train_ds.tokenizer_sha256,
                                                         allow_tokenizer_mismatch=allow_tokenizer_mismatch)
            except InitFromError as e:
                raise TrainingError(str(e)) from e
        run_state = _prepare_run_dir(run_dir, cfg, model_cfg, data, resume, info, allow_schedule_change)

        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg, backend=cfg.backend)
        start_step, wall_before, tokens_seen = 0, 0.0, 0
        if run_state is not None:
            start_step, wall_before = run_state["step"], run_state.get("wall_time_s", 0.0)
            tokens_seen = run_state.get("tokens_seen", 0)
            model.load_state_dict(run_state["model"])
        elif init_weights is not None:  # weights only: the optimizer, schedule, step and data start afresh
            model.load_state_dict(init_weights)
            if info.is_main:
                print(f"init       {origin}; fresh optimizer and schedule")
        model.to(info.device)
        apply_activation_checkpointing(model, cfg.activation_checkpointing)  # before FSDP/compile wrap it
        wrapped = wrap_model(model, info, cfg.fsdp)  # FSDP2 replaces parameters: build the optimizer after
        if cfg.compile:  # checkpoints keep reading ``model``: parameter names stay unprefixed
            wrapped = torch.compile(wrapped)
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                      weight_decay=cfg.weight_decay)
        if run_state is not None:
            _load_optimizer(model, optimizer, run_state["optimizer"], sharded=cfg.fsdp and info.distributed)
            torch.set_rng_state(run_state["rng_cpu"])
            if info.device.type == "cuda" and "rng_cuda" in run_state:
                torch.cuda.set_rng_state(run_state["rng_cuda"], info.device)
        autocast = autocast_for(cfg.precision, info.device)

        if cfg.batch_size % (info.world_size * cfg.grad_accum):
            raise TrainingError(f"batch_size={cfg.batch_size} must be divisible by world_size×grad_accum="
                                f"{info.world_size}×{cfg.grad_accum}")
        sampler = data.sampler(batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                               rank=info.rank, world_size=info.world_size)
        sinks = []
        if cfg.wandb_project and info.is_main:
            sinks.append(WandbSink(run_dir, project=cfg.wandb_project, name=cfg.wandb_run_name,
                                   entity=cfg.wandb_entity, config={"train": cfg.to_dict(),
                                                                    "model": json.loads(model_cfg.to_json())}))
        logger = MetricsLogger(run_dir, enabled=info.is_main, sinks=sinks)
        if run_state is not None:
            logger.truncate_after(start_step)
        stats = {**model_stats(model_cfg, context=cfg.seq_len), "hardware": _hardware(info.device)}
        if info.is_main:
            _print_header(cfg, model_cfg, stats, info, train_ds, val_ds, autocast, start_step)

        tokens_per_step = cfg.batch_size * cfg.seq_len
        schedule = cfg.lr_schedule()
        flops_per_step = train_flops_per_token(model_cfg, cfg.seq_len) * tokens_per_step / info.world_size
        peak_tflops = device_peak_tflops(info.device, cfg.peak_tflops)
        show_bar = show_progress and info.is_main
        bar = progress(total=cfg.steps, initial=start_step, desc="train", enabled=show_bar)
        t0, last = time.perf_counter(), {}
        window_time, window_steps = 0.0, 0  # optimizer-step time since the last metrics line
        val_ppl = run_state.get("val_ppl") if run_state else None
        step = start_step
        for step in range(start_step, cfg.steps):
            lr = schedule.lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            want_routing = cfg.routing_every > 0 and (step + 1) % cfg.routing_every == 0
            batch = sampler.batch(step)
            t_step = time.perf_counter()
            res = train_step(wrapped, optimizer, batch, grad_accum=cfg.grad_accum,
                             grad_clip=cfg.grad_clip, autocast=autocast, device=info.device,
                             distributed=info.distributed)
            window_time += time.perf_counter() - t_step  # train_step ends in .item(): the device is done
            window_steps += 1
            ce, reg, counts = res.ce, res.reg, res.expert_counts
            if not (math.isfinite(ce) and math.isfinite(reg)):
                raise TrainingError(f"loss became {ce + reg} at step {step + 1}; training stopped. The last "
                                    f"good checkpoint is kept in {run_dir / CHECKPOINTS}: lower --lr or "
                                    f"check the data, then --resume")
            tokens_seen += tokens_per_step
            done = step + 1
            elapsed = time.perf_counter() - t0
            tok_s = (done - start_step) * tokens_per_step / max(elapsed, 1e-9)
            tflops = flops_per_step * window_steps / max(window_time, 1e-9) / 1e12
            last = {"train_loss": ce, "reg_loss": reg, "lr": lr, "grad_norm": res.grad_norm, "tokens_seen": tokens_seen,
                    "tok_per_s": tok_s, "tflops": tflops,
                    "mfu": tflops / peak_tflops if peak_tflops else None,
                    "peak_memory_bytes": memory.peak_bytes()}
            if want_routing and counts is not None:
                last.update(routing_stats(counts))
            if res.depth is not None:  # ACT: mean and distribution of the per-token depth, every step
                last.update(depth_metrics(res.depth, _max_depth(model_cfg)))
            want_norms = cfg.residual_norm_every > 0 and done % cfg.residual_norm_every == 0
            if want_norms:
                last.update(_residual_norms(wrapped, val_ds, cfg, autocast, info))
            if done % max(cfg.log_every, 1) == 0 or want_routing or want_norms or done == cfg.steps:
                if info.is_main:
                    logger.log(done, {**last, **data.tokens_per_source(sampler, done)})
                    if not show_bar:
                        print(_console_line(done, last), flush=True)
                window_time, window_steps = 0.0, 0
            bar.update(1)
            bar.set_postfix(loss=f"{ce:.3f}", reg=f"{reg:+.4f}", lr=f"{lr:.2e}", gnorm=f"{res.grad_norm:.3f}",
                            tok_s=f"{tok_s:,.0f}", tflops=f"{tflops:.3g}",
                            mem=f"{last['peak_memory_bytes'] / 2**20:,.0f}MiB")

            is_last = done == cfg.steps
            if (cfg.eval_every and done % cfg.eval_every == 0) or is_last:
                limit = None if is_last else (cfg.eval_batches or None)  # the final evaluation is complete
                val_ppl = evaluate_ppl(wrapped, validation_batches(val_ds, cfg.seq_len, cfg.batch_size,
                                                                   max_batches=limit))
                if info.is_main:
                    logger.log(done, {"val_ppl": val_ppl, "val_loss": math.log(val_ppl)})
                    bar.write(f"step {done}: validation perplexity {val_ppl:.2f}")
            wall = wall_before + time.perf_counter() - t0
            if (cfg.save_every and done % cfg.save_every == 0) or is_last:
                state = _checkpoint_state(model, optimizer, cfg, model_cfg, train_ds.tokenizer_sha256, info)
                if info.is_main:
                    save_checkpoint(run_dir, done, {**state, "wall_time_s": wall, "tokens_seen": tokens_seen,
                                                    "val_ppl": val_ppl}, keep=cfg.keep_checkpoints)
                barrier(info)
            if info.is_main and ((cfg.eval_every and done % cfg.eval_every == 0) or is_last):
                _write_summary(run_dir, done, last, val_ppl, wall, stats, memory.kind)
        bar.close()
        logger.close()
        summary = _read_summary(run_dir) if info.is_main else {}
        if info.is_main and summary:
            print(f"done: {summary['step']} steps, {summary['tokens_seen']:,} tokens, "
                  f"validation perplexity {summary['val_ppl']:.2f}, {summary['wall_time_s']:.0f} s")
        return summary
    finally:
        # drop the DDP/FSDP wrapper (its reducer holds the process group) while the group is still registered:
        # destroyed after it, the group's destructor joins gloo threads that may wait for the GIL (a hang)
        wrapped = None  # noqa: F841
        shutdown(info)


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


def _max_depth(model_cfg) -> int:
    """The depth unit of ACT: group applications for MoEUT, layer applications for SUT."""
    return model_cfg.n_layers if model_cfg.is_sut else model_cfg.n_repeats


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


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, model_cfg,
                      tokenizer_sha256: str, info: DistInfo) -> dict[str, Any]:
    if cfg.fsdp and info.distributed:  # gather full (unsharded) tensors; rank 0 writes them
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )

        model_sd, optim_sd = get_state_dict(model, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
    state = {"model": model_sd, "optimizer": optim_sd, "train_config": cfg.to_json(),
             "model_config": model_cfg.to_json(), "tokenizer_sha256": tokenizer_sha256,
             "rng_cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(info.device)
    return state


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig, model_cfg, data: TrainingData, resume: bool,
                     info: DistInfo, allow_schedule_change: bool = False) -> dict[str, Any] | None:
    """Check the run directory; on resume, return the newest loadable checkpoint's state."""
    tokenizer_sha256 = data.tokenizer_sha256
    config_path = run_dir / TRAIN_CONFIG
    old = None
    if config_path.exists():
        try:
            old = json.loads(config_path.read_text())
        except json.JSONDecodeError:
            old = None
        if not resume:
            raise TrainingError(f"{run_dir} already holds a run ({config_path}); pass --resume to continue "
                                f"it or choose another --out")
        if old is not None:  # a run written before a field existed had its default
            old = {**TrainConfig.field_defaults(), **old}
        exempt = _RESUMABLE_CHANGES + (_SCHEDULE_FIELDS if allow_schedule_change else ())
        comparable = {k: v for k, v in cfg.to_dict().items() if k not in exempt}
        if old is not None and any(old.get(k) != v for k, v in comparable.items()):
            diff = sorted(k for k, v in comparable.items() if old.get(k) != v)
            raise TrainingError(f"{run_dir} holds a run with a different configuration (fields {diff}); "
                                f"--resume needs the same settings, or choose another --out")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(f"{run_dir} exists and is not a moeut run directory; choose another --out")
    state = None
    if resume:
        found = latest_checkpoint(run_dir)
        if found is not None:
            path, state = found
            if state.get("tokenizer_sha256") != tokenizer_sha256:
                raise TrainingError(f"checkpoint {path} was trained with tokenizer {state.get('tokenizer_sha256')}, "
                                    f"but the data in {data.describe()} uses {tokenizer_sha256}: resume with the same data")
            if old is not None and not allow_schedule_change:
                _check_schedule_change(TrainConfig.from_dict(old), cfg, state["step"], run_dir)
            if info.is_main:
                print(f"resuming from {path} (step {state['step']})")
        elif info.is_main:
            print(f"no checkpoint in {run_dir} yet: starting at step 0")
    barrier(info)  # every rank has checked the directory before rank 0 writes to it
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in (TOKENIZER_MODEL, TOKENIZER_JSON):  # the run is self-contained for generate/eval
            src = data.first_dir / name
            if src.exists() and not (run_dir / name).exists():
                shutil.copyfile(src, run_dir / name)
        for path, text in ((config_path, cfg.to_json()), (run_dir / MODEL_CONFIG, model_cfg.to_json())):
            atomic_write_text(path, text)
    barrier(info)
    return state


def _check_schedule_change(old: TrainConfig, new: TrainConfig, step: int, run_dir: Path) -> None:
    """Resuming at ``step`` must not change the learning rate of a step already taken (the cosine's depends
    on the total from the end of warmup on; WSD's only from the start of its decay)."""
    before, after = old.lr_schedule(), new.lr_schedule()
    if before == after:
        return
    differs = before.first_difference(after, step)
    if differs is None:
        return
    how = (f"the cosine spans all {old.steps} steps, so a cosine run cannot be extended without reshaping it. "
           f"To make a run extendable, train it with --schedule wsd (its stable phase can be extended as long as "
           f"the decay has not started)" if old.schedule == "cosine" else
           f"its decay started at step {before.decay_start}; a WSD run can be extended only while the decay has "
           f"not started (pass --decay-steps to keep the decay where it was)")
    raise TrainingError(f"{run_dir} is at step {step} of {old.steps} steps with the schedule {before.describe()}; "
                        f"resuming with --steps {new.steps} and the schedule {after.describe()} would change the "
                        f"learning rate of steps already taken (from step {differs} on): {how}. Pass "
                        f"--allow-schedule-change to accept the new schedule from step {step} on")


def _write_summary(run_dir: Path, step: int, last: dict[str, Any], val_ppl: float | None, wall: float,
                   stats: dict[str, Any], memory_kind: str) -> None:
    summary = {"step": step, "train_loss": last.get("train_loss"), "reg_loss": last.get("reg_loss"),
               "val_ppl": val_ppl, "tokens_seen": last.get("tokens_seen"), "wall_time_s": wall,
               "tok_per_s": last.get("tok_per_s"), "grad_norm": last.get("grad_norm"), "tflops": last.get("tflops"),
               "mfu": last.get("mfu"), "peak_memory_bytes": last.get("peak_memory_bytes"),
               "peak_memory_kind": memory_kind, "params_total": stats["params_total"],
               "active_params_per_token": stats["active_params_per_token"], "hardware": stats.get("hardware"),
               "act_mean_depth": last.get("act/mean_depth")}  # ACT models: the last step's mean depth
    atomic_write_json(run_dir / SUMMARY, summary)


def _console_line(step: int, m: dict[str, Any]) -> str:
    """The metrics of a logged step on one line (when there is no progress bar to show them)."""
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "-"
    return (f"step {step}: loss {m['train_loss']:.4f} reg {m['reg_loss']:+.4f} lr {m['lr']:.3e} "
            f"grad_norm {m['grad_norm']:.4f} tok/s {m['tok_per_s']:,.0f} tflops {m['tflops']:.4g} mfu {mfu} "
            f"mem {m['peak_memory_bytes'] / 2**20:,.0f} MiB")


def _read_summary(run_dir: Path) -> dict[str, Any]:
    p = run_dir / SUMMARY
    return json.loads(p.read_text()) if p.exists() else {}


def _print_header(cfg: TrainConfig, model_cfg, stats: dict[str, Any], info: DistInfo, train_ds, val_ds,
                  autocast, start_step: int) -> None:
    prec = "bf16 autocast (fp32 master weights)" if autocast is not None else "fp32"
    per_step = cfg.batch_size * cfg.seq_len
    lines = [
        f"model      {cfg.preset}: {stats['params_total'] / 1e6:.2f}M params "
        f"({stats['active_params_per_token'] / 1e6:.2f}M active per token), {model_cfg.n_layers} layer "
        f"applications of {model_cfg.group_size} distinct layers, vocab {model_cfg.vocab_size}",
        f"data       {train_ds.describe()}: {train_ds.num_tokens:,} train / {val_ds.num_tokens:,} validation tokens",
        f"batch      {cfg.batch_size} × {cfg.seq_len} = {per_step:,} tokens per step "
        f"({info.world_size} rank(s) × {cfg.grad_accum} micro-batch(es)); {cfg.steps} steps = "
        f"{per_step * cfg.steps / max(train_ds.num_tokens, 1):.2f} epochs",
        f"optimizer  AdamW lr {cfg.lr:g} wd {cfg.weight_decay:g}, warmup {cfg.warmup_steps}, "
        f"{cfg.lr_schedule().describe()}, clip {cfg.grad_clip:g}",
        f"device     {info.device} ({prec}), expert backend {cfg.backend or 'auto'}"
        + (f", {'FSDP2' if cfg.fsdp else 'DDP'}" if info.distributed else "")
        + (f", activation checkpointing every {cfg.activation_checkpointing} layer application(s)"
           if cfg.activation_checkpointing else ""),
        f"run        {cfg.out}" + (f" (resuming at step {start_step})" if start_step else ""),
    ]
    if autocast is not None and info.device.type == "cpu" and not cpu_has_native_bf16():
        lines.append("warning    this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 is emulated and slower than "
                     "fp32 here; --precision auto uses fp32 on CPUs")
    elif autocast is None and cfg.precision == "auto" and info.device.type == "cpu" and cpu_has_native_bf16():
        lines.append("note       this CPU runs bf16 natively: --precision bf16 trains faster here (the README's "
                     "CPU speed section); auto keeps fp32 on CPUs, so a run gives the same numbers on every CPU")
    print("\n".join(lines), flush=True)
