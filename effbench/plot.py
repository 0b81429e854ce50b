"""`effbench plot`: figures, slope fits, crossovers, budget and a Markdown summary from a results CSV.

Reads files only; never runs a mechanism. Figures are drawn with matplotlib's object
API on the Agg canvas (no display, no pyplot global state).

Output directory (default: ``<csv dir>/<csv stem>_plots/``, e.g. ``results/reference.csv``
-> ``results/reference_plots/``), one file per figure and format:

- ``memory_vs_n.<fmt>``: peak memory per call vs N, log-log, one line per configuration,
  fitted exponent in the legend, faint ∝N and ∝N² references, cases that could not run
  marked (at their predicted bytes when the row has a prediction, else on the top edge);
- ``time_vs_n.<fmt>``: median time per call vs N, the same way;
- ``cuda_memory_vs_n.<fmt>``: CUDA allocator / NVML readings, when the file has any;
- ``error_vs_knob.<fmt>``: fidelity error vs each mechanism's swept knob (``verify_csv`` given);
- ``summary.md``, ``slopes.csv``, ``crossovers.csv`` (and ``budget.csv`` with a budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import matplotlib
from matplotlib import transforms
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

from . import analysis, results
from .analysis import Analysis, fmt_n, fmt_slope, md_table
from .units import UsageError, fmt_bytes, parse_bytes

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]
LINESTYLES = ["-", "--", "-.", ":"]
FAMILY_MARKERS = {"exact": "o", "sparse": "s", "kernel": "^", "low-rank": "D", "hashing": "v",
                  "recurrent": "P", "position": "*"}
STATUS_MARKERS = {"oom": dict(marker="x", markersize=9, markeredgewidth=2),
                  "predicted_oom": dict(marker="X", markersize=9, markerfacecolor="none", markeredgewidth=1.3),
                  "timeout": dict(marker="v", markersize=8, markerfacecolor="none", markeredgewidth=1.5),
                  "killed": dict(marker="*", markersize=10, markerfacecolor="none", markeredgewidth=1.2)}
FIGURE_NAMES = {"memory": "memory_vs_n", "time": "time_vs_n", "cuda": "cuda_memory_vs_n", "error": "error_vs_knob"}


# --------------------------------------------------------------------------- results of drawing

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


# --------------------------------------------------------------------------- tick formatting

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
    if value <= 0:
        return ""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            q = value / size
            return f"{q:g} {unit}" if float(round(q, 6)).is_integer() else f"{q:.1f} {unit}"
    return f"{value:g} B"


def tick_ms(value: float, _pos: Any = None) -> str:
    """Time tick in milliseconds: 0.01, 1, 250, 10,000."""
    return "" if value <= 0 else format(value, ",g")


def _set_scales(ax, metric: str) -> None:
    """Log-log axes (base 2 for N and bytes, base 10 for ms); call before plotting so limits autoscale in log."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=10 if metric == "time" else 2)


def _format_ticks(ax, metric: str) -> None:
    """Tick labels with units: N as 512/1k/32k, bytes in KiB/MiB/GiB, time in ms."""
    ax.xaxis.set_major_locator(LogLocator(base=2, numticks=14))
    ax.xaxis.set_major_formatter(FuncFormatter(tick_n))
    ax.xaxis.set_minor_locator(NullLocator())
    if metric == "time":
        ax.yaxis.set_major_formatter(FuncFormatter(tick_ms))
        lo, hi = ax.get_ylim()
        if hi / lo < 30:  # less than ~1.5 decades: label 2× and 5× too
            ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
            ax.yaxis.set_minor_formatter(FuncFormatter(tick_ms))
        else:
            ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.yaxis.set_major_locator(LogLocator(base=2, numticks=12))
        ax.yaxis.set_major_formatter(FuncFormatter(tick_bytes))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.grid(True, which="major", alpha=0.3)


# --------------------------------------------------------------------------- styles and labels

