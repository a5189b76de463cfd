"""What training prints: the header before the first step and a metrics line per logged step."""

from __future__ import annotations

from typing import Any

from moeut.runtime import cpu_has_native_bf16
from moeut.train.config import TrainConfig
from moeut.train.distributed import DistInfo


def header_lines(cfg: TrainConfig, model_cfg, stats: dict[str, Any], info: DistInfo, train_ds, val_ds,
                 autocast, start_step: int) -> list[str]:
    """The run at a glance: model, data, batch, optimizer, device, run directory, and warnings."""
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
        f"optimizer  {_optimizer(cfg)}, warmup {cfg.warmup_steps}, {cfg.lr_schedule().describe()}, "
        f"clip {cfg.grad_clip:g}",
        f"device     {info.device} ({prec}), expert backend {cfg.backend or 'auto'}"
        + (f", {'FSDP2' if cfg.fsdp else 'DDP'}" if info.distributed else "")
        + (f", activation checkpointing every {cfg.activation_checkpointing} layer application(s)"
           if cfg.activation_checkpointing else ""),
        f"run        {cfg.out}" + (f" (resuming at step {start_step})" if start_step else ""),
    ]
    if cfg.depth_sampling:
        lines.insert(4, f"depth      {cfg.depth_sampler().describe()}; validation at the trained "
                        f"{model_cfg.n_repeats}")
    if cfg.warmup_steps >= cfg.steps:
        last_lr = cfg.lr_schedule().lr(cfg.steps - 1)
        lines.append(f"warning    warmup {cfg.warmup_steps} >= steps {cfg.steps}: the learning rate never reaches --lr "
                     f"{cfg.lr:g} (the last step runs at {last_lr:.3g}); pass --warmup N with N < --steps, e.g. "
                     f"--warmup {cfg.steps // 10}")
    if autocast is not None and info.device.type == "cpu" and not cpu_has_native_bf16():
        lines.append("warning    this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 is emulated and slower than "
                     "fp32 here; --precision auto uses fp32 on CPUs")
    elif autocast is None and cfg.precision == "auto" and info.device.type == "cpu" and cpu_has_native_bf16():
        lines.append("note       this CPU runs bf16 natively: --precision bf16 trains faster here "
                     "(docs/performance.md, \"fp32 or bf16 on a CPU\"); auto keeps fp32 on CPUs, so a run gives "
                     "the same numbers on every CPU")
    return lines


def _optimizer(cfg: TrainConfig) -> str:
    adamw = f"AdamW lr {cfg.lr:g} wd {cfg.weight_decay:g}"
    if cfg.optimizer != "muon":
        return adamw
    return (f"Muon lr {cfg.muon_lr:g} wd {cfg.muon_weight_decay:g} momentum {cfg.muon_momentum:g} "
            f"({cfg.muon_lr_scale} scaling) for the hidden matrices, {adamw} for the rest")


def console_line(step: int, m: dict[str, Any]) -> str:
    """The metrics of a logged step on one line (when there is no progress bar to show them)."""
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "-"
    return (f"step {step}: loss {m['train_loss']:.4f} reg {m['reg_loss']:+.4f} lr {m['lr']:.3e} "
            f"grad_norm {m['grad_norm']:.4f} tok/s {m['tok_per_s']:,.0f} tflops {m['tflops']:.4g} mfu {mfu} "
            f"mem {m['peak_memory_bytes'] / 2**20:,.0f} MiB")
