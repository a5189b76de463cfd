"""The issue-17 study is expressible as a sweep file: presets, ModelConfig overrides (entropy_reg_mode) and a
learning rate per run, all validated before anything trains."""

from __future__ import annotations

import json

import pytest

from moeut.analysis import AnalysisError, load_sweep
from moeut.model import ModelConfig
from moeut.train import TrainConfig


def test_study_sweep_file_gives_one_valid_config_per_run(tmp_path):
    runs = [{"name": f"{p}-{m}-lr{lr:g}", "preset": p, "model": {} if m == "seq" else {"entropy_reg_mode": m},
             "train": {"lr": lr}}
            for p, m in (("moeut-tiny", "seq"), ("moeut-tiny", "batch"), ("moeut-tiny", "global"), ("dense-tiny", "seq"),
                         ("moeut-tiny-act", "seq"))
            for lr in (1e-3, 2e-3, 4e-3)]
    spec = tmp_path / "study.json"
    spec.write_text(json.dumps({"runs": runs, "train": {"eval_batches": 8, "seed": 0}}))
    entries, shared = load_sweep(str(spec))
    assert len(entries) == 15 and shared == {"eval_batches": 8, "seed": 0}
    for e in entries:
        cfg = TrainConfig.from_dict({**shared, **e.train, "preset": e.preset, "model_overrides": e.model,
                                     "data": str(tmp_path), "out": str(tmp_path / e.name), "steps": 500,
                                     "batch_size": 16, "seq_len": 256})
        model = ModelConfig.from_name(cfg.preset, **cfg.model_overrides)
        assert cfg.lr == e.train["lr"]
        assert model.entropy_reg_mode == e.model.get("entropy_reg_mode", "sequence")
        assert model.act == (e.preset == "moeut-tiny-act")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "x", "preset": "moeut-tiny", "train": {"steps": 3}}]))
    entries, _ = load_sweep(str(bad))
    from moeut.analysis.sweep import run_sweep

    with pytest.raises(AnalysisError, match="token budget"):
        run_sweep(entries, tmp_path, tmp_path / "o")


def test_builtin_cpu_study_runs_every_model_at_three_learning_rates():
    entries, _ = load_sweep("cpu-study")
    groups = {}
    for e in entries:
        groups.setdefault(e.group, []).append(e)
        assert e.name == f"{e.group}-lr{e.train['lr']:.0e}".replace("e-0", "e-")
    assert list(groups) == ["moeut-tiny", "moeut-tiny-batch", "moeut-tiny-act", "sigma-moe-tiny", "sut-tiny",
                            "dense-tiny"]
    for g, es in groups.items():
        assert sorted(e.train["lr"] for e in es) == [2e-3, 4e-3, 8e-3], g
    assert {e.model.get("entropy_reg_mode") for e in groups["moeut-tiny-batch"]} == {"batch"}
    assert all(ModelConfig.from_name(e.preset, **e.model).act for e in groups["moeut-tiny-act"])


def test_best_of_groups_picks_each_models_lowest_perplexity_and_flags_an_edge():
    from moeut.analysis.sweep import SweepRow, best_of_groups, best_table

    def row(name, group, lr, ppl, depth=None):
        return SweepRow(name=name, preset="p", model={}, run_dir="", status="trained", params=4_500_000,
                        active_params=1, macs_per_token=1, tokens=10, val_ppl=ppl, wall_time_s=1.0,
                        mean_depth=depth, lr=lr, group=group, tok_per_s=100.0)

    rows = [row("a1", "a", 1e-3, 150.0), row("a2", "a", 2e-3, 140.0), row("a4", "a", 4e-3, 145.0),
            row("b1", "b", 1e-3, 240.0), row("b2", "b", 2e-3, 190.0), row("b4", "b", 4e-3, 175.0, 1.5),
            row("solo", None, 2e-3, 100.0), row("c1", "c", 1e-3, None),
            row("d4", "d", 4e-3, 130.0), row("d8", "d", 8e-3, 129.0), row("e4", "e", 4e-3, 120.0)]
    best = best_of_groups(rows)
    assert [(b["group"], b["best_run"], b["best_lr"], b["best_at_edge"]) for b in best] == [
        ("a", "a2", 2e-3, False), ("b", "b4", 4e-3, True), ("d", "d8", 8e-3, True), ("e", "e4", 4e-3, False)]
    assert best[1]["ppl_by_lr"] == {"0.001": 240.0, "0.002": 190.0, "0.004": 175.0} and best[1]["mean_depth"] == 1.5
    text = best_table(best)
    assert "0.004 (edge)" in text and "175.00" in text and "0.008 (edge)" in text and "0.004 (only rate)" in text
    assert "0.002 (" not in text


def test_report_only_trains_nothing_and_lists_unfinished_runs(tmp_path):
    from moeut.analysis.sweep import run_sweep

    entries, _ = load_sweep("cpu-study")
    rows = run_sweep(entries[:2], tmp_path / "data", tmp_path / "out", steps=500, report_only=True, log=lambda m: None)
    assert [r.status for r in rows] == ["not run", "not run"]
    assert all(r.val_ppl is None and r.tokens == 0 and r.params > 4_000_000 for r in rows)
    assert not (tmp_path / "out").exists()