def styles(cfg: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Colour, marker (by family) and line style per configuration; the same in every figure."""
    out = {}
    for i, c in enumerate(cfg.itertuples(index=False)):
        out[c.config] = {"color": PALETTE[i % len(PALETTE)], "marker": FAMILY_MARKERS.get(c.family, "o"),
                         "linestyle": LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)]}
    return out


def legend_label(label: str, fit: analysis.Fit | None, metric: str, n_ok: int) -> str:
    """``local[window=128] (mem ∝ N^1.02±0.01)``; without a fit, how many ok points there are."""
    short = "mem" if metric == "memory" else "time"
    if fit is None:
        return f"{label} ({short}: {n_ok} ok point{'s' if n_ok != 1 else ''}, no fit)"
    return f"{label} ({short} ∝ {fmt_slope(fit)})"


def memory_axis_label(cfg: pd.DataFrame) -> str:
    """Which reading the memory axis shows (tracker, CUDA allocator, prediction, or a mix)."""
    used = sorted({s for text in cfg["memory_source"] for s in text.split("+") if s})
    if not used:
        used = ["peak_tensor_bytes"]
    names = [f"{analysis.MEMORY_SOURCES.get(s, s)} ({s})" for s in used]
    return "peak memory per call\n" + ("; ".join(names) if len(names) < 3 else ", ".join(used))


def _setting_title(an: Analysis) -> str:
    settings = an.configs["setting"].unique()
    return settings[0] if len(settings) == 1 else "several settings (see labels)"


# --------------------------------------------------------------------------- N-scaling figures

def _new_figure(width: float = 10.0, height: float = 6.0, nrows: int = 1, ncols: int = 1, layout: str | None = None):
    """A Figure on the Agg canvas (no pyplot, no display) and its axes grid. Legends outside the axes are
    kept in the saved file by ``bbox_inches="tight"``."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _edge_transform(ax):
    """x in data coordinates, y in axes coordinates (1.0 = top edge)."""
    return transforms.blended_transform_factory(ax.transData, ax.transAxes)


def _draw_failures(ax, pts: pd.DataFrame, label: str, style: dict, metric: str,
                   draw_label: str | None) -> list[Marker]:
    """Mark the points that could not run: at predicted_bytes on a memory plot when the row has a
    prediction, else on the top edge at their N. Returns the markers drawn."""
    failed = pts[pts["status"].isin(analysis.FAILED_STATUSES)]
    markers: list[Marker] = []
    for status, group in failed.groupby("status", sort=False):
        kw = dict(color=style["color"], linestyle="none", clip_on=False, zorder=4, **STATUS_MARKERS[status])
        placed = group["predicted_bytes"].notna() if metric == "memory" else pd.Series(False, index=group.index)
        at_value, at_edge = group[placed], group[~placed]
        if len(at_value):
            ax.plot(at_value["n"].astype(float), at_value["predicted_bytes"], gid=f"{status}:{label}",
                    label=draw_label or "_nolegend_", **kw)
            draw_label = None
            markers += [Marker(label, status, int(n), float(y)) for n, y in zip(at_value["n"], at_value["predicted_bytes"])]
        if len(at_edge):
            ax.plot(at_edge["n"].astype(float), np.ones(len(at_edge)), transform=_edge_transform(ax),
                    gid=f"{status}:{label}:edge", label=draw_label or "_nolegend_", **kw)
            draw_label = None
            markers += [Marker(label, status, int(n), None) for n in at_edge["n"]]
    return markers


def _predicted_extension(ax, ok: pd.DataFrame, pts: pd.DataFrame, col: str, style: dict) -> None:
    """Dotted continuation from the last ok point through the predicted bytes of cases that could not run."""
    pred = pts[pts["status"].isin(analysis.FAILED_STATUSES) & pts["predicted_bytes"].notna()]
    if ok.empty or pred.empty:
        return
    last = ok.sort_values("n").iloc[-1]
    xs = [float(last["n"])] + pred["n"].astype(float).tolist()
    ys = [float(last[col])] + pred["predicted_bytes"].tolist()
    ax.plot(xs, ys, color=style["color"], linestyle=":", linewidth=1, alpha=0.6, label="_nolegend_")


def _reference_slopes(ax, ok: pd.DataFrame, col: str) -> list[Line2D]:
    """Faint ∝N and ∝N² lines from the geometric mean of the values at the smallest N (axis limits kept)."""
    data = ok[ok[col] > 0]
    if data.empty or data["n"].nunique() < 2:
        return []
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    n0, n1 = float(data["n"].min()), float(data["n"].max())
    y0 = float(np.exp(np.log(data.loc[data["n"] == data["n"].min(), col]).mean()))
    ns = np.geomspace(n0, n1, 50)
    lines = []
    for power, text in ((1, "∝ N (reference)"), (2, "∝ N² (reference)")):
        (line,) = ax.plot(ns, y0 * (ns / n0) ** power, color="0.55", linewidth=1.0, alpha=0.55,
                          linestyle=(0, (6, 3)) if power == 1 else (0, (2, 2)), zorder=0, label=text,
                          gid=f"reference:N^{power}")
        lines.append(line)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    return lines


def _status_proxies(statuses: Iterable[str], metric: str) -> list[Line2D]:
    where = {"memory": "at predicted bytes, or top edge", "time": "top edge"}[metric]
    out = []
    for status in [s for s in analysis.FAILED_STATUSES if s in set(statuses)]:
        out.append(Line2D([], [], color="0.3", linestyle="none", label=f"{status} ({where})", **STATUS_MARKERS[status]))
    return out


def _legend(ax, extra: list[Line2D]) -> None:
    handles, labels = ax.get_legend_handles_labels()
    handles += extra
    labels += [h.get_label() for h in extra]
    if not handles:
        return
    size = "small" if len(handles) <= 14 else "x-small"
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=size,
              frameon=False, ncol=1 if len(handles) <= 28 else 2)


