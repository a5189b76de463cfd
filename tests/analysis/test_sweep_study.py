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
