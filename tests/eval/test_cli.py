"""`moeut eval` end to end on a tiny trained run with --limit."""

from __future__ import annotations

import argparse
import json

import pytest

from moeut.cli.evaluate import add_arguments as add_eval_arguments, run as run_eval
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


def test_eval_harness_flag_runs_lm_eval(tiny_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval (the 'eval' extra) is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_task_data(tmp_path / "data", n=2)
    out = tmp_path / "h.json"
    assert run_eval(_args("--checkpoint", str(tiny_run), "--harness", "--tasks", "arc_easy,blimp", "--data-dir",
                          str(data), "--limit", "2", "--json", str(out))) == 0
    res = json.loads(out.read_text())
    # two paradigm files, not BLiMP's 67: their tasks run without the group
    assert {"arc_easy", "blimp_wh_island", "blimp_anaphor_gender_agreement"} <= set(res["results"])
    assert "acc_norm" in capsys.readouterr().out  # lm-eval's own table