def scaling_figure(an: Analysis, metric: str) -> PlotResult:
    """Memory (``metric="memory"``) or time (``"time"``) vs N, log-log, one line per configuration, with the
    fitted exponent in each label, ∝N/∝N² references and markers where cases could not run."""
    col = analysis.METRICS[metric]
    fig, axes = _new_figure()
    ax = axes[0, 0]
    _set_scales(ax, metric)
    result = PlotResult(FIGURE_NAMES[metric], fig)
    style = styles(an.configs)
    ok_all = an.points[an.points["status"].eq("ok") & (an.points[col] > 0)]
    statuses: set[str] = set()
    for c in an.configs.itertuples(index=False):
        pts = an.points[an.points["config"].eq(c.config)].sort_values("n")
        ok = ok_all[ok_all["config"].eq(c.config)].sort_values("n")
        fit = an.fits.get((c.config, metric))
        label = legend_label(c.label, fit, metric, len(ok))
        s = style[c.config]
        if len(ok):
            (line,) = ax.plot(ok["n"].astype(float), ok[col], color=s["color"], marker=s["marker"],
                              linestyle=s["linestyle"], linewidth=1.6, markersize=5, label=label, gid=f"data:{c.label}")
            result.lines[c.label] = line
            if metric == "memory":
                _predicted_extension(ax, ok, pts, col, s)
        markers = _draw_failures(ax, pts, c.label, s, metric, draw_label=None if len(ok) else label)
        result.markers += markers
        statuses |= {m.status for m in markers}
    ax.autoscale_view()
    _reference_slopes(ax, ok_all, col)
    _format_ticks(ax, metric)
    ax.set_xlabel("sequence length N (k = 1024)")
    if metric == "memory":
        ax.set_ylabel(memory_axis_label(an.configs))
        ax.set_title(f"Peak memory vs N (log-log) — {_setting_title(an)}")
    else:
        ax.set_ylabel("time per call (ms, median)")
        ax.set_title(f"Time vs N (log-log) — {_setting_title(an)}")
    if ok_all.empty:
        ax.text(0.5, 0.5, f"no {metric} readings in this file", transform=ax.transAxes, ha="center", color="0.4")
    _legend(ax, _status_proxies(statuses, metric))
    return result


