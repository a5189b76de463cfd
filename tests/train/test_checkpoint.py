"""Checkpoints: atomic writes, keep-last-K, safe loading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from moeut.run.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                    save_checkpoint)


def test_save_load_round_trip_and_keep_last_k(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"w": torch.full((3,), float(step)), "note": "x"}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000004.pt", "ckpt_00000005.pt"]
    path, state = latest_checkpoint(tmp_path)
    assert state["step"] == 5 and torch.equal(state["w"], torch.full((3,), 5.0))


def test_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "checkpoints" / "ckpt_00000001.pt"
    path.parent.mkdir()
    torch.save({"format_version": 1, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="corrupt or not a moeut checkpoint"):
        load_checkpoint(path)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)})
    p2 = save_checkpoint(tmp_path, 2, {"w": torch.ones(2) * 2})
    p2.write_bytes(p2.read_bytes()[:50])  # truncated
    path, state = latest_checkpoint(tmp_path)
    assert state["step"] == 1
    assert "ckpt_00000002.pt" in capsys.readouterr().out


def test_kill_during_checkpoint_write_leaves_previous_loadable(tmp_path):
    """SIGKILL a process in the middle of writing a checkpoint: the previous one must still load."""
    save_checkpoint(tmp_path, 1, {"w": torch.ones(4)})
    script = textwrap.dedent(f"""
        import time, torch
        from moeut.run import checkpoint as ck
        real_save = torch.save
        def slow_save(obj, f):
            f.write(b"PK\\x03\\x04 partial bytes")  # start of a zip archive, then hang mid-write
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        ck.torch.save = slow_save
        ck.save_checkpoint({str(tmp_path)!r}, 2, {{"w": torch.zeros(4)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.1)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert "ckpt_00000002.pt" not in leftovers  # only a temporary file can be left behind
    path, state = latest_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(4))
