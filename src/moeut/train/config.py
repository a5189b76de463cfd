"""Training configuration: the paper's recipe as defaults (Sec. 3 and App. A.3 of MoEUT)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeut.data.mixture import MixtureSpecError, parse_sources
from moeut.model.config import ConfigError, ModelConfig
from moeut.model.presets import RECIPES
from moeut.train.schedule import DECAY_SHAPES, DEFAULT_DECAY_FRACTION, SCHEDULES, LRSchedule

@dataclass
class TrainConfig:
    preset: str = "moeut-tiny"  # model preset (see `moeut info`)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to change
    data: str | list = ""  # directory written by `moeut prepare`, or a list of "DIR[:WEIGHT]" (a mixture)
    out: str = ""  # run directory
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # global batch in sequences (split over ranks and accumulation steps)
    seq_len: int | None = None  # context T; default: the preset's context_length
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    lr: float | None = None  # peak learning rate; default: the preset's recipe (the paper's 2.5e-4)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01  # on all parameters, as the paper
    warmup_steps: int | None = None  # linear warmup; default: the preset's recipe (0 for 44M, 4000 for larger)
    final_lr_ratio: float = 0.1  # the floor: the cosine's eta_min (T_max = steps, as the paper's code), the WSD end
    grad_clip: float | None = None  # κ; default: the preset's recipe (0.1 for 44M, 0.25 otherwise); 0 disables
    eval_every: int = 200  # validation perplexity every N steps (and at the end); 0 = only at the end
    eval_batches: int = 0  # validation batches per periodic evaluation; 0 = all (the final one is always complete)
    save_every: int = 500  # checkpoint every N steps (and at the end); 0 = only at the end
    save_every_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last one; 0 = off
    keep_checkpoints: int = 3  # keep the newest K checkpoints
    log_every: int = 10  # metrics line every N steps
    routing_every: int = 100  # routing statistics every N steps; 0 disables
    residual_norm_every: int = 0  # residual/update norm per layer application every N steps (one val batch); 0 = off
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    backend: str | None = None  # expert-matmul backend (None = automatic)
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard each shared layer, then the root) instead of DDP
    compile: bool = False  # torch.compile the training forward/backward (the expert ops are custom ops: no breaks)
    activation_checkpointing: int = 0  # recompute every K-th layer application in the backward pass; 0 = off
    schedule: str = "cosine"  # "cosine" (the paper's) or "wsd" (warmup, stable, decay)
    decay_steps: int | None = None  # wsd: length of the final decay (or decay_fraction of steps; default 0.2)
    decay_fraction: float | None = None  # wsd: decay over this fraction of steps (when decay_steps is not set)
    decay_shape: str = "linear"  # wsd: "linear" or "cosine" decay from lr to final_lr_ratio · lr
    peak_tflops: float | None = None  # per-device peak for mfu; default: the table for known GPUs, none on CPU
    init_from: str = ""  # start from the weights of this run/checkpoint/export (fresh optimizer and schedule)
    wandb_project: str = ""  # log to Weights & Biases (pip install 'moeut[wandb]'); "" = off
    wandb_run_name: str = ""  # W&B run name (default: W&B's)
    wandb_entity: str = ""  # W&B entity (team or user; default: yours)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.preset not in RECIPES:
            self.model_config()  # raises: unknown preset, with the list of presets
        recipe = RECIPES[self.preset]  # every preset carries one (moeut.model.presets)
        if self.lr is None:
            self.lr = recipe.lr
        if self.warmup_steps is None:
            self.warmup_steps = recipe.warmup_steps
        if self.grad_clip is None:
            self.grad_clip = recipe.grad_clip
        if self.seq_len is None:
            self.seq_len = self.model_config().context_length
        self.validate()

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_name(self.preset, **self.model_overrides)

    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: {msg}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(self.batch_size % self.grad_accum == 0, "grad_accum",
             f"must divide batch_size={self.batch_size} (each micro-batch has batch_size/grad_accum rows)")
        need(self.lr > 0, "lr", "must be positive")
        need(0 <= self.final_lr_ratio <= 1, "final_lr_ratio", "must be in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        for name in ("eval_every", "eval_batches", "save_every", "save_every_minutes", "log_every", "routing_every",
                     "residual_norm_every", "keep_checkpoints"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.precision in ("auto", "bf16", "fp32"), "precision", 'must be "auto", "bf16" or "fp32"')
        need(isinstance(self.activation_checkpointing, int) and self.activation_checkpointing >= 0,
             "activation_checkpointing", "must be an integer >= 0 (0 = off, K = every K-th layer application)")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {list(SCHEDULES)}")
        need(self.decay_shape in DECAY_SHAPES, "decay_shape", f"must be one of {list(DECAY_SHAPES)}")
        if self.schedule != "wsd":
            for name in ("decay_steps", "decay_fraction"):
                need(getattr(self, name) is None, name, 'is a setting of --schedule wsd (the cosine decays over '
                     'all steps)')
        else:
            need(self.decay_steps is None or self.decay_fraction is None, "decay_fraction",
                 "give either decay_steps or decay_fraction, not both")
            if self.decay_steps is not None:
                need(isinstance(self.decay_steps, int) and 0 < self.decay_steps <= self.steps, "decay_steps",
                     f"must be an integer in 1 … steps={self.steps}")
            if self.decay_fraction is not None:
                need(0 < self.decay_fraction <= 1, "decay_fraction", "must be in (0, 1]")
            need(self.steps - self.wsd_decay_steps() >= self.warmup_steps, "warmup_steps",
                 f"must end before the decay starts (step {self.steps - self.wsd_decay_steps()})")
        need(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "must be positive")
        if self.data:  # the format of "DIR[:WEIGHT]" entries; the directories are opened by the trainer
            try:
                parse_sources(self.data)
            except MixtureSpecError as e:
                raise ConfigError(f"TrainConfig.data={self.data!r}: {e}") from None
        self.model_config()  # validates preset and overrides

    def wsd_decay_steps(self) -> int:
        """Length of the WSD decay: decay_steps, or round(decay_fraction · steps) (default fraction 0.2)."""
        if self.decay_steps is not None:
            return self.decay_steps
        frac = DEFAULT_DECAY_FRACTION if self.decay_fraction is None else self.decay_fraction
        return max(1, round(frac * self.steps))

    def lr_schedule(self) -> LRSchedule:
        """The learning-rate schedule these settings describe."""
        return LRSchedule(kind=self.schedule, peak=self.lr, total_steps=self.steps, warmup=self.warmup_steps,
                          final_ratio=self.final_lr_ratio,
                          decay_steps=self.wsd_decay_steps() if self.schedule == "wsd" else 0,
                          decay_shape=self.decay_shape)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """Every field's default (as in :meth:`to_dict`; None where the default is resolved per preset)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        return cls.from_dict({**d, **overrides})
