"""`load_run` says which checkpoint it loaded and which newer ones it did not, and why."""

from __future__ import annotations

import pytest

from moeut.run import load_run
from moeut.run.checkpoint import (CorruptCheckpointError, checkpoint_path, find_latest_checkpoint, latest_checkpoint,
                                  save_checkpoint)
from tests.integrations.helpers import STEP, make_run


@pytest.fixture
def run(tokenizer, tmp_path):
    return make_run(tmp_path / "run", tokenizer)


def _add_newer(run, step: int, corrupt: bool):
    path = checkpoint_path(run, step)
    if corrupt:
        path.write_bytes(b"PK\x03\x04 truncated")
    else:
        save_checkpoint(run, step, {k: v for k, v in _state(run).items() if k not in ("format_version", "step")},
                        keep=0)
    return path


def _state(run):
    (_, state), _ = find_latest_checkpoint(run)
    return state


def test_the_newest_checkpoint_is_named_and_flagged_newest(run):
    loaded = load_run(run)
    assert loaded.is_newest and loaded.skipped == () and loaded.not_newest() is None
    assert loaded.describe() == f"checkpoint {checkpoint_path(run, STEP)} (step {STEP})"


def test_a_corrupt_newer_checkpoint_is_skipped_reported_and_warned_about(run, capsys):
    bad = _add_newer(run, STEP + 5, corrupt=True)
    loaded = load_run(run)
    assert loaded.step == STEP and loaded.source == checkpoint_path(run, STEP) and not loaded.is_newest
    (skipped,) = loaded.skipped
    assert skipped.path == bad and "corrupt or not a moeut checkpoint" in skipped.reason
    assert loaded.not_newest().startswith(f"not the newest checkpoint of the run: checkpoint {bad} is corrupt")
    err = capsys.readouterr().err
    assert str(bad) in err and f"{checkpoint_path(run, STEP)} (step {STEP})" in err
    assert "resume" not in err and "delete" not in err  # the loader gives no training advice


def test_a_checkpoint_file_asked_for_by_name_reports_the_newer_ones(run, capsys):
    newer = _add_newer(run, STEP + 3, corrupt=False)
    assert load_run(run).source == newer  # the run directory: its newest
    loaded = load_run(checkpoint_path(run, STEP))
    assert loaded.step == STEP and [s.path for s in loaded.skipped] == [newer]
    assert f"{newer} is newer" in loaded.not_newest()
    assert capsys.readouterr().err == ""  # asked for: nothing to warn about


def test_checkpoint_layer_messages_are_neutral_and_name_the_files(run, capsys):
    bad = _add_newer(run, STEP + 1, corrupt=True)
    found, skipped = find_latest_checkpoint(run)
    assert found[0] == checkpoint_path(run, STEP) and [s.path for s in skipped] == [bad]
    assert capsys.readouterr().out == ""  # find_latest_checkpoint leaves reporting to the caller
    assert latest_checkpoint(run)[0] == checkpoint_path(run, STEP)
    out = capsys.readouterr().out
    assert str(bad) in out and "resume" not in out and "delete" not in out  # train's own words are train's
    checkpoint_path(run, STEP).write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="holds no loadable checkpoint") as err:
        load_run(run)
    assert str(bad) in str(err.value) and str(checkpoint_path(run, STEP)) in str(err.value)
