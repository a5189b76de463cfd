"""Sweeps (paper, App. A.5 and the ablations): train and evaluate a list of configurations on the same data
with the same token budget (steps × batch × context), one run directory per configuration, then a table
and a plot of validation perplexity.

Resumable: a configuration whose run directory already holds a finished run (``summary.json`` at the
requested step) is not trained again; an interrupted one resumes from its newest checkpoint.

Built-in sweeps (tiny scale, around ``moeut-tiny``: d_model 128, 4 applications of G = 2 layers,
N_E = 32 experts of d_expert = 128, K = 4):

* ``expert-size-k``: d_expert × K constant (= 512) and N_E · d_expert constant (= 4096), so parameters
  and MACs stay fixed: 64×8, 128×4, 256×2, 512×1 (the paper's 128×16 … 1024×2 at 244M, scaled down).
* ``k``: K ∈ {2, 4, 6} at d_expert = 128 (the paper's K ∈ {8, 16, 24} relative to its default 16).
* ``group-size``: G ∈ {1, 2, 4} (4 applications; more distinct layers = more parameters).
* ``norm-placement``: peri-LN (MoEUT), pre-LN, post-LN — needs the ``norm_placement`` ModelConfig field.
* ``cpu-study``: what shared layers make possible, at the demo's scale — moeut-tiny with the paper's
  per-sequence balancing and with ``entropy_reg_mode="batch"``, moeut-tiny-act, and the baselines
  (sigma-moe-tiny, sut-tiny, dense-tiny), each at lr 2e-3 (the demo's), 4e-3 and 8e-3 (every model is
  compared at its own best learning rate: the ``best`` table, which flags a best rate at the edge of the
  range). The grid starts at the demo's rate because at this short budget larger rates did better. ``global`` balancing is not a separate row: in one process
  it is exactly ``batch`` (it differs only across data-parallel ranks).
* ``adaptive-depth``: adaptive depth at the demo's scale — moeut-tiny (2 group applications), moeut-tiny trained
  with a sampled depth (uniform 1–3: the same mean compute), moeut-tiny-adaptive (halted tokens skip their work,
  at most 4 applications) with a budget of 2 and of 1.5, each at lr 4e-3 and 8e-3, and dense-tiny at its best
  cpu-study rate (4e-3) for reference. The tables give the depth tokens ran and the MACs per token that ran.
* ``scale-tiny`` / ``scale-small``: the two-scale study (:data:`SCALE_STUDY`) — MoEUT, σ-MoE and dense at equal
  parameters with AdamW at three or more learning rates, MoEUT and dense with Muon, moeut-tiny with loss-free
  balancing; run both with ``--steps 500``.

A sweep file (JSON, or YAML with PyYAML installed) is either a list of runs or
``{"runs": [...], "train": {...}}``; each run is ``{"name": ..., "preset": ..., "model": {ModelConfig
overrides}, "train": {TrainConfig overrides}, "group": ...}``. Runs may not change steps, batch size or
context. Runs with the same ``group`` (e.g. one model at several learning rates) are also summarised by
their best validation perplexity (:func:`best_of_groups`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moeut.analysis.common import AnalysisError
from moeut.model import ModelConfig
from moeut.model.accounting import model_stats
from moeut.run import list_checkpoints
from moeut.run.layout import METRICS, MODEL_CONFIG, SUMMARY, TRAIN_CONFIG
from moeut.train import TrainConfig, TrainingError
from moeut.train import train as train_run
from moeut.fileio import atomic_write_json
from moeut.report import format_table, pyplot, save_figure

_BUDGET_FIELDS = ("steps", "batch_size", "seq_len")


@dataclass
class SweepEntry:
    name: str
    preset: str = "moeut-tiny"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    group: str | None = None  # runs of one group are compared by their best validation perplexity

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepEntry":
        unknown = sorted(set(d) - {"name", "preset", "model", "train", "group"})
        if unknown or "name" not in d:
            raise AnalysisError("a sweep run needs 'name' and may have 'preset', 'model', 'train', 'group'; got keys "
                                f"{sorted(d)}")
        return cls(name=str(d["name"]), preset=d.get("preset", "moeut-tiny"), model=dict(d.get("model", {})),
                   train=dict(d.get("train", {})), group=None if d.get("group") is None else str(d["group"]))


def _has_model_field(name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(ModelConfig)}


def builtin_sweep(name: str, preset: str = "moeut-tiny") -> list[SweepEntry]:
    if name == "expert-size-k":
        return [SweepEntry(f"de{de}-k{k}", preset, {"ff_expert_size": de, "ff_k": k, "ff_n_experts": ne})
                for de, k, ne in [(64, 8, 64), (128, 4, 32), (256, 2, 16), (512, 1, 8)]]
    if name == "k":
        return [SweepEntry(f"k{k}", preset, {"ff_k": k}) for k in (2, 4, 6)]
    if name == "group-size":
        return [SweepEntry(f"g{g}", preset, {"group_size": g}) for g in (1, 2, 4)]
    if name == "norm-placement":
        if not _has_model_field("norm_placement"):
            raise AnalysisError("the norm-placement sweep needs ModelConfig.norm_placement (the LayerNorm placement "
                                "ablation), which this version of moeut does not have")
        return [SweepEntry(f"{p}-ln", preset, {"norm_placement": p}) for p in ("peri", "pre", "post")]
    if name == "cpu-study":
        models = [("moeut-tiny", "moeut-tiny", {}), ("moeut-tiny-batch", "moeut-tiny", {"entropy_reg_mode": "batch"}),
                  ("moeut-tiny-act", "moeut-tiny-act", {}), ("sigma-moe-tiny", "sigma-moe-tiny", {}),
                  ("sut-tiny", "sut-tiny", {}), ("dense-tiny", "dense-tiny", {})]
        return [SweepEntry(f"{label}-lr{lr}", p, over, {"lr": float(lr)}, group=label)
                for label, p, over in models for lr in STUDY_LRS]
    if name == "adaptive-depth":
        models = [("moeut-tiny", "moeut-tiny", {}, {}),
                  ("moeut-tiny-sampled", "moeut-tiny", {}, {"depth_sampling": "uniform:1-3"}),
                  ("adaptive-t2", "moeut-tiny-adaptive", {}, {}),
                  ("adaptive-t1.5", "moeut-tiny-adaptive", {"act_target_depth": 1.5}, {})]
        runs = [SweepEntry(f"{label}-lr{lr}", p, over, {**train, "lr": float(lr)}, group=label)
                for label, p, over, train in models for lr in ADAPTIVE_LRS]
        return runs + [SweepEntry("dense-tiny-lr4e-3", "dense-tiny", {}, {"lr": 4e-3}, group="dense-tiny")]
    if name in SCALE_STUDY:
        return scale_sweep(name)
    raise AnalysisError(f"unknown sweep {name!r}: built-in sweeps are {', '.join(BUILTIN_SWEEPS)}, or give a "
                        "JSON/YAML file")


# The two-scale study: at each scale MoEUT, σ-MoE and dense at equal parameters, each with AdamW at three peak
# learning rates, MoEUT and dense with Muon at two, and (tiny) MoEUT with loss-free balancing at two; bf16 autocast
# (the paper's recipe), warmup 50 steps. Both scales are run with the same budget, 500 steps × 16 × 256 = 2.05M
# tokens (2.8 epochs of the built-in corpus): at twice that, moeut-small memorises the 741K training tokens
# (validation perplexity 134 at step 600, 151 at step 1000; benchmarks/results/overfit-small-1000-steps).
# The grids bracket each model's best where earlier runs said where it was (the cpu-study's: MoEUT best at the
# top of 2e-3..8e-3, so its tiny grid moves up; dense best at 4e-3, inside). At tiny both Muon models were best
# at the top of 4e-3, 8e-3, so 1.6e-2 was added. dense-small's AdamW grid sits lower (at step 300: 243.8 at 2e-3,
# 290.7 at 4e-3), and 5e-4 was added when 1e-3 came out best (184.22); the small Muon grids start at AdamW's best
# MoEUT rate and include tiny Muon's best, 8e-3; moeut-small with Muon came out best at 4e-3 (119.42; 8e-3
# 120.69), the bottom of that grid, so 2e-3 was added; dense-small with Muon at the top (8e-3 121.12, 4e-3
# 121.16), so 1.6e-2 was added; moeut-small and sigma-moe-small with AdamW at the bottom (2e-3 118.83 and 121.29,
# 4e-3 121.00 and 124.11), so 1e-3 was added to both.
SCALE_STUDY: dict[str, dict[str, Any]] = {
    "scale-tiny": {
        "warmup_steps": 50, "eval_every": 100,
        "adamw": [("moeut-tiny", ("4e-3", "8e-3", "1.6e-2")), ("sigma-moe-tiny", ("2e-3", "4e-3", "8e-3")),
                  ("dense-tiny", ("2e-3", "4e-3", "8e-3"))],
        "muon": [("moeut-tiny", ("4e-3", "8e-3", "1.6e-2")), ("dense-tiny", ("4e-3", "8e-3", "1.6e-2"))],
        "loss_free": [("moeut-tiny", ("4e-3", "8e-3"))],
    },
    "scale-small": {
        "warmup_steps": 50, "eval_every": 100,
        "adamw": [("moeut-small", ("1e-3", "2e-3", "4e-3", "8e-3")),
                  ("sigma-moe-small", ("1e-3", "2e-3", "4e-3", "8e-3")),
                  ("dense-small", ("5e-4", "1e-3", "2e-3", "4e-3"))],
        "muon": [("moeut-small", ("2e-3", "4e-3", "8e-3")), ("dense-small", ("4e-3", "8e-3", "1.6e-2"))],
        "loss_free": [],
    },
}


def scale_sweep(name: str) -> list[SweepEntry]:
    """One scale of the two-scale study (:data:`SCALE_STUDY`): runs named ``<model>[-muon|-lossfree]-lr<lr>``,
    grouped by model and variant so that the best-lr table compares each at its best rate."""
    spec = SCALE_STUDY[name]
    base = {"precision": "bf16", "warmup_steps": spec["warmup_steps"], "eval_every": spec["eval_every"]}
    variants = (("adamw", "", {}, {}), ("muon", "-muon", {}, {"optimizer": "muon"}),
                ("loss_free", "-lossfree", {"balancing": "loss_free"}, {}))
    return [SweepEntry(f"{preset}{suffix}-lr{lr}", preset, dict(model), {**base, **train, "lr": float(lr)},
                       group=preset + suffix)
            for variant, suffix, model, train in variants for preset, lrs in spec[variant] for lr in lrs]


BUILTIN_SWEEPS = ("expert-size-k", "k", "group-size", "norm-placement", "cpu-study", "adaptive-depth", *SCALE_STUDY)
STUDY_LRS = ("2e-3", "4e-3", "8e-3")  # the cpu-study's learning rates (run names keep this spelling)
ADAPTIVE_LRS = ("4e-3", "8e-3")  # the adaptive-depth study's: the best two of cpu-study for moeut-tiny


def load_sweep(spec: str, preset: str = "moeut-tiny") -> tuple[list[SweepEntry], dict[str, Any]]:
    """A built-in sweep name or a sweep file → (runs, shared TrainConfig overrides)."""
    path = Path(spec)
    if not path.is_file():
        if spec.endswith((".json", ".yaml", ".yml")):
            raise FileNotFoundError(f"sweep file {path} does not exist")
        return builtin_sweep(spec, preset), {}
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # optional: only YAML sweep files need it
        except ImportError:
            raise ImportError("YAML sweep files need PyYAML (pip install pyyaml), or write the sweep as JSON") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AnalysisError(f"sweep file {path} is not valid JSON: {e}") from None
    shared: dict[str, Any] = {}
    if isinstance(data, dict):
        shared = dict(data.get("train", {}))
        data = data.get("runs")
    if not isinstance(data, list) or not data:
        raise AnalysisError(f"sweep file {path}: expected a non-empty list of runs (or {{'runs': [...]}})")
    entries = [SweepEntry.from_dict(d) for d in data]
    return entries, shared


@dataclass
class SweepRow:
    name: str
    preset: str
    model: dict[str, Any]
    run_dir: str
    status: str  # "trained", "resumed", "done earlier"
    params: int
    active_params: int
    macs_per_token: int
    tokens: int
    val_ppl: float | None
    wall_time_s: float | None
    mean_depth: float | None = None  # ACT: expected (group) applications per token, the last training step's
    lr: float | None = None
    group: str | None = None
    tok_per_s: float | None = None  # training throughput of the run (summary.json)
    # MoEUT-ACT: the group applications tokens ran and the forward MACs per token that ran, the last step's
    executed_depth: float | None = None
    executed_macs_per_token: float | None = None


def _finished(run_dir: Path, steps: int) -> dict[str, Any] | None:
    p = run_dir / SUMMARY
    if not p.exists():
        return None
    try:
        s = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    return s if s.get("step") == steps and s.get("val_ppl") is not None else None


def _check_same_config(run_dir: Path, cfg: Any) -> None:
    """A run directory left by another sweep with the same run name is an error, not a silent reuse."""
    p = run_dir / TRAIN_CONFIG
    if not p.exists():
        return
    try:
        old = json.loads(p.read_text())
    except json.JSONDecodeError:
        return
    new = cfg.to_dict()
    keys = ("preset", "model_overrides", "batch_size", "seq_len", "lr", "seed", "warmup_steps")
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        raise AnalysisError(f"{run_dir} holds a run with different settings ({', '.join(diff)}): choose another --out "
                            "for this sweep or delete that directory")


def run_sweep(entries: Sequence[SweepEntry], data: str | Path, out: str | Path, *, steps: int = 200,
              batch_size: int = 16, seq_len: int | None = 256, lr: float = 2e-3, train: dict[str, Any] | None = None,
              show_progress: bool = True, log=print, report_only: bool = False) -> list[SweepRow]:
    """Train (or resume, or skip when finished) every entry into ``out/<name>``; the rows of the table.
    ``report_only``: train nothing; unfinished runs are rows with status "not run" (no perplexity)."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise AnalysisError(f"sweep run names must be unique, got {names}")
    out = Path(out)
    shared = {"lr": lr, "warmup_steps": min(50, steps // 10), "eval_every": 0, "save_every": max(1, steps // 4),
              "log_every": max(1, steps // 50), **(train or {})}
    cfgs = []
    for e in entries:
        bad = sorted(set(e.train) & set(_BUDGET_FIELDS))
        if bad:
            raise AnalysisError(f"sweep run {e.name!r} changes {bad}: every run of a sweep has the same token budget "
                                "(set --steps/--batch-size/--seq-len for the whole sweep)")
        d = {**shared, **e.train, "preset": e.preset, "model_overrides": e.model, "data": str(data),
             "out": str(out / e.name), "steps": steps, "batch_size": batch_size}
        if seq_len is not None:
            d["seq_len"] = seq_len
        cfgs.append(TrainConfig.from_dict(d))  # validates every configuration before training any
    rows = []
    for i, (e, cfg) in enumerate(zip(entries, cfgs)):
        run_dir = Path(cfg.out)
        _check_same_config(run_dir, cfg)
        summary = _finished(run_dir, cfg.steps)
        if summary is not None:
            status = "done earlier"
            log(f"[{i + 1}/{len(entries)}] {e.name}: finished earlier (val ppl {summary['val_ppl']:.2f}), skipped")
        elif report_only:
            status, summary = "not run", {}
            log(f"[{i + 1}/{len(entries)}] {e.name}: not finished, not trained (--report-only)")
        else:
            status = "resumed" if bool(list_checkpoints(run_dir)) else "trained"
            if status == "resumed":
                log(f"[{i + 1}/{len(entries)}] {e.name}: resuming from its newest checkpoint (a different budget "
                    f"reshapes the learning-rate schedule from there on)")
            log(f"[{i + 1}/{len(entries)}] {e.name}: {cfg.preset} + {e.model or 'no overrides'}, "
                f"{cfg.steps * cfg.batch_size * cfg.seq_len:,} tokens")
            try:
                # a longer budget than an earlier call's extends its runs: that reshapes their cosine from the
                # checkpoint on (the trainer's --allow-schedule-change), which the log line says
                summary = train_run(cfg, resume=True, show_progress=show_progress, allow_schedule_change=True)
            except TrainingError as err:
                raise AnalysisError(f"sweep run {e.name!r} ({run_dir}): {err}") from err
        saved = run_dir / MODEL_CONFIG
        model_cfg = ModelConfig.from_saved(saved.read_text(), source=str(saved)) if summary else cfg.model_config()
        stats = model_stats(model_cfg, context=cfg.seq_len)
        rows.append(SweepRow(name=e.name, preset=e.preset, model=e.model, run_dir=str(run_dir), status=status,
                             params=stats["params_total"], active_params=stats["active_params_per_token"],
                             macs_per_token=stats["macs_per_token"], tokens=summary.get("tokens_seen") or 0,
                             val_ppl=summary.get("val_ppl"), wall_time_s=summary.get("wall_time_s"),
                             mean_depth=summary.get("act_mean_depth"), lr=cfg.lr, group=e.group,
                             tok_per_s=summary.get("tok_per_s"), executed_depth=summary.get("act_executed_depth"),
                             executed_macs_per_token=summary.get("act_executed_macs_per_token")))
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: Sequence[SweepRow]) -> str:
    body = [[r.name, ", ".join(f"{k}={v}" for k, v in r.model.items()) or "-", _fmt(r.lr, "g"),
             f"{r.params / 1e6:.2f}M", f"{r.active_params / 1e6:.2f}M", f"{_ran_macs(r) / 1e6:.2f}M",
             f"{r.tokens:,}", r.val_ppl, _fmt(r.mean_depth, ".2f"), _fmt(r.executed_depth, ".2f"),
             _fmt(r.tok_per_s, ",.0f"), r.wall_time_s, r.status] for r in rows]
    return format_table(["run", "overrides", "lr", "params", "active/tok", "MACs/tok", "tokens", "val ppl",
                         "ACT depth", "ran depth", "tok/s", "train s", "status"], body, ".2f")


def _ran_macs(r: SweepRow) -> float:
    """Forward MACs per token: as run (MoEUT-ACT whose halted tokens skip: the last step's) or at full depth."""
    return r.macs_per_token if r.executed_macs_per_token is None else r.executed_macs_per_token


def best_of_groups(rows: Sequence[SweepRow]) -> list[dict[str, Any]]:
    """Per group (runs with the same ``group``, in order of first appearance): the run with the lowest
    validation perplexity, and every run's perplexity by learning rate."""
    groups: dict[str, list[SweepRow]] = {}
    for r in rows:
        if r.group is not None:
            groups.setdefault(r.group, []).append(r)
    out = []
    for g, rs in groups.items():
        done = [r for r in rs if r.val_ppl is not None]
        if not done:
            continue
        best = min(done, key=lambda r: r.val_ppl)
        out.append({"group": g, "best_run": best.name, "best_lr": best.lr, "val_ppl": best.val_ppl,
                    "mean_depth": best.mean_depth, "tok_per_s": best.tok_per_s, "params": best.params,
                    "executed_depth": best.executed_depth, "macs_per_token": _ran_macs(best),
                    "ppl_by_lr": {format(r.lr, "g"): r.val_ppl for r in done},
                    # the best learning rate is the largest or smallest tried: a wider range might do better
                    # (with two rates that is always so, and says as much; with one there is no grid to speak of)
                    "best_at_edge": len(done) > 1 and best.lr in (min(r.lr for r in done), max(r.lr for r in done))})
    return out


def _grid_flag(best: dict[str, Any]) -> str:
    if len(best["ppl_by_lr"]) == 1:
        return " (only rate)"
    return " (edge)" if best["best_at_edge"] else ""


def best_table(best: Sequence[dict[str, Any]]) -> str:
    lrs = sorted({lr for b in best for lr in b["ppl_by_lr"]}, key=float)
    body = [[b["group"], f"{b['params'] / 1e6:.2f}M", format(b["best_lr"], "g") + _grid_flag(b),
             b["val_ppl"], *[b["ppl_by_lr"].get(lr) for lr in lrs], _fmt(b["mean_depth"], ".2f"),
             _fmt(b.get("executed_depth"), ".2f"), f"{b.get('macs_per_token', 0) / 1e6:.2f}M",
             _fmt(b["tok_per_s"], ",.0f")] for b in best]
    return format_table(["model", "params", "best lr", "val ppl", *[f"ppl @ {lr}" for lr in lrs], "ACT depth",
                         "ran depth", "MACs/tok", "tok/s"], body, ".2f")


def _curve(run_dir: Path) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    p = run_dir / METRICS
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "train_loss" in d and "tokens_seen" in d:
                xs.append(d["tokens_seen"])
                ys.append(d["train_loss"])
    return xs, ys


def plot(rows: Sequence[SweepRow], path: str | Path, title: str = "sweep") -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = [r.name for r in rows]
    ppl = [r.val_ppl if r.val_ppl is not None else float("nan") for r in rows]
    bars = axes[0].bar(range(len(rows)), ppl, color="tab:blue")
    for b, v in zip(bars, ppl):
        axes[0].annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                         fontsize=8)
    axes[0].set_xticks(range(len(rows)))
    axes[0].set_xticklabels(names, rotation=20, fontsize=8)
    axes[0].set_ylabel("validation perplexity")
    lo = min((v for v in ppl if v == v), default=0)
    axes[0].set_ylim(lo * 0.9, max((v for v in ppl if v == v), default=1) * 1.05)
    tokens = rows[0].tokens if rows else 0
    axes[0].set_title(f"{title}: {tokens:,} tokens per run")
    for r in rows:
        xs, ys = _curve(Path(r.run_dir))
        if xs:
            axes[1].plot(xs, ys, label=r.name, lw=1)
    axes[1].set_xlabel("tokens")
    axes[1].set_ylabel("training loss")
    axes[1].set_title("training curves")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return save_figure(fig, path)


def select(entries: Sequence[SweepEntry], only: Sequence[str]) -> list[SweepEntry]:
    """The runs whose name matches one of the shell patterns ``only`` (all runs when it is empty)."""
    if not only:
        return list(entries)
    chosen = [e for e in entries if any(fnmatch.fnmatchcase(e.name, pat) for pat in only)]
    if not chosen:
        raise AnalysisError(f"--only {' '.join(only)} matches none of the sweep's runs: "
                            f"{', '.join(e.name for e in entries)}")
    return chosen


def run(spec: str, data: str | Path, out: str | Path, *, preset: str = "moeut-tiny", steps: int = 200,
        batch_size: int = 16, seq_len: int | None = 256, lr: float = 2e-3, show_progress: bool = True,
        report_only: bool = False, only: Sequence[str] = ()) -> dict[str, Any]:
    """Train the sweep's runs (those matching ``only``, when given) and write the table, ``sweep.json`` and
    ``sweep.png`` into ``out`` (with ``only``: ``sweep-only.json`` / ``sweep-only.png``, so that several processes
    sharing one ``out`` each train a part without overwriting the whole sweep's report)."""
    entries, shared = load_sweep(spec, preset)
    entries = select(entries, only)
    out = Path(out)
    t0 = time.perf_counter()
    rows = run_sweep(entries, data, out, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, train=shared,
                     show_progress=show_progress, report_only=report_only)
    title = Path(spec).stem if Path(spec).is_file() else spec
    best = best_of_groups(rows)
    stem = "sweep-only" if only else "sweep"
    j = atomic_write_json(out / f"{stem}.json", {"analysis": "sweep", "sweep": spec, "data": str(data), "steps": steps,
                                        "batch_size": batch_size, "seq_len": seq_len,
                                        "token_budget": rows[0].tokens if rows else 0,
                                        "wall_time_s": time.perf_counter() - t0, "rows": [asdict(r) for r in rows],
                                        "best": best})
    png = plot(rows, out / f"{stem}.png", title)
    text = table(rows) + (f"\n\nbest learning rate of each model:\n{best_table(best)}" if best else "")
    return {"rows": rows, "table": text, "best": best, "files": [j, png]}
