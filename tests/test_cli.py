"""The `moeut` console script."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from moeut.cli import main


def test_info_json_has_the_documented_keys(capsys):
    assert main(["info", "--preset", "moeut-44m", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_non_embedding", "active_params_per_token", "macs_per_token"):
        assert isinstance(stats[key], int) and stats[key] > 0
    assert stats["params_total"] == pytest.approx(44.3e6, rel=0.01)
    assert stats["macs_context"] == 1024
    # both MAC counts: the authors' (common.py of their training code) and moeut's own
    assert isinstance(stats["paper_macs_per_sequence"], int)
    assert stats["paper_macs_per_token"] == pytest.approx(stats["paper_macs_per_sequence"] / 1024)
    assert stats["paper_macs_per_token"] != stats["macs_per_token"]


def test_info_table_lists_every_preset(capsys):
    from moeut.model import PRESETS

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert "paper MACs/tok" in out and "moeut MACs/tok" in out


def test_unknown_preset_is_a_clean_error(capsys):
    assert main(["info", "--preset", "nope"]) == 2
    assert "available presets" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_runs_the_main_job_end_to_end_and_repeats_it_exactly(tmp_path, capsys):
    """prepare (built-in corpus) → train moeut-tiny → validation perplexity → sample; re-running re-reports; a
    second demo with the same seed on the same data gives the same run, number for number, and the same sample."""
    from moeut.data import DataError, default_corpus_files

    try:
        default_corpus_files()
    except DataError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))

    def args(out: Path) -> list[str]:
        return ["demo", "--out", str(out), "--steps", "6", "--batch-size", "4", "--seq-len", "64",
                "--max-new-tokens", "8"]

    def metrics(run: Path) -> list[dict]:  # every logged line, less the measured (not computed) timings
        timing = {"tok_per_s", "tflops", "mfu", "peak_memory_bytes", "wall_time_s"}
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    out = tmp_path / "demo"
    assert main(args(out)) == 0
    text = capsys.readouterr().out
    assert "--- sample ---" in text and "val ppl" in text
    summary = json.loads((out / "demo.json").read_text())
    run = summary["runs"]["moeut-tiny"]
    assert run["step"] == 6 and summary["sample"].startswith("Once upon a time")
    # the reported perplexity is the run's own (its summary.json), printed in the table
    assert run["val_ppl"] == json.loads((out / "moeut-tiny" / "summary.json").read_text())["val_ppl"]
    assert f"{run['val_ppl']:.2f}" in text
    assert (out / "data" / "prepare.json").exists() and (out / "moeut-tiny" / "checkpoints").is_dir()
    assert main(args(out)) == 0  # re-running reuses the data and the finished run
    assert "using the prepared data" in capsys.readouterr().out
    assert json.loads((out / "demo.json").read_text())["runs"]["moeut-tiny"]["val_ppl"] == run["val_ppl"]

    # determinism: the same demo again from a copy of the prepared data (the tokenizer's training is tested in
    # tests/data) trains bit for bit the same run
    again = tmp_path / "again"
    shutil.copytree(out / "data", again / "data")
    assert main(args(again)) == 0
    repeat = json.loads((again / "demo.json").read_text())
    assert repeat["runs"]["moeut-tiny"]["val_ppl"] == run["val_ppl"]
    assert repeat["runs"]["moeut-tiny"]["train_loss"] == run["train_loss"]
    logged = metrics(out / "moeut-tiny")
    assert any("train_loss" in m for m in logged) and metrics(again / "moeut-tiny") == logged
    assert repeat["sample"] == summary["sample"]
