"""The `moeut analyze` commands on tiny trained runs: exit 0, a table, JSON and non-empty PNG files; sweeps
resume; wall clock and compute rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeut.cli import main
from tests.analysis.conftest import TINY_MOEUT, assert_png


# figure sizes of the plot code for the tiny MoEUT (G = 2 shared layers, R = 2 repeats); layer-similarity is
# saved with bbox_inches="tight"
@pytest.mark.parametrize("analysis,stem,figsize", [("expert-usage", "expert_usage_ffn", (10, 0.5 + 1.4 * 2)),
                                                   ("layer-similarity", "layer_similarity_ffn", (1.5 + 3.2 * 2, 3.4)),
                                                   ("token-diversity", "token_diversity_ffn", (12, 4))])
def test_routing_analysis_cli_writes_table_json_and_png(tiny_runs, tiny_data, tmp_path, capsys, analysis, stem,
                                                        figsize):
    out = tmp_path / "out"
    rc = main(["analyze", analysis, "--checkpoint", str(tiny_runs["moeut"]), "--data", str(tiny_data), "--out",
               str(out), "--batches", "2", "--batch-size", "2", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "on 128 tokens" in text and "L1" in text  # 2 batches × 2 × 32 tokens; both shared layers reported
    data = json.loads((out / f"{stem}.json").read_text())
    assert data["analysis"] == analysis
    assert_png(out / f"{stem}.png", figsize, tight=analysis == "layer-similarity")


def test_residual_norm_cli_compares_moeut_and_dense_on_the_runs_own_validation_split(tiny_runs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["analyze", "residual-norm", "--checkpoint", str(tiny_runs["moeut"]), "--compare",
               str(tiny_runs["dense"]), "--out", str(out), "--max-tokens", "64", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "moeut ‖Δ‖" in text and "dense ‖Δ‖" in text and "final" in text
    res = json.loads((out / "residual_norm.json").read_text())["results"]
    assert [r["arch"] for r in res] == ["moeut", "dense"]
    assert all(r["tokens"] == 64 and len(r["update_norm"]) == 4 and len(r["residual_norm"]) == 5 for r in res)
    assert_png(out / "residual_norm.png", (13, 3.8))


def test_residual_norm_cli_reads_text_files_with_the_runs_tokenizer(tiny_runs, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("the cat sat on the mat and the dog ran to the park. " * 20)
    out = tmp_path / "out"
    assert main(["analyze", "residual-norm", "--checkpoint", str(tiny_runs["moeut"]), "--data", str(text),
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "residual_norm.json").read_text())["results"][0]["tokens"] > 0


def test_depth_cli_writes_the_curve_table_json_and_png(tiny_runs, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "depth", "--checkpoint", str(tiny_runs["moeut"]), "--data", str(tiny_data), "--out",
                 str(out), "--batches", "2", "--batch-size", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "2 (trained)" in text and "vs trained" in text
    res = json.loads((out / "depth.json").read_text())["result"]
    assert res["trained_repeats"] == 2 and [p["repeats"] for p in res["points"]] == [1, 2, 3, 4]
    assert [p["applications"] for p in res["points"]] == [2, 4, 6, 8]
    assert all(p["tokens"] == 128 and p["ppl"] > 1 for p in res["points"])
    assert len({round(p["ppl"], 6) for p in res["points"]}) == 4  # every depth gives another perplexity
    assert_png(out / "depth.png", (5.5, 3.8))
    assert main(["analyze", "depth", "--checkpoint", str(tiny_runs["dense"]), "--data", str(tiny_data), "--out",
                 str(tmp_path / "d"), "--batches", "1", "--no-progress"]) == 2
    assert "shares no layers" in capsys.readouterr().err


def test_routing_analysis_cli_takes_repeats(tiny_runs, tiny_data, tmp_path):
    out = tmp_path / "out"
    assert main(["analyze", "expert-usage", "--checkpoint", str(tiny_runs["moeut"]), "--data", str(tiny_data),
                 "--out", str(out), "--batches", "1", "--batch-size", "2", "--repeats", "3", "--no-progress"]) == 0
    counts = json.loads((out / "expert_usage_ffn.json").read_text())["counts"]
    assert len(counts) == 2 and all(len(layer) == 3 for layer in counts)  # [G][R = 3][E], trained R = 2


def test_expert_usage_cli_on_a_dense_run_is_a_clear_error(tiny_runs, tiny_data, tmp_path, capsys):
    rc = main(["analyze", "expert-usage", "--checkpoint", str(tiny_runs["dense"]), "--data", str(tiny_data),
               "--out", str(tmp_path / "o"), "--batches", "1", "--no-progress"])
    assert rc == 2
    assert "dense" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc = main(["analyze", "layer-similarity", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_trains_each_config_once_and_a_second_call_does_no_training(tiny_data, tmp_path, monkeypatch, capsys):
    import moeut.analysis.sweep as sweep_module

    spec = tmp_path / "sweep.json"
    base = {k: v for k, v in TINY_MOEUT.items() if k not in ("ff_k",)}
    spec.write_text(json.dumps({"runs": [{"name": "k1", "model": {**base, "ff_k": 1}},
                                         {"name": "k2", "model": {**base, "ff_k": 2}}]}))
    out = tmp_path / "sweep"
    def args(steps: int = 3) -> list[str]:
        return ["analyze", "sweep", "--sweep", str(spec), "--data", str(tiny_data), "--out", str(out), "--steps",
                str(steps), "--batch-size", "2", "--seq-len", "32", "--no-progress"]

    calls = []
    real = sweep_module.train_run
    monkeypatch.setattr(sweep_module, "train_run", lambda cfg, **kw: calls.append(cfg.out) or real(cfg, **kw))
    assert main(args()) == 0
    assert calls == [str(out / "k1"), str(out / "k2")]
    first = json.loads((out / "sweep.json").read_text())
    assert first["token_budget"] == 3 * 2 * 32
    assert [r["status"] for r in first["rows"]] == ["trained", "trained"]
    assert all(r["val_ppl"] > 1 and r["tokens"] == 192 for r in first["rows"])
    capsys.readouterr()

    assert main(args()) == 0  # everything finished: nothing is trained again
    assert len(calls) == 2
    second = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in second["rows"]] == ["done earlier"] * 2
    assert [r["val_ppl"] for r in second["rows"]] == [r["val_ppl"] for r in first["rows"]]
    assert "done earlier" in capsys.readouterr().out
    assert_png(out / "sweep.png", (12, 4))

    # a longer budget resumes both runs from their checkpoints
    assert main(args(steps=4)) == 0
    third = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in third["rows"]] == ["resumed"] * 2 and third["token_budget"] == 4 * 64


def test_sweep_runs_may_not_change_the_token_budget(tiny_data, tmp_path):
    from moeut.analysis.common import AnalysisError
    from moeut.analysis.sweep import SweepEntry, run_sweep

    with pytest.raises(AnalysisError, match="token budget"):
        run_sweep([SweepEntry("a", model=TINY_MOEUT, train={"steps": 5})], tiny_data, tmp_path / "s", steps=2)


def test_builtin_expert_size_sweep_keeps_d_expert_times_k_and_expert_params_constant():
    from moeut.analysis.sweep import builtin_sweep

    runs = builtin_sweep("expert-size-k")
    assert {r.model["ff_expert_size"] * r.model["ff_k"] for r in runs} == {512}
    assert {r.model["ff_expert_size"] * r.model["ff_n_experts"] for r in runs} == {4096}
    assert [r.name for r in builtin_sweep("k")] == ["k2", "k4", "k6"]


def test_unknown_sweep_name_lists_the_builtin_ones(tmp_path, tiny_data, capsys):
    rc = main(["analyze", "sweep", "--sweep", "nope", "--data", str(tiny_data), "--out", str(tmp_path)])
    assert rc == 2 and "expert-size-k" in capsys.readouterr().err


@pytest.mark.slow
def test_wallclock_measures_each_preset_in_its_own_process_with_accumulation(tmp_path, capsys):
    tiny = ",".join(f"{k}={v}" for k, v in TINY_MOEUT.items())
    out = tmp_path / "wc"
    rc = main(["analyze", "wallclock", "--presets", f"moeut-tiny:{tiny}", "--batch-size", "4", "--seq-len", "16",
               "--grad-accum", "2", "--warmup", "1", "--iters", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "wallclock.json").read_text())["rows"]
    assert len(rows) == 1
    r = rows[0]
    assert r["grad_accum"] == 2 and r["iters"] == 2 and r["ms_per_iter"] > 0 and r["peak_memory_bytes"] >= 0
    assert r["params"] < 1_000_000 and "RSS" in r["memory_kind"]
    assert "ms/iter" in capsys.readouterr().out
    assert_png(out / "wallclock.png", (10, 3.6))


def test_wallclock_times_the_muon_step_in_bf16_when_asked(tmp_path, capsys):
    from moeut.model import ModelConfig, build_model
    from moeut.train.optimizers import MuonAdamW
    from moeut.train.wallclock import _optimizer

    tiny = ",".join(f"{k}={v}" for k, v in TINY_MOEUT.items())
    out = tmp_path / "wc"
    rc = main(["analyze", "wallclock", "--presets", f"moeut-tiny:{tiny}", "--batch-size", "2", "--seq-len", "16",
               "--warmup", "1", "--iters", "1", "--device", "cpu", "--optimizer", "muon", "--precision", "bf16",
               "--out", str(out)])
    assert rc == 0
    (r,) = json.loads((out / "wallclock.json").read_text())["rows"]
    assert (r["optimizer"], r["precision"]) == ("muon", "bf16") and r["ms_per_iter"] > 0
    assert "muon, precision bf16" in capsys.readouterr().out
    net = build_model(ModelConfig.from_name("moeut-tiny", **TINY_MOEUT))
    opt = _optimizer(net, "moeut-tiny", TINY_MOEUT, "muon")  # the trainer's split: Muon for the hidden matrices
    assert isinstance(opt, MuonAdamW)
    n_muon, n_adamw = (sum(p.numel() for g in o.param_groups for p in g["params"]) for o in opt.optimizers)
    assert n_muon > 0 and n_adamw > 0 and n_muon + n_adamw == sum(p.numel() for p in net.parameters())


def test_wallclock_unknown_preset_is_a_clear_error(tmp_path, capsys):
    rc = main(["analyze", "wallclock", "--presets", "no-such-preset", "--out", str(tmp_path)])
    assert rc == 2 and "available presets" in capsys.readouterr().err


def test_compute_training_macs_are_three_times_forward_macs_times_tokens(tiny_runs, tmp_path, capsys):
    from moeut.model import ModelConfig
    from moeut.model.accounting import model_stats

    out = tmp_path / "c"
    rc = main(["analyze", "compute", "--checkpoint", str(tiny_runs["moeut"]), str(tiny_runs["dense"]),
               "--presets", "moeut-44m", "--tokens", "1000", "--out", str(out)])
    assert rc == 0
    rows = {r["name"]: r for r in json.loads((out / "compute.json").read_text())["rows"]}
    m = rows["moeut"]
    cfg = ModelConfig.from_saved((Path(tiny_runs["moeut"]) / "model_config.json").read_text())
    assert m["macs_per_token"] == model_stats(cfg, context=32)["macs_per_token"]
    assert m["tokens"] == 3 * 4 * 32 and m["train_macs"] == 3 * m["macs_per_token"] * m["tokens"]
    assert m["hardware"].startswith("cpu") and m["val_ppl"] > 1 and m["wall_time_s"] > 0
    assert rows["moeut-44m"]["train_macs"] == 3 * rows["moeut-44m"]["macs_per_token"] * 1000
    assert "train MACs" in capsys.readouterr().out
    assert_png(out / "compute.png", (11, 4))


@pytest.mark.slow
def test_training_logs_residual_norms_at_the_interval(tiny_data, tmp_path):
    from moeut.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(preset="moeut-tiny", model_overrides=TINY_MOEUT, data=str(tiny_data), out=str(run), steps=4,
                      batch_size=2, seq_len=32, eval_every=0, save_every=0, log_every=10, routing_every=0,
                      residual_norm_every=2), show_progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [x["step"] for x in lines if "resnorm/L3/update" in x]
    assert logged == [2, 4]
    assert all(x["resnorm/L0/residual"] > 0 for x in lines if "resnorm/L0/residual" in x)


def test_norm_placement_sweep_needs_the_model_field(monkeypatch):
    from moeut.analysis import sweep
    from moeut.analysis.common import AnalysisError
    from moeut.model import ModelConfig

    if sweep._has_model_field("norm_placement"):  # the ablation exists: its three configurations validate
        runs = sweep.builtin_sweep("norm-placement")
        assert [ModelConfig.from_name(r.preset, **r.model).norm_placement for r in runs] == ["peri", "pre", "post"]
    monkeypatch.setattr(sweep, "_has_model_field", lambda name: False)
    with pytest.raises(AnalysisError, match="norm_placement"):
        sweep.builtin_sweep("norm-placement")


def test_curves_plot_the_runs_losses_against_tokens(tiny_runs, tmp_path, capsys):
    out = tmp_path / "curves"
    assert main(["analyze", "curves", "--checkpoint", str(tiny_runs["moeut"]), str(tiny_runs["dense"]),
                 "--out", str(out), "--smooth", "2"]) == 0
    data = json.loads((out / "curves.json").read_text())
    by_name = {r["name"]: r for r in data["runs"]}
    for name in ("moeut", "dense"):
        metrics = [json.loads(line) for line in (Path(tiny_runs[name]) / "metrics.jsonl").read_text().splitlines()]
        assert [tuple(p) for p in by_name[name]["train"]] == [(m["tokens_seen"], m["train_loss"]) for m in metrics
                                                              if "train_loss" in m]
        assert [p[1] for p in by_name[name]["val"]] == [m["val_ppl"] for m in metrics if "val_ppl" in m]
    assert "last val ppl" in capsys.readouterr().out
    assert_png(out / "curves.png", (11, 4))
    assert main(["analyze", "curves", "--checkpoint", str(tmp_path), "--out", str(out)]) == 2  # not a run
