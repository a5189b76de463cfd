"""The `moeut` console script."""

from __future__ import annotations

import json
import os

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


def test_demo_runs_the_main_job_end_to_end(tmp_path, capsys):
    """prepare (built-in corpus) → train moeut-tiny → validation perplexity → sample; re-running re-reports."""
    from moeut.data import DataError, default_corpus_files

    try:
        default_corpus_files()
    except DataError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "6", "--batch-size", "4", "--seq-len", "64", "--max-new-tokens", "8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "--- sample ---" in text and "val ppl" in text
    summary = json.loads((out / "demo.json").read_text())
    run = summary["runs"]["moeut-tiny"]
    assert run["step"] == 6 and 1 < run["val_ppl"] < 8000
    assert summary["sample"].startswith("Once upon a time")
    assert (out / "data" / "prepare.json").exists() and (out / "moeut-tiny" / "checkpoints").is_dir()
    assert main(args) == 0  # re-running reuses the data and the finished run
    assert "using the prepared data" in capsys.readouterr().out
