"""What every effbench figure shares: the drawn-figure record, tick labels with units, log-log axes,
one style per configuration, legends, faint reference slopes and byte-stable saving.

Figures are drawn with matplotlib's object API on the Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

from .units import fmt_bytes

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]
LINESTYLES = ["-", "--", "-.", ":"]
FAMILY_MARKERS = {"exact": "o", "sparse": "s", "kernel": "^", "low-rank": "D", "hashing": "v",
                  "recurrent": "P", "position": "*"}  # marker shape only; never a capability


@dataclass(frozen=True)
class Marker:
    """A case that could not run, as drawn: ``y`` is None when it sits on the top edge of the axes."""

    label: str
    status: str
    n: int
    y: float | None


@dataclass
class PlotResult:
    """A drawn figure, its data lines by legend label, and the markers of cases that could not run."""

    name: str
    figure: Figure
    lines: dict[str, Line2D] = field(default_factory=dict)
    markers: list[Marker] = field(default_factory=list)


# --------------------------------------------------------------------------- ticks and axes

def tick_n(n: float, _pos: Any = None) -> str:
    """Sequence-length tick: 512, 1k, 32k, 1M (k = 1024, as on the command line)."""
    if n <= 0:
        return ""
    for unit, size in (("M", 2**20), ("k", 2**10)):
        if n >= size and float(n / size).is_integer():
            return f"{int(n // size)}{unit}"
    return f"{n:g}"


def tick_bytes(value: float, _pos: Any = None) -> str:
    """Memory tick in binary units, compact: 512 KiB, 4 MiB, 1.5 GiB."""
    return "" if value <= 0 else fmt_bytes(value, compact=True)


def tick_ms(value: float, _pos: Any = None) -> str:
    """Time tick in milliseconds: 0.01, 1, 250, 10,000."""
    return "" if value <= 0 else format(value, ",g")


def set_scales(ax, metric: str) -> None:
    """Log-log axes (base 2 for N and bytes, base 10 for ms); call before plotting so limits autoscale in log."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=10 if metric == "time" else 2)


def format_ticks(ax, metric: str) -> None:
    """Tick labels with units: N as 512/1k/32k, bytes in KiB/MiB/GiB, time in ms."""
    ax.xaxis.set_major_locator(LogLocator(base=2, numticks=14))
    ax.xaxis.set_major_formatter(FuncFormatter(tick_n))
    ax.xaxis.set_minor_locator(NullLocator())
    format_metric_axis(ax.yaxis, metric, ax.get_ylim(), short_span=30)
    ax.grid(True, which="major", alpha=0.3)


def format_metric_axis(axis, metric: str, limits: tuple[float, float], short_span: float) -> None:
    """One axis (``ax.xaxis`` or ``ax.yaxis``) of a time or memory metric: ms (with 2× and 5× between decades
    when the span ``limits`` is shorter than ``short_span``), or bytes at powers of two."""
    lo, hi = limits
    if metric == "time":
        axis.set_major_formatter(FuncFormatter(tick_ms))
        if hi / lo < short_span:  # a short span: label 2× and 5× too
            axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
            axis.set_minor_formatter(FuncFormatter(tick_ms))
        else:
            axis.set_minor_formatter(NullFormatter())
    else:
        axis.set_major_locator(LogLocator(base=2, numticks=12))
        axis.set_major_formatter(FuncFormatter(tick_bytes))
        axis.set_minor_locator(NullLocator())


def new_figure(width: float = 10.0, height: float = 6.0, nrows: int = 1, ncols: int = 1, layout: str | None = None):
    """A Figure on the Agg canvas (no pyplot, no display) and its axes grid. Legends outside the axes are
    kept in the saved file by ``bbox_inches="tight"``."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


# --------------------------------------------------------------------------- styles, legends, references

def styles(cfg: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Colour, marker (by family) and line style per configuration; the same in every figure."""
    out = {}
    for i, c in enumerate(cfg.itertuples(index=False)):
        out[c.config] = {"color": PALETTE[i % len(PALETTE)], "marker": FAMILY_MARKERS.get(c.family, "o"),
                         "linestyle": LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)]}
    return out


def outside_legend(ax, extra: list[Line2D]) -> None:
    """The axes' legend (plus ``extra`` proxy handles) to the right of the axes, smaller when long."""
    handles, labels = ax.get_legend_handles_labels()
    handles += extra
    labels += [h.get_label() for h in extra]
    if not handles:
        return
    size = "small" if len(handles) <= 14 else "x-small"
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=size,
              frameon=False, ncol=1 if len(handles) <= 28 else 2)


REFERENCE_STYLES = {0.5: (0, (1, 2)), 1: (0, (6, 3)), 2: (0, (2, 2))}
REFERENCE_NAMES = {0.5: "√N", 1: "N", 2: "N²"}


def reference_slopes(ax, ok: pd.DataFrame, col: str, powers=(1, 2)) -> list[Line2D]:
    """Faint ∝N^p lines (p in ``powers``: 0.5, 1, 2) from the geometric mean of the values at the smallest N,
    over the measured range (axis limits kept)."""
    data = ok[ok[col] > 0]
    if data.empty or data["n"].nunique() < 2:
        return []
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    n0, n1 = float(data["n"].min()), float(data["n"].max())
    y0 = float(np.exp(np.log(data.loc[data["n"] == data["n"].min(), col]).mean()))
    ns = np.geomspace(n0, n1, 50)
    lines = []
    for power in powers:
        (line,) = ax.plot(ns, y0 * (ns / n0) ** power, color="0.55", linewidth=1.0, alpha=0.55,
                          linestyle=REFERENCE_STYLES[power], zorder=0,
                          label=f"∝ {REFERENCE_NAMES[power]} (reference)", gid=f"reference:N^{power}")
        lines.append(line)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    return lines


# --------------------------------------------------------------------------- saving

# No date in the file and fixed SVG ids: the same CSV gives byte-identical figures, so regenerated results diff cleanly.
_STABLE_METADATA = {"svg": {"Date": None}, "pdf": {"CreationDate": None, "ModDate": None}, "png": {}}


def save_figure(result: PlotResult, out_dir: Path, formats: list[str]) -> list[Path]:
    """Write ``<out_dir>/<name>.<fmt>`` for every format (150 dpi, tight box, no dates); the paths written."""
    paths = []
    for fmt in formats:
        path = out_dir / f"{result.name}.{fmt}"
        with matplotlib.rc_context({"svg.hashsalt": "effbench"}):
            result.figure.savefig(path, format=fmt, dpi=150, bbox_inches="tight",
                                  metadata=_STABLE_METADATA.get(fmt))
        paths.append(path)
    return paths
