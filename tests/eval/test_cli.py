"""`moeut eval` end to end on a tiny trained run with --limit."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from moeut.cli.evaluate import add_arguments as add_eval_arguments, run as run_eval
from moeut.run.checkpoint import CorruptCheckpointError, checkpoint_path, list_checkpoints
from tests.conftest import shared_file
from tests.eval.conftest import write_task_data


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moeut eval")
    add_eval_arguments(p)
    return p.parse_args(list(argv))


def test_eval_every_task_with_limit_writes_json_and_table(tiny_run, tmp_path, capsys):
    data = write_task_data(tmp_path / "data", n=3)
    (data / "cbt").rename(tmp_path / "no_cbt")  # CBT absent: reported, not fatal
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("Document 1. and the words go on and on\n" * 40)
    out = tmp_path / "res" / "eval.json"
    rc = run_eval(_args("--checkpoint", str(tiny_run), "--data-dir", str(data), "--limit", "2", "--batch-size", "5",
                        "--ppl-data", str(held_out), "--json", str(out), "--no-progress"))
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"ppl", "lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy", "average"}
    assert res["ppl"]["ppl"] > 1 and res["ppl"]["bpb"] > 0 and res["ppl"]["windows"] == 2
    assert res["cbt"] == {**res["cbt"], "accuracy": None, "n": 0, "status": "not evaluated: data not found"}
    for task in ("lambada", "hellaswag", "piqa"):
        assert res[task]["n"] == 2 and 0 <= res[task]["accuracy"] <= 1
    assert res["blimp"]["n"] == 4 and res["blimp"]["n_paradigms"] == 2  # --limit is per paradigm
    assert res["arc_easy"]["n_all"] == 2
    assert res["average"]["tasks"] == ["lambada", "blimp", "hellaswag", "piqa", "arc_easy"]
    shown = capsys.readouterr().out
    assert "average" in shown and "not evaluated: data not found" in shown and "piqa" in shown


def test_eval_defaults_to_the_runs_validation_split_for_ppl(tiny_run, tmp_path):
    out = tmp_path / "ppl.json"
    assert run_eval(_args("--checkpoint", str(tiny_run), "--tasks", "ppl", "--limit", "1", "--json", str(out),
                          "--no-progress")) == 0
    res = json.loads(out.read_text())
    assert res["ppl"]["windows"] == 1 and res["ppl"]["source"].endswith("val")


def test_eval_repeats_changes_the_depth_and_the_perplexity(tiny_run, tmp_path, capsys):
    ppl = {}
    for r in (None, 2, 1, 4):  # the tiny run is trained with R = 2
        out = tmp_path / f"ppl_{r}.json"
        flags = [] if r is None else ["--repeats", str(r)]
        assert run_eval(_args("--checkpoint", str(tiny_run), "--tasks", "ppl", "--limit", "2", "--json", str(out),
                              "--no-progress", *flags)) == 0
        ppl[r] = json.loads(out.read_text())["ppl"]["ppl"]
    assert ppl[2] == pytest.approx(ppl[None], rel=1e-9)
    assert ppl[1] != pytest.approx(ppl[2], rel=1e-3) and ppl[4] != pytest.approx(ppl[2], rel=1e-3)
    assert "applied 4× (trained 2×)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--repeats must be positive"):
        run_eval(_args("--checkpoint", str(tiny_run), "--tasks", "ppl", "--repeats", "0"))


def test_eval_reports_bad_input_clearly(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        run_eval(_args("--checkpoint", str(tiny_run), "--tasks", "mmlu"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_eval(_args("--checkpoint", str(tmp_path / "nope")))
    assert run_eval(_args("--checkpoint", str(tiny_run), "--tasks", "cbt", "--data-dir", str(tmp_path),
                          "--no-progress")) == 1  # nothing could be evaluated


def test_eval_on_the_real_files(tiny_run, tmp_path):
    data = shared_file("data").resolve()
    out = tmp_path / "real.json"
    assert run_eval(_args("--checkpoint", str(tiny_run), "--tasks", "lambada,blimp,hellaswag,piqa,arc_easy",
                          "--data-dir", str(data), "--limit", "2", "--json", str(out), "--no-progress")) == 0
    res = json.loads(out.read_text())
    assert res["blimp"]["n"] == 134 and res["blimp"]["n_paradigms"] == 67
    assert all(res[t]["n"] == 2 for t in ("lambada", "hellaswag", "piqa"))


def test_eval_harness_flag_runs_lm_eval(tiny_run, tmp_path, capfd, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval (the 'eval' extra) is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"  # outside any git checkout: lm-eval's `git describe` must not print "fatal: …"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    data = write_task_data(tmp_path / "data", n=2)
    out = tmp_path / "h.json"
    assert run_eval(_args("--checkpoint", str(tiny_run), "--harness", "--tasks", "arc_easy,blimp", "--data-dir",
                          str(data), "--limit", "2", "--json", str(out))) == 0
    res = json.loads(out.read_text())
    # two paradigm files, not BLiMP's 67: their tasks run without the group
    assert {"arc_easy", "blimp_wh_island", "blimp_anaphor_gender_agreement"} <= set(res["results"])
    said = capfd.readouterr()  # file-descriptor level: git's stderr included
    assert "acc_norm" in said.out  # lm-eval's own table
    step = int(list_checkpoints(tiny_run)[-1].stem.split("_")[1])
    assert f"moeut eval: checkpoint {list_checkpoints(tiny_run)[-1]} (step {step})" in said.out
    assert "not a git repository" not in said.out + said.err


def test_eval_reports_only_the_tasks_asked_for_and_no_empty_average(tiny_run, tmp_path, capsys):
    data = write_task_data(tmp_path / "data", n=2)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("Document 1. and the words go on and on\n" * 40)
    common = ("--checkpoint", str(tiny_run), "--tasks", "ppl,piqa", "--limit", "1", "--ppl-data", str(held_out),
              "--no-progress")
    out = tmp_path / "with_piqa.json"
    assert run_eval(_args(*common, "--data-dir", str(data), "--json", str(out))) == 0
    shown = capsys.readouterr().out
    assert "not evaluated" not in shown and "lambada" not in shown and "hellaswag" not in shown
    assert json.loads(out.read_text())["average"] == {"accuracy": pytest.approx(json.loads(out.read_text())["piqa"]
                                                                                ["accuracy"]), "n": 1,
                                                      "tasks": ["piqa"], "not_evaluated": []}

    out = tmp_path / "no_piqa.json"  # piqa's data missing: its row says so, and there is nothing to average
    assert run_eval(_args(*common, "--data-dir", str(tmp_path / "empty"), "--json", str(out))) == 0
    shown = capsys.readouterr().out
    assert "average" not in shown and "over 0 task" not in shown and "lambada" not in shown
    assert "piqa       not evaluated: data not found" in shown
    assert set(json.loads(out.read_text())) == {"ppl", "piqa"}


def _run_with_corrupt_newest(tiny_run, tmp_path):
    """A copy of the tiny run whose newest checkpoint file is truncated garbage."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (good,) = list_checkpoints(run)
    bad = checkpoint_path(run, int(good.stem.split("_")[1]) + 4)
    bad.write_bytes(good.read_bytes()[:100])
    return run, good, bad