def cuda_figure(an: Analysis) -> PlotResult | None:
    """CUDA allocator and NVML readings vs N (one panel per reading present), or None when the file has none."""
    ok = an.points[an.points["status"].eq("ok")]
    readings = [c for c in analysis.CUDA_READINGS if (ok[c] > 0).any()]
    if not readings:
        return None
    fig, axes = _new_figure(width=4.6 * len(readings), height=5.0, ncols=len(readings))
    fig.subplots_adjust(wspace=0.35)
    result = PlotResult(FIGURE_NAMES["cuda"], fig)
    style = styles(an.configs)
    for ax, reading in zip(axes[0], readings):
        _set_scales(ax, "memory")
        for c in an.configs.itertuples(index=False):
            mine = ok[ok["config"].eq(c.config) & (ok[reading] > 0)].sort_values("n")
            if mine.empty:
                continue
            s = style[c.config]
            (line,) = ax.plot(mine["n"].astype(float), mine[reading], color=s["color"], marker=s["marker"],
                              linestyle=s["linestyle"], markersize=4, label=c.label)
            result.lines[f"{reading}:{c.label}"] = line
        _format_ticks(ax, "memory")
        ax.set_title(analysis.CUDA_READINGS[reading], fontsize="medium")
        ax.set_xlabel("sequence length N")
    axes[0, 0].set_ylabel("bytes (binary units)")
    fig.suptitle(f"CUDA / NVML memory vs N — {_setting_title(an)}")
    handles, labels = [], []
    for ax in axes[0]:  # one legend for all panels: every configuration once
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    axes[0, -1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                       fontsize="small" if len(labels) <= 14 else "x-small", frameon=False)
    return result


def error_figure(verify: pd.DataFrame) -> PlotResult | None:
    """Fidelity error ‖o − dense‖/‖v‖ vs each mechanism's swept knob (log-log), one panel per mechanism and knob;
    a faint 1/√m reference on ``features`` panels. None when the verify file has no such rows."""
    sweeps = analysis.knob_sweeps(verify)
    if sweeps.empty:
        return None
    panels = list(sweeps.groupby(["mechanism", "knob"], sort=False))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _new_figure(width=4.4 * ncols, height=3.6 * nrows, nrows=nrows, ncols=ncols, layout="constrained")
    result = PlotResult(FIGURE_NAMES["error"], fig)
    several_n = sweeps["n"].nunique() > 1
    for ax, ((mech, knob), group) in zip(axes.flat, panels):
        for (causal, n), line_rows in group.groupby(["causal", "n"], sort=False, dropna=False):
            line_rows = line_rows.sort_values("knob_value")
            label = ("causal" if causal else "bidirectional") + (f", N={fmt_n(n)}" if several_n and pd.notna(n) else "")
            (line,) = ax.plot(line_rows["knob_value"], line_rows["error_rel"], marker="o", markersize=4, label=label)
            result.lines[f"{mech}:{knob}:{label}"] = line
        values = np.sort(group["knob_value"].unique())
        ax.set_xscale("log" if (values > 0).all() else "symlog", **({} if (values > 0).all() else {"linthresh": 1}))
        ax.set_yscale("log", nonpositive="mask")
        if knob == "features":
            _inverse_sqrt_reference(ax, group)
        ax.set_xticks(values)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(f"{mech}: error vs {knob}", fontsize="medium")
        ax.set_xlabel(knob)
        ax.set_ylabel("‖o − dense‖ / ‖v‖")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="x-small", frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Fidelity against dense attention vs each mechanism's knob (effbench verify)")
    return result


def _inverse_sqrt_reference(ax, group: pd.DataFrame) -> None:
    """Faint error ∝ 1/√m line anchored at the smallest m (random-feature Monte Carlo rate)."""
    first = group[group["error_rel"] > 0].sort_values("knob_value")
    if first.empty or first["knob_value"].iloc[0] <= 0:
        return
    m0, e0 = float(first["knob_value"].iloc[0]), float(first["error_rel"].iloc[0])
    ms = np.geomspace(m0, float(first["knob_value"].max()), 30)
    ax.plot(ms, e0 * np.sqrt(m0 / ms), color="0.55", linestyle=(0, (4, 3)), linewidth=1, alpha=0.6,
            label="∝ 1/√m (reference)", gid="reference:1/sqrt(m)")


