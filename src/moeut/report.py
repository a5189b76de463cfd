"""Output helpers for tables and figures (analyses, wall-clock measurements, evaluation summaries).

Nothing here imports matplotlib at module level: :func:`pyplot` loads it (Agg backend) when a plot is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from moeut.errors import MissingDependency

INSTALL_HINT = "pip install 'moeut[analysis]'"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], floatfmt: str = ".3f") -> str:
    """Plain aligned text: first column left-aligned, the others right-aligned; None and NaN print as "-"."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return format(v, floatfmt)
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[j]) for r in body)) if body else len(h) for j, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def pyplot() -> Any:
    """matplotlib.pyplot with the non-interactive Agg backend (the 'analysis' extra)."""
    try:
        import matplotlib  # optional dependency: only the plots need it
    except ImportError:
        raise MissingDependency(f"the plots need matplotlib: {INSTALL_HINT} (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path