def test_eval_names_the_checkpoint_and_step_and_why_it_is_not_the_newest(tiny_run, tmp_path, capsys):
    run, good, bad = _run_with_corrupt_newest(tiny_run, tmp_path)
    step = int(good.stem.split("_")[1])
    assert run_eval(_args("--checkpoint", str(run), "--tasks", "ppl", "--limit", "1", "--no-progress")) == 0
    cap = capsys.readouterr()
    header = cap.out.splitlines()[0]
    assert f"moeut eval: checkpoint {good} (step {step})" in header
    why = next(line for line in cap.out.splitlines() if "not the newest" in line)
    assert str(bad) in why and "corrupt" in why
    assert str(bad) in cap.err and "resume" not in cap.out + cap.err  # no training advice

    # the newest checkpoint, named and not flagged
    assert run_eval(_args("--checkpoint", str(tiny_run), "--tasks", "ppl", "--limit", "1", "--no-progress")) == 0
    cap = capsys.readouterr()
    assert f"moeut eval: checkpoint {list_checkpoints(tiny_run)[-1]} (step {step})" in cap.out
    assert "not the newest" not in cap.out


def test_eval_of_a_corrupt_checkpoint_file_gives_eval_advice(tiny_run, tmp_path):
    run, good, bad = _run_with_corrupt_newest(tiny_run, tmp_path)
    with pytest.raises(CorruptCheckpointError) as err:
        run_eval(_args("--checkpoint", str(bad), "--tasks", "ppl"))
    msg = str(err.value)
    assert str(bad) in msg and "to evaluate another checkpoint" in msg and "resume" not in msg
    good.write_bytes(b"not a checkpoint")  # nothing left that loads
    with pytest.raises(CorruptCheckpointError, match="holds no loadable checkpoint") as err:
        run_eval(_args("--checkpoint", str(run), "--tasks", "ppl"))
    assert str(good) in str(err.value) and str(bad) in str(err.value) and "resume" not in str(err.value)
