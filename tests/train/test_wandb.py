"""`--wandb-project` in WANDB_MODE=offline: the same metrics as metrics.jsonl, the resolved config, files in
RUN/wandb/, the same W&B run after --resume; a missing package is explained. Never touches the network."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from moeut.cli import main
from tests.train.conftest import train_args

wandb = pytest.importorskip("wandb", reason="the W&B sink needs wandb (pip install 'moeut[wandb]')")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true",
                 "WANDB_DISABLE_GIT": "true", "WANDB_DIR": tmp_path / "wandb_dir",
                 "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                 "WANDB_DATA_DIR": tmp_path / "wandb_data"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)


def _records(path: Path) -> list:
    """The protobuf records of an offline ``run-<id>.wandb`` file (W&B's LevelDB-style log: 32 KiB blocks,
    7-byte record headers ``crc32, length, type``; type 1 = whole record, 2/3/4 = first/middle/last part)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    pos, out, parts = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def _offline_runs(run: Path) -> list[tuple[str, dict, dict[int, dict]]]:
    """(run id, config, {step: logged values}) of each offline W&B run under RUN/wandb/, oldest first.

    W&B's service process may still be flushing a run's log when ``wandb.finish()`` has returned (seen once under
    a loaded CI machine: no run record yet), so a log without its run record is read again for a few seconds."""
    found = []
    for d in sorted((run / "wandb").glob("offline-run-*")):
        for _ in range(50):
            parsed = _parse_offline_run(d)
            if parsed[0] is not None:
                break
            time.sleep(0.2)
        found.append(parsed)
    return found


def _parse_offline_run(d: Path) -> tuple[str | None, dict, dict[int, dict]]:
    run_id, config, history = None, {}, {}
    for rec in _records(next(d.glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
            config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.run.config.update}
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(row.get("_step", rec.history.step.num), {}).update(row)
    return run_id, config, history


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_offline_wandb_run_logs_the_metrics_and_config_and_resumes_the_same_run(tiny_data, tmp_path, offline):
    run = tmp_path / "run"
    common = dict(steps=4, save_every=2, eval_every=2, routing_every=2, wandb_project="moeut-test",
                  wandb_run_name="tiny")
    assert main(train_args(tiny_data, run, **common)) == 0
    assert not (tmp_path / "wandb_dir").exists() or not any((tmp_path / "wandb_dir").rglob("*.wandb"))
    [(run_id, config, history)] = _offline_runs(run)
    assert (run / "wandb" / "moeut_run_id.txt").read_text().strip() == run_id
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    assert config["train"]["preset"] == "moeut-tiny" and config["model"]["d_model"] == 32
    assert config["train"]["wandb_project"] == "moeut-test"
    for line in _metrics(run):  # every metrics.jsonl value, at its step
        for k, v in line.items():
            if k != "step" and v is not None:
                assert history[line["step"]][k] == pytest.approx(v, rel=1e-12), (line["step"], k)

    # interrupted after step 2: --resume continues the same W&B run
    (run / "checkpoints" / "ckpt_00000004.pt").unlink()
    assert main([*train_args(tiny_data, run, **common), "--resume"]) == 0
    runs = _offline_runs(run)
    assert len(runs) == 2 and runs[1][0] == run_id
    assert {3, 4} <= set(runs[1][2]) and runs[1][2][4]["train_loss"] == pytest.approx(history[4]["train_loss"])


def test_missing_wandb_package_names_the_extra(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert main(train_args(tiny_data, tmp_path / "run", steps=2, wandb_project="x")) != 0
    assert "pip install 'moeut[wandb]'" in capsys.readouterr().err
