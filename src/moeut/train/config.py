"""Training configuration: the paper's recipe as defaults (Sec. 3 and App. A.3 of MoEUT)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeut.data.mixture import MixtureSpecError, parse_sources
from moeut.model.config import ConfigError, ModelConfig
from moeut.model.presets import RECIPES
from moeut.settings import field_default, setting, settings_of
from moeut.train.depth_sampling import DepthSampler, DepthSamplingError
from moeut.train.muon import LR_SCALES
from moeut.train.schedule import DECAY_SHAPES, DEFAULT_DECAY_FRACTION, SCHEDULES, LRSchedule

OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    """A training run: the model preset, the data, the paper's recipe and everything around it.

    Each field is defined once (:func:`moeut.settings.setting`): ``moeut train``'s flags, ``--config`` files,
    ``--help`` and the resume rules are derived from these definitions. Fields left as None are resolved from
    the preset (:data:`moeut.model.presets.RECIPES`, the model's context length) when the config is made.
    """

    preset: str = setting("moeut-tiny", help="model preset; see `moeut info`")
    model_overrides: dict[str, Any] = setting(default_factory=dict, cli=False,
                                              help="ModelConfig fields to change (flag: --model FIELD=VALUE)")
    data: str | list = setting("", cli=False, resumable=True,
                               help='directory written by `moeut prepare`, or a list of "DIR[:WEIGHT]" (a mixture)')
    out: str = setting("", resumable=True,
                       help="run directory (checkpoints, metrics.jsonl, summary.json, tensorboard/)")
    steps: int = setting(1000, resumable=True, help="optimizer steps")
    batch_size: int = setting(16, help="global batch in sequences (split over ranks and accumulation steps)")
    seq_len: int | None = setting(None, default_text="the preset's context_length", help="context length T")
    grad_accum: int = setting(1, help="micro-batches per optimizer step (per rank)")
    lr: float | None = setting(None, default_text="the preset's recipe: the paper's 2.5e-4 for every preset",
                               help="peak learning rate")
    optimizer: str = setting("adamw", choices=OPTIMIZERS,
                             help="adamw (the paper's), or muon: Muon for the hidden matrices (each expert's on its "
                                  "own) and AdamW for embeddings, head, norms, biases, routers and halting gates")
    muon_lr: float | None = setting(None, default_text="--lr (the default scaling matches AdamW's update size)",
                                    help="muon: peak learning rate of the Muon matrices")
    muon_weight_decay: float | None = setting(None, default_text="--weight-decay",
                                              help="muon: decoupled weight decay of the Muon matrices")
    muon_momentum: float = setting(0.95, help="muon: momentum (Nesterov)")
    muon_lr_scale: str = setting("match_rms_adamw", choices=LR_SCALES,
                                 help="muon: learning-rate factor by matrix shape: match_rms_adamw "
                                      "(0.2·√max(fan_in, fan_out), Moonshot's) or original "
                                      "(√max(1, fan_out/fan_in), Keller Jordan's)")
    betas: tuple[float, float] = setting((0.9, 0.999), metavar="BETA", help="AdamW betas")
    eps: float = setting(1e-8, help="AdamW epsilon")
    weight_decay: float = setting(0.01, help="AdamW weight decay, on all parameters as the paper")
    warmup_steps: int | None = setting(None, aliases=("warmup",),
                                       default_text="the preset's recipe: 0 for 44M, 4000 from 126M, 50 for -tiny",
                                       help="linear warmup steps")
    final_lr_ratio: float = setting(0.1, help="the floor as a fraction of lr: the cosine's eta_min (T_max = steps, "
                                              "as the paper's code), the end of the WSD decay")
    grad_clip: float | None = setting(None, aliases=("clip",),
                                      default_text="the preset's recipe: 0.1 for 44M, 0.25 otherwise",
                                      help="gradient clipping norm κ; 0 = off")
    eval_every: int = setting(200, resumable=True,
                              help="validation perplexity every N steps (and at the end); 0 = only at the end")
    eval_batches: int = setting(0, resumable=True, help="validation batches per periodic evaluation; 0 = all "
                                                        "(the final evaluation is always complete)")
    save_every: int = setting(500, resumable=True, help="checkpoint every N steps (and at the end); 0 = only at "
                                                        "the end")
    save_every_minutes: float = setting(0.0, resumable=True, help="also checkpoint when M minutes have passed since "
                                                                  "the last checkpoint (preemptible clusters); 0 = off")
    keep_checkpoints: int = setting(3, aliases=("keep",), resumable=True, help="keep the newest K checkpoints")
    log_every: int = setting(10, resumable=True, help="metrics line every N steps")
    routing_every: int = setting(100, resumable=True, help="routing statistics every N steps; 0 = off")
    residual_norm_every: int = setting(0, resumable=True,
                                       help="residual and update norm of every layer application every N steps, on "
                                            "one validation batch; 0 = off")
    seed: int = setting(0, help="seed of the initialisation and the data order")
    device: str = setting("auto", resumable=True, help='"auto" (CUDA when available), "cpu", "cuda", "cuda:N"')
    precision: str = setting("auto", choices=PRECISIONS,
                             help="auto: bf16 autocast on CUDA, fp32 on CPUs")
    backend: str | None = setting(None, default_text="automatic", help="expert-matmul backend")
    fsdp: bool = setting(False, help="under torchrun: FSDP2 (each shared layer, then the root) instead of DDP")
    compile: bool = setting(False, resumable=True,
                            help="torch.compile the model (whole graph: the expert ops are registered custom ops)")
    activation_checkpointing: int = setting(0, resumable=True, const=1, metavar="K",
                                            help="recompute every K-th layer application in the backward pass (K = "
                                                 "1 when the flag has no value; 0 = off): less activation memory "
                                                 "for about one more forward pass")
    schedule: str = setting("cosine", choices=SCHEDULES,
                            help="learning-rate schedule: cosine (the paper's) or wsd (warmup, stable, decay: "
                                 "extendable while the decay has not started)")
    decay_steps: int | None = setting(None, default_text="", help="wsd: decay over the last N steps")
    decay_fraction: float | None = setting(None, default_text="0.2 when --decay-steps is not given",
                                           help="wsd: decay over this fraction of --steps")
    decay_shape: str = setting("linear", choices=DECAY_SHAPES, help="wsd: shape of the decay to final_lr_ratio × lr")
    depth_sampling: str = setting("", metavar="LAW",
                                  help='train with the number of group applications drawn anew every step '
                                       '(shared-layer models): "uniform:LO-HI" or Huginn\'s '
                                       '"lognormal-poisson:MEAN:MAX[:SIGMA]"; validation stays at the trained depth; '
                                       '"" = the trained depth every step')
    peak_tflops: float | None = setting(None, resumable=True,
                                        default_text="a table of common GPUs in bf16; no mfu on CPUs",
                                        help="per-device peak TFLOP/s for the mfu metric")
    init_from: str = setting("", metavar="RUN_OR_CHECKPOINT",
                             help="start from these weights only (a moeut run, checkpoint, export-hf or import-paper "
                                  "directory): fresh optimizer, schedule and data; the model configuration must "
                                  "match (without --preset/--model/--config it is taken from the source)")
    wandb_project: str = setting("", resumable=True,
                                 help="also log to this Weights & Biases project (pip install 'moeut[wandb]'; files "
                                      "in RUN/wandb/; WANDB_MODE=offline works)")
    wandb_run_name: str = setting("", resumable=True, help="W&B run name (default: W&B's)")
    wandb_entity: str = setting("", resumable=True, help="W&B entity, a team or user (default: yours)")

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
        if self.optimizer == "muon":
            self.muon_lr = self.lr if self.muon_lr is None else self.muon_lr
            self.muon_weight_decay = self.weight_decay if self.muon_weight_decay is None else self.muon_weight_decay
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
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {list(OPTIMIZERS)}")
        if self.optimizer == "muon":
            need(self.muon_lr > 0, "muon_lr", "must be positive")
            need(self.muon_weight_decay >= 0, "muon_weight_decay", "must be >= 0")
            need(0 <= self.muon_momentum < 1, "muon_momentum", "must be in [0, 1)")
            need(self.muon_lr_scale in LR_SCALES, "muon_lr_scale", f"must be one of {list(LR_SCALES)}")
        else:
            for name in ("muon_lr", "muon_weight_decay"):
                need(getattr(self, name) is None, name, "is a setting of --optimizer muon")
        need(0 <= self.final_lr_ratio <= 1, "final_lr_ratio", "must be in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        for name in ("eval_every", "eval_batches", "save_every", "save_every_minutes", "log_every", "routing_every",
                     "residual_norm_every", "keep_checkpoints"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.precision in PRECISIONS, "precision", 'must be "auto", "bf16" or "fp32"')
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
        if self.depth_sampling:
            try:
                DepthSampler.parse(self.depth_sampling)
            except DepthSamplingError as e:
                raise ConfigError(f"TrainConfig.depth_sampling: {e}") from None
            need(self.model_config().arch != "dense", "depth_sampling",
                 "the dense baseline shares no layers, so its depth cannot change; leave it empty")
        if self.data:  # the format of "DIR[:WEIGHT]" entries; the directories are opened by the trainer
            try:
                parse_sources(self.data)
            except MixtureSpecError as e:
                raise ConfigError(f"TrainConfig.data={self.data!r}: {e}") from None
        self.model_config()  # validates preset and overrides

    def depth_sampler(self) -> DepthSampler | None:
        """The per-step depth law (None: the trained depth every step)."""
        return DepthSampler.parse(self.depth_sampling) if self.depth_sampling else None

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
            default = field_default(f)
            out[f.name] = list(default) if isinstance(default, tuple) else default
        return out

    @classmethod
    def resumable_fields(cls) -> tuple[str, ...]:
        """The settings that may change when a run resumes: they change nothing the run computes."""
        return tuple(f.name for f, s in settings_of(cls) if s.resumable)

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
