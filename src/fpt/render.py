"""How results are shown: byte sizes, metric tables, figures and HTML pages, shared by the run report, the demo,
the benchmarks and the command line.

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure``), which needs no backend, so
nothing here changes a notebook's or an application's matplotlib state.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fpt.config import METRIC_NAMES

MiB = 2**20
TABLE_METRICS: tuple[str, ...] = (*METRIC_NAMES, "loss")
PAGE_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}\n"
    "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
)


def mib(size: int, decimals: int = 1, unit: bool = True) -> str:
    """``size`` bytes in MiB, e.g. ``1,246.9 MiB`` (``1,246.9`` without the ``unit``)."""
    return f"{size / MiB:,.{decimals}f}" + (" MiB" if unit else "")


def readable_size(size: int) -> str:
    """``size`` bytes in GiB from 1 GiB up, else in MiB, one decimal."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / MiB:.1f} MiB"


def metrics_table(columns: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: one row per ``TABLE_METRICS`` entry, one column per named metrics dict."""
    width = max(8, *(len(n) for n in columns))
    lines = [f"{'metric':<18}" + "".join(f"{n:>{width + 2}}" for n in columns)]
    for metric in TABLE_METRICS:
        cells = "".join(
            f"{'n/a' if m.get(metric) is None else format(m[metric], '.4f'):>{width + 2}}" for m in columns.values()
        )
        lines.append(f"{metric:<18}{cells}")
    return "\n".join(lines)


def save_figure(figure: Figure, path: str | Path, dpi: int) -> Path:
    """Lay out ``figure`` and write it as a PNG at ``path`` (its folder created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    return path


def html_page(title: str, body: str, extra_style: str = "") -> str:
    """A complete HTML page with fpt's style; ``title`` is escaped, ``body`` is inserted as it is."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{PAGE_STYLE}{extra_style}</style>
</head><body>{body}</body></html>
"""