# --------------------------------------------------------------------------- the report

@dataclass
class Report:
    """What `effbench plot` produced: the analysis, figures, files written, Markdown and notes."""

    csv_path: Path
    out_dir: Path
    analysis: Analysis
    figures: dict[str, PlotResult]
    files: list[Path]
    markdown: str
    notes: list[str]
    budget_bytes: int | None = None
    verify: pd.DataFrame | None = None

    @property
    def summary(self) -> dict[str, pd.DataFrame]:
        """Textbook tables (display strings): ``"memory"`` and ``"time"``, rows = N."""
        return self.analysis.textbook

    @property
    def points(self) -> pd.DataFrame:
        """Numeric summary: one row per configuration and N (status, memory_bytes, time_ms, ...)."""
        return self.analysis.points

    @property
    def slopes(self) -> pd.DataFrame:
        return self.analysis.slopes

    @property
    def crossovers(self) -> pd.DataFrame:
        return self.analysis.crossovers

    @property
    def budget(self) -> pd.DataFrame | None:
        return self.analysis.budget


def default_out_dir(csv_path: str | Path) -> Path:
    """``results/reference.csv`` -> ``results/reference_plots``."""
    p = Path(csv_path)
    return p.with_name(f"{p.stem}_plots")


def parse_formats(formats: str | Sequence[str]) -> list[str]:
    """``"png,svg"`` or ``("png", "svg")`` -> ["png", "svg"], checked against what matplotlib can write."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = list(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f and f.strip()))
    supported = FigureCanvasAgg.get_supported_filetypes()
    bad = [f for f in out if f not in supported]
    if bad or not out:
        raise UsageError(f"--format {','.join(bad) or '(none)'}: choose from {', '.join(sorted(supported))}")
    return out


def _budget(value: int | str | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_bytes(value, "--budget")
    if value <= 0:
        raise UsageError(f"--budget must be positive, got {value}")
    return int(value)


# No date in the file and fixed SVG ids: the same CSV gives byte-identical figures, so regenerated results diff cleanly.
_STABLE_METADATA = {"svg": {"Date": None}, "pdf": {"CreationDate": None, "ModDate": None}, "png": {}}


def _save(result: PlotResult, out_dir: Path, formats: list[str]) -> list[Path]:
    paths = []
    for fmt in formats:
        path = out_dir / f"{result.name}.{fmt}"
        with matplotlib.rc_context({"svg.hashsalt": "effbench"}):
            result.figure.savefig(path, format=fmt, dpi=150, bbox_inches="tight",
                                  metadata=_STABLE_METADATA.get(fmt))
        paths.append(path)
    return paths


def draw_figures(an: Analysis, verify: pd.DataFrame | None) -> tuple[dict[str, PlotResult], list[str]]:
    """Every figure this file supports, and notes on the ones left out."""
    figures = {"memory": scaling_figure(an, "memory")}
    notes = []
    if (an.points["time_ms"] > 0).any():
        figures["time"] = scaling_figure(an, "time")
    else:
        notes.append("no timings in this file (predictions only?): time_vs_n not drawn")
    cuda = cuda_figure(an)
    if cuda is not None:
        figures["cuda"] = cuda
    else:
        notes.append("no CUDA allocator or NVML readings in this file: cuda_memory_vs_n not drawn")
    if verify is not None:
        err = error_figure(verify)
        if err is not None:
            figures["error"] = err
        else:
            notes.append("the verify file has no fidelity rows with a swept knob: error_vs_knob not drawn")
    return figures, notes


def data_notes(an: Analysis) -> list[str]:
    """What the reader should know about the rows: statuses not plotted, noisy timings, memory source."""
    notes = []
    counts = an.rows["status"].value_counts()
    hidden = {s: int(counts[s]) for s in ("error", "skipped") if s in counts}
    if hidden:
        notes.append(", ".join(f"{v} {k}" for k, v in hidden.items()) + " row(s) not plotted (listed in summary.md)")
    ok = an.points[an.points["status"].eq("ok") & (an.points["time_ms"] > 0)]
    noisy = ok[ok["time_iqr_ms"] / ok["time_ms"] > 0.10]
    if len(noisy):
        notes.append(f"{len(noisy)} timing(s) have IQR above 10% of the median: slopes of time are less certain "
                     "(re-run with --warmup 3 or --min-time 2 for steadier timings)")
    return notes


def markdown(an: Analysis, csv_path: Path, files: list[Path], out_dir: Path, budget_bytes: int | None,
             notes: list[str]) -> str:
    """summary.md: textbook tables, slopes, crossovers, budget, highlights, figures and the full table."""
    counts = an.rows["status"].value_counts()
    reps = an.representatives
    lines = [f"# effbench summary: {csv_path.name}", "",
             f"Source: `{csv_path}`: {len(an.rows)} rows, {len(an.configs)} configurations; statuses: "
             + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", "",
             f"Memory axis: {memory_axis_label(an.configs).replace(chr(10), ': ')}. Time: median per call (ms). "
             "Bytes in binary units (MiB = 2^20 B).", "",
             f"The textbook tables show one configuration per mechanism (the one with the most ok rows, "
             f"in the setting `{an.setting}` where it ran there); every configuration is in the last table.", ""]
    lines += [f"- **{r.mechanism}**: `{r.label}` ({int(r.n_ok_points)} ok N" +
              (f"; setting `{r.setting}`" if r.setting != an.setting else "") + ")" for r in reps.itertuples()]
    lines += ["", "## Peak memory per call", "", md_table(an.textbook["memory"])]
    if "time" in an.textbook:
        lines += ["## Time per call (ms, median)", "", md_table(an.textbook["time"])]
    lines += ["## Fitted log-log slopes", "",
              "Least squares of log y on log N over the ok points, ± the standard error of the slope (≥ 3 points). "
              "Verdict: ≈N below 1.25, ≈N² above 1.75, in between otherwise (sub-linear below 0.75).", "",
              md_table(analysis.slopes_display(an.configs, an.fits)),
              "## Crossover N*", "",
              "Where each configuration becomes cheaper than dense / sdpa (same setting), from the two log-log fits; "
              "reported when within a factor 2 of the measured range.", "",
              md_table(analysis.crossover_display(an.crossovers))]
    if an.budget is not None and budget_bytes:
        lines += [f"## Largest N under {fmt_bytes(budget_bytes)}", "",
                  "From the memory trend (measured, plus predicted bytes of cases that could not run), rounded down.",
                  "", md_table(analysis.budget_display(an.budget))]
    if an.highlights:
        lines += ["## Highlights", ""] + [f"- {h}" for h in an.highlights] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    figs = [f for f in files if f.suffix.lstrip(".") in ("png", "svg", "jpg", "jpeg", "pdf")]
    if figs:
        lines += ["## Figures", ""]
        for f in figs:
            rel = f.relative_to(out_dir) if f.is_relative_to(out_dir) else f
            lines.append(f"![{f.stem}]({rel})" if f.suffix in (".png", ".svg", ".jpg") else f"- [{f.name}]({rel})")
        lines.append("")
    lines += ["## All configurations", "", md_table(an.full)]
    return "\n".join(lines)


def make_report(csv_path: str | Path, out_dir: str | Path | None = None, formats: str | Sequence[str] = ("png",),
                budget_bytes: int | str | None = None, verify_csv: str | Path | None = None) -> Report:
    """Read a results CSV (and optionally an ``effbench verify`` CSV), analyse it, write the figures,
    ``slopes.csv``, ``crossovers.csv`` (``budget.csv``) and ``summary.md`` to ``out_dir``
    (default ``<csv dir>/<csv stem>_plots``), and return the Report.

    Raises ResultsError for a file that is not an effbench CSV or has no ok rows, and UsageError
    for an unknown format or a bad budget; nothing is written in either case.
    """
    csv_path = Path(csv_path)
    fmts = parse_formats(formats)
    budget = _budget(budget_bytes)
    an = analysis.analyse(results.read_results(csv_path), budget, source=str(csv_path))
    verify = analysis.read_verify(verify_csv) if verify_csv is not None else None
    out = Path(out_dir) if out_dir is not None else default_out_dir(csv_path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    figures, notes = draw_figures(an, verify)
    notes = data_notes(an) + notes
    files: list[Path] = []
    for result in figures.values():
        files += _save(result, out, fmts)
    tables = {"slopes.csv": an.slopes, "crossovers.csv": an.crossovers}
    if an.budget is not None:
        tables["budget.csv"] = an.budget
    for name, table in tables.items():
        table.to_csv(out / name, index=False)
        files.append(out / name)
    text = markdown(an, csv_path, files, out, budget, notes)
    (out / "summary.md").write_text(text)
    files.append(out / "summary.md")
    return Report(csv_path=csv_path, out_dir=out, analysis=an, figures=figures, files=files, markdown=text,
                  notes=notes, budget_bytes=budget, verify=verify)


# --------------------------------------------------------------------------- rendering in the terminal

def _rich_table(df: pd.DataFrame, title: str, caption: str | None = None):
    """A DataFrame of display strings as a rich Table (status words coloured, markup escaped)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), caption=escape(caption) if caption else None, title_justify="left")
    for col in df.columns:
        values = [str(v) for v in df[col]]
        numeric = all(v[:1].isdigit() or v in ("", "—") for v in values)
        table.add_column(escape(str(col)), justify="right" if numeric else "left", overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*[_styled(str(v)) for v in row])
    return table