def test_builtin_adaptive_depth_study_validates_and_reports_the_depth_that_ran(tmp_path):
    from moeut.analysis.sweep import SweepRow, best_of_groups, best_table, run_sweep

    entries, _ = load_sweep("adaptive-depth")
    groups = {}
    for e in entries:
        groups.setdefault(e.group, []).append(e)
    assert list(groups) == ["moeut-tiny", "moeut-tiny-sampled", "adaptive-t2", "adaptive-t1.5", "dense-tiny"]
    for g in ("moeut-tiny", "moeut-tiny-sampled", "adaptive-t2", "adaptive-t1.5"):
        assert sorted(e.train["lr"] for e in groups[g]) == [4e-3, 8e-3], g
    targets = {g: ModelConfig.from_name(groups[g][0].preset, **groups[g][0].model).act_target_depth
               for g in ("adaptive-t2", "adaptive-t1.5")}
    assert targets == {"adaptive-t2": 2.0, "adaptive-t1.5": 1.5}
    assert {e.train.get("depth_sampling") for e in groups["moeut-tiny-sampled"]} == {"uniform:1-3"}
    rows = run_sweep(entries, tmp_path / "data", tmp_path / "out", steps=500, report_only=True, log=lambda m: None)
    assert len(rows) == 9 and all(r.status == "not run" for r in rows)  # every run's settings are valid

    ran = SweepRow(name="a", preset="moeut-tiny-adaptive", model={}, run_dir="", status="trained", params=1,
                   active_params=1, macs_per_token=3_500_000, tokens=10, val_ppl=130.0, wall_time_s=1.0, lr=4e-3,
                   group="g", executed_depth=2.02, executed_macs_per_token=2_380_000)
    text = best_table(best_of_groups([ran]))
    assert "2.02" in text and "2.38M" in text  # the depth and MACs that ran, not the maximum's 3.50M


@pytest.mark.parametrize("sweep, scale, n_runs", [("scale-tiny", "tiny", 17), ("scale-small", "small", 18)])
def test_two_scale_study_runs_three_adamw_rates_and_two_muon_rates_per_model(tmp_path, sweep, scale, n_runs):
    from moeut.analysis.sweep import run_sweep
    from moeut.model.accounting import model_stats

    entries, _ = load_sweep(sweep)
    groups = {}
    for e in entries:
        groups.setdefault(e.group, []).append(e)
        assert e.train["precision"] == "bf16" and e.name.startswith(e.group + "-lr")
    base = [f"moeut-{scale}", f"sigma-moe-{scale}", f"dense-{scale}"]
    muon = [f"moeut-{scale}-muon", f"dense-{scale}-muon"]
    assert list(groups) == base + muon + ([f"moeut-{scale}-lossfree"] if scale == "tiny" else [])
    assert all(len(groups[g]) >= 3 for g in base) and all(len(groups[g]) >= 2 for g in muon)
    assert {e.train.get("optimizer", "adamw") for g in muon for e in groups[g]} == {"muon"}
    assert {e.train.get("optimizer", "adamw") for g in base for e in groups[g]} == {"adamw"}
    if scale == "tiny":
        assert {ModelConfig.from_name(e.preset, **e.model).balancing for e in groups["moeut-tiny-lossfree"]} == {
            "loss_free"}
    # the models of one scale have the same parameter count (within 3 %)
    params = [model_stats(ModelConfig.from_name(g))["params_total"] for g in base]
    assert max(params) / min(params) < 1.03
    steps = 500  # both scales: the built-in corpus holds 741K tokens, and moeut-small memorises it at 1000 steps
    rows = run_sweep(entries, tmp_path / "data", tmp_path / "out", steps=steps, report_only=True, log=lambda m: None)
    assert len(rows) == n_runs and all(r.status == "not run" for r in rows)  # every run's settings are valid
    # warmup is 10 % of the budget the study is run with
    assert {e.train["warmup_steps"] for e in entries} == {steps // 10}


def test_only_selects_runs_by_pattern_and_names_the_runs_when_nothing_matches(tmp_path):
    from moeut.analysis.sweep import select

    entries, _ = load_sweep("scale-tiny")
    assert [e.name for e in select(entries, ["dense-tiny-lr*"])] == [
        "dense-tiny-lr2e-3", "dense-tiny-lr4e-3", "dense-tiny-lr8e-3"]
    assert [e.name for e in select(entries, ["*-muon-lr8e-3", "moeut-tiny-lr4e-3"])] == [
        "moeut-tiny-lr4e-3", "moeut-tiny-muon-lr8e-3", "dense-tiny-muon-lr8e-3"]
    assert select(entries, []) == entries
    with pytest.raises(AnalysisError, match="matches none.*moeut-tiny-lr4e-3"):
        select(entries, ["nope-*"])


def test_the_seed_repeat_sweep_file_repeats_a_study_run_with_another_seed(tmp_path):
    """benchmarks/sweeps/scale-small-seeds.json: moeut-small's best Muon run of the two-scale study, seed 1 — a
    valid configuration that differs from the study's run of the same name in the seed only."""
    from pathlib import Path

    from moeut.analysis.sweep import run_sweep

    spec = Path(__file__).resolve().parents[2] / "benchmarks" / "sweeps" / "scale-small-seeds.json"
    entries, shared = load_sweep(str(spec))
    study = {e.name: e for e in load_sweep("scale-small")[0]}
    assert shared["seed"] == 1
    for e in entries:
        twin = study[e.name.removesuffix("-seed1")]
        assert e.preset == twin.preset and {**shared, **e.train, "seed": 0} == {**twin.train, "seed": 0}
    rows = run_sweep(entries, tmp_path / "data", tmp_path / "out", steps=500, train=shared, report_only=True,
                     log=lambda m: None)
    assert entries and [r.status for r in rows] == ["not run"] * len(entries)
