"""A run directory across processes: what a checkpoint holds, which settings may change on resume, and the
checks before a run starts or continues in a directory."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeut.data.mixture import TrainingData
from moeut.fileio import atomic_write_text
from moeut.run.checkpoint import latest_checkpoint
from moeut.run.layout import MODEL_CONFIG, TOKENIZER_JSON, TOKENIZER_MODEL, TRAIN_CONFIG
from moeut.train.config import TrainConfig
from moeut.train.distributed import DistInfo, barrier
from moeut.train.errors import TrainingError

# settings that may change when a run is resumed (declared with the fields: TrainConfig.resumable_fields); the
# schedule's may change too when the steps already taken keep their learning rates (check_schedule_change)
RESUMABLE_CHANGES = TrainConfig.resumable_fields()
SCHEDULE_FIELDS = ("schedule", "decay_steps", "decay_fraction", "decay_shape")


@dataclass
class Progress:
    """How far a run has come: what the loop advances and a checkpoint restores."""

    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0
    wall_time_s: float = 0.0  # training time of earlier processes of this run
    val_ppl: float | None = None  # the latest validation perplexity
    eval_pending: bool = False  # stopped by a signal before this step's scheduled evaluation: run it on resume


@dataclass
class Resumed:
    """The newest loadable checkpoint of a run, as the trainer restores it."""

    path: Path
    progress: Progress
    model: dict[str, Any]
    optimizer: dict[str, Any]
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None

    @classmethod
    def from_state(cls, path: Path, state: dict[str, Any]) -> "Resumed":
        progress = Progress(step=state["step"], tokens_seen=state.get("tokens_seen", 0),
                            wall_time_s=state.get("wall_time_s", 0.0), val_ppl=state.get("val_ppl"),
                            eval_pending=state.get("eval_pending", False))
        return cls(path=path, progress=progress, model=state["model"], optimizer=state["optimizer"],
                   rng_cpu=state["rng_cpu"], rng_cuda=state.get("rng_cuda"))


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, model_cfg,
                     tokenizer_sha256: str, info: DistInfo, progress: Progress) -> dict[str, Any]:
    """Everything a checkpoint holds (full, unsharded tensors: under FSDP2 every rank gathers, rank 0 writes)."""
    if cfg.fsdp and info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(model, _torch_optimizers(optimizer),
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
    state = {"model": model_sd, "optimizer": optim_sd, "train_config": cfg.to_json(),
             "model_config": model_cfg.to_json(), "tokenizer_sha256": tokenizer_sha256,
             "rng_cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(info.device)
    return {**state, "wall_time_s": progress.wall_time_s, "tokens_seen": progress.tokens_seen,
            "val_ppl": progress.val_ppl, "eval_pending": progress.eval_pending}


def _torch_optimizers(optimizer) -> Any:
    """The torch optimizer(s) behind ``optimizer`` (Muon + AdamW are two, in one state dict under FSDP2)."""
    return getattr(optimizer, "optimizers", optimizer)


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, resumed: Resumed, info: DistInfo,
            sharded: bool) -> None:
    """Load the optimizer state (the model's is loaded before wrapping) and the RNG states."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, _torch_optimizers(optimizer), resumed.optimizer,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(resumed.optimizer)
    torch.set_rng_state(resumed.rng_cpu)
    if info.device.type == "cuda" and resumed.rng_cuda is not None:
        torch.cuda.set_rng_state(resumed.rng_cuda, info.device)


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, model_cfg, data: TrainingData, resume: bool,
                    info: DistInfo, allow_schedule_change: bool = False) -> Resumed | None:
    """Check the run directory and write its configuration; on resume, return the newest loadable checkpoint."""
    old = _saved_config(run_dir, cfg, resume, allow_schedule_change)
    resumed = _find_checkpoint(run_dir, cfg, data, old, info, allow_schedule_change) if resume else None
    barrier(info)  # every rank has checked the directory before rank 0 writes to it
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in (TOKENIZER_MODEL, TOKENIZER_JSON):  # the run is self-contained for generate/eval
            src = data.first_dir / name
            if src.exists() and not (run_dir / name).exists():
                shutil.copyfile(src, run_dir / name)
        for path, text in ((run_dir / TRAIN_CONFIG, cfg.to_json()), (run_dir / MODEL_CONFIG, model_cfg.to_json())):
            atomic_write_text(path, text)
    barrier(info)
    return resumed


def _saved_config(run_dir: Path, cfg: TrainConfig, resume: bool, allow_schedule_change: bool) -> dict | None:
    """The configuration a run directory already holds (None for a new run), checked against ``cfg``."""
    config_path = run_dir / TRAIN_CONFIG
    if not config_path.exists():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise TrainingError(f"{run_dir} exists and is not a moeut run directory; choose another --out")
        return None
    if not resume:
        raise TrainingError(f"{run_dir} already holds a run ({config_path}); pass --resume to continue "
                            f"it or choose another --out")
    try:
        old = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        return None
    old = {**TrainConfig.field_defaults(), **old}  # a run written before a field existed had its default
    exempt = RESUMABLE_CHANGES + (SCHEDULE_FIELDS if allow_schedule_change else ())
    comparable = {k: v for k, v in cfg.to_dict().items() if k not in exempt}
    diff = sorted(k for k, v in comparable.items() if old.get(k) != v)
    if diff:
        changes = "; ".join(f"{k}: {old.get(k)!r} in the run, {comparable[k]!r} now" for k in diff)
        raise TrainingError(f"{run_dir} holds a run with a different configuration ({changes}). --resume needs "
                            f"the same values for these (leave them out to keep the run's), or choose another "
                            f"--out. Settings that may change on resume: {', '.join(RESUMABLE_CHANGES)}")
    return old


def _find_checkpoint(run_dir: Path, cfg: TrainConfig, data: TrainingData, old: dict | None, info: DistInfo,
                     allow_schedule_change: bool) -> Resumed | None:
    found = latest_checkpoint(run_dir)
    if found is None:
        if info.is_main:
            print(f"no checkpoint in {run_dir} yet: starting at step 0")
        return None
    path, state = found
    tokenizer_sha256 = data.tokenizer_sha256
    if state.get("tokenizer_sha256") != tokenizer_sha256:
        raise TrainingError(f"checkpoint {path} was trained with tokenizer {state.get('tokenizer_sha256')}, "
                            f"but the data in {data.describe()} uses {tokenizer_sha256}: resume with the same data")
    if old is not None and not allow_schedule_change:
        check_schedule_change(TrainConfig.from_dict(old), cfg, state["step"], run_dir)
    if info.is_main:
        print(f"resuming from {path} (step {state['step']})")
    return Resumed.from_state(path, state)


def check_schedule_change(old: TrainConfig, new: TrainConfig, step: int, run_dir: Path) -> None:
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
