"""The two-scale study's tables in docs/beyond-the-paper.md are the numbers of the records kept in
benchmarks/results (so a re-run that changes a record, or an edit that changes a cell, fails here), and each row's
bold cell and "best" column name its lowest perplexity."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "beyond-the-paper.md"
RESULTS = REPO / "benchmarks" / "results"
VARIANTS = {"AdamW": "", "Muon": "-muon", "loss-free balancing": "-lossfree"}
ZEN4 = "ᶻ"  # a cell measured only on the study's first machine (the Zen 4)


def _table(scale: str) -> list[list[str]]:
    text = DOC.read_text()
    start = text.index(f"**{scale} (")
    lines = text[start:].splitlines()[1:]
    rows = [line for line in lines[:12] if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows if not r.startswith("|---")]


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_the_study_tables_are_the_records_numbers(scale):
    head, *rows = _table(scale)
    lrs = head[2:head.index("best")]
    assert len(rows) >= 5
    for row in rows:
        preset, variant = row[0].split(", ")
        group = preset + VARIANTS[variant]
        cells = dict(zip(lrs, row[2:2 + len(lrs)]))
        got = {}
        for lr, cell in cells.items():
            if cell == "–":
                continue
            summary = json.loads((RESULTS / f"scale-{scale}" / f"{group}-lr{lr}" / "summary.json").read_text())
            value = cell.replace("**", "").replace(ZEN4, "").strip()
            assert value == f"{summary['val_ppl']:.2f}", (group, lr)
            got[lr] = float(value)
        best = min(got, key=got.get)
        assert cells[best].startswith("**") and sum(c.startswith("**") for c in cells.values()) == 1, row
        assert row[head.index("best")].split()[0] == best, row