def _styled(text: str) -> str:
    from rich.markup import escape

    first = text.split(" ")[0]
    colour = {"oom": "red", "killed": "red", "timeout": "red", "error": "red", "predicted_oom": "yellow",
              "skipped": "dim"}.get(first)
    return f"[{colour}]{escape(text)}[/]" if colour else escape(text)


def _fits_width(df: pd.DataFrame, width: int) -> bool:
    need = sum(max([len(str(c))] + [len(str(v)) for v in df[c]]) + 3 for c in df.columns)
    return need <= width


def _textbook_for(df: pd.DataFrame, width: int) -> tuple[pd.DataFrame, str | None]:
    """The textbook table as is, or transposed (mechanisms as rows) when it is too wide for the terminal."""
    if _fits_width(df, width):
        return df, None
    t = df.drop(columns=["N² (scores)"]).set_index("N").T
    t.index.name = "mechanism"
    return t.reset_index(), "transposed to fit the terminal (rows = mechanisms, columns = N); see summary.md"


def render_report(report: Report, console) -> None:
    """Print the textbook tables, slopes, crossovers, budget, highlights, notes and the files written."""
    from rich.markup import escape

    an = report.analysis
    width = console.width
    for metric, title in (("memory", "Peak memory per call"), ("time", "Time per call (ms, median)")):
        if metric not in an.textbook:
            continue
        df, caption = _textbook_for(an.textbook[metric], width)
        console.print(_rich_table(df, f"{title} — {an.setting}", caption))
    console.print(_rich_table(analysis.slopes_display(an.configs, an.fits), "Fitted log-log slopes",
                              "≈N below 1.25, ≈N² above 1.75; ± standard error with ≥ 3 points"))
    cross = analysis.crossover_display(an.crossovers)
    if not cross.empty:
        console.print(_rich_table(cross, "Crossover N* (cheaper than dense / sdpa)"))
    if an.budget is not None and report.budget_bytes:
        console.print(_rich_table(analysis.budget_display(an.budget), f"Largest N under {fmt_bytes(report.budget_bytes)}"))
    for line in an.highlights:
        console.print(f"[bold]{escape(line)}[/]", highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(f"[green]wrote[/] {len(report.files)} file(s) to {escape(str(report.out_dir))}: "
                  + escape(", ".join(p.name for p in report.files)), highlight=False, soft_wrap=True)
