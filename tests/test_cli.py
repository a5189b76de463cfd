"""The `moeut` console script."""

from __future__ import annotations

import json

import pytest

from moeut.cli import main


def test_info_json_has_the_documented_keys(capsys):
    assert main(["info", "--preset", "moeut-44m", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_non_embedding", "active_params_per_token", "macs_per_token"):
        assert isinstance(stats[key], int) and stats[key] > 0
    assert stats["params_total"] == pytest.approx(44.3e6, rel=0.01)
    assert stats["macs_context"] == 1024


def test_info_table_lists_every_preset(capsys):
    from moeut.model import PRESETS

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


def test_unknown_preset_is_a_clean_error(capsys):
    assert main(["info", "--preset", "nope"]) == 2
    assert "available presets" in capsys.readouterr().err


def test_demo_learns_the_copy_task(capsys):
    assert main(["demo", "--steps", "60", "--batch", "8", "--context", "32", "--vocab", "16"]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    first, final = (float(x) for x in last.split(":")[1].split("(")[0].split("->"))
    assert final < 0.5 * first, out
