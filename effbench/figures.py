"""The figures of `effbench plot`, drawn from an :class:`effbench.analysis.Analysis` (or a verify CSV).

- ``memory_vs_n``: peak memory per call vs N, log-log, one line per attention configuration, fitted
  exponent in the legend, faint ∝N and ∝N² references, cases that could not run marked (at their
  predicted bytes when the row has a prediction, else on the top edge);
- ``time_vs_n``: median time per call vs N, the same way;
- ``cuda_memory_vs_n``: CUDA allocator / NVML readings of the attention configurations, when the file has any;
- ``positions_vs_n``: the position encodings alone: parameters and peak memory vs N, each encoding against
  the reference table (see ``effbench.positions``);
- ``error_vs_knob``: fidelity error vs each mechanism's swept knob (from an ``effbench verify`` CSV).

Position encodings (declared ``comparable = "position"``) never appear on the attention figures.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
from matplotlib import transforms
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullLocator

from .analysis import CUDA_READINGS, Analysis, knob_sweeps
from .figure_base import (
    Marker,
    PlotResult,
    format_ticks,
    new_figure,
    outside_legend,
    reference_slopes,
    set_scales,
    styles,
)
from .fits import FAILED_STATUSES, METRICS, Fit
from .status import Status
from .summary import fmt_n, fmt_ratio, fmt_slope, memory_axis_label

STATUS_MARKERS = {Status.OOM: dict(marker="x", markersize=9, markeredgewidth=2),
                  Status.PREDICTED_OOM: dict(marker="X", markersize=9, markerfacecolor="none", markeredgewidth=1.3),
                  Status.TIMEOUT: dict(marker="v", markersize=8, markerfacecolor="none", markeredgewidth=1.5),
                  Status.KILLED: dict(marker="*", markersize=10, markerfacecolor="none", markeredgewidth=1.2)}
FIGURE_NAMES = {"memory": "memory_vs_n", "time": "time_vs_n", "cuda": "cuda_memory_vs_n", "error": "error_vs_knob",
                "positions": "positions_vs_n"}
SHORT = {"memory": "mem", "time": "time", "params": "params"}  # metric as named in a legend


def legend_label(label: str, fit: Fit | None, metric: str, n_ok: int) -> str:
    """``my-attn[window=128] (mem ∝ N^1.02±0.01)``; without a fit, how many ok points there are."""
    short = SHORT[metric]
    if fit is None:
        return f"{label} ({short}: {n_ok} ok point{'s' if n_ok != 1 else ''}, no fit)"
    return f"{label} ({short} ∝ {fmt_slope(fit)})"


def _setting_title(cfg: pd.DataFrame) -> str:
    settings = cfg["setting"].unique()
    return settings[0] if len(settings) == 1 else "several settings (see labels)"


# --------------------------------------------------------------------------- attention: N-scaling

def _edge_transform(ax):
    """x in data coordinates, y in axes coordinates (1.0 = top edge)."""
    return transforms.blended_transform_factory(ax.transData, ax.transAxes)


def _draw_failures(ax, pts: pd.DataFrame, label: str, style: dict, metric: str,
                   draw_label: str | None) -> list[Marker]:
    """Mark the points that could not run: at predicted_bytes on a memory plot when the row has a
    prediction, else on the top edge at their N. Returns the markers drawn."""
    failed = pts[pts["status"].isin(FAILED_STATUSES)]
    markers: list[Marker] = []
    for status, group in failed.groupby("status", sort=False):
        kw = dict(color=style["color"], linestyle="none", clip_on=False, zorder=4, **STATUS_MARKERS[status])
        placed = group["predicted_bytes"].notna() if metric == "memory" else pd.Series(False, index=group.index)
        at_value, at_edge = group[placed], group[~placed]
        if len(at_value):
            ax.plot(at_value["n"].astype(float), at_value["predicted_bytes"], gid=f"{status}:{label}",
                    label=draw_label or "_nolegend_", **kw)
            draw_label = None
            markers += [Marker(label, status, int(n), float(y))
                        for n, y in zip(at_value["n"], at_value["predicted_bytes"])]
        if len(at_edge):
            ax.plot(at_edge["n"].astype(float), np.ones(len(at_edge)), transform=_edge_transform(ax),
                    gid=f"{status}:{label}:edge", label=draw_label or "_nolegend_", **kw)
            draw_label = None
            markers += [Marker(label, status, int(n), None) for n in at_edge["n"]]
    return markers


def _predicted_extension(ax, ok: pd.DataFrame, pts: pd.DataFrame, col: str, style: dict) -> None:
    """Dotted continuation from the last ok point through the predicted bytes of cases that could not run."""
    pred = pts[pts["status"].isin(FAILED_STATUSES) & pts["predicted_bytes"].notna()]
    if ok.empty or pred.empty:
        return
    last = ok.sort_values("n").iloc[-1]
    xs = [float(last["n"])] + pred["n"].astype(float).tolist()
    ys = [float(last[col])] + pred["predicted_bytes"].tolist()
    ax.plot(xs, ys, color=style["color"], linestyle=":", linewidth=1, alpha=0.6, label="_nolegend_")


def _status_proxies(statuses: Iterable[str], metric: str) -> list[Line2D]:
    """Grey legend entries explaining the markers of the failure statuses drawn."""
    where = {"memory": "at predicted bytes, or top edge", "time": "top edge"}[metric]
    drawn = set(statuses)
    return [Line2D([], [], color="0.3", linestyle="none", label=f"{status} ({where})", **STATUS_MARKERS[status])
            for status in FAILED_STATUSES if status in drawn]


def scaling_figure(an: Analysis, metric: str) -> PlotResult:
    """Memory (``metric="memory"``) or time (``"time"``) vs N, log-log, one line per attention configuration,
    with the fitted exponent in each label, ∝N/∝N² references and markers where cases could not run."""
    col = METRICS[metric]
    fig, axes = new_figure()
    ax = axes[0, 0]
    set_scales(ax, metric)
    result = PlotResult(FIGURE_NAMES[metric], fig)
    style = styles(an.configs)
    cfg = an.attention
    mine = an.points[an.points["config"].isin(cfg["config"])]
    ok_all = mine[mine["status"].eq(Status.OK) & (mine[col] > 0)]
    statuses: set[str] = set()
    for c in cfg.itertuples(index=False):
        pts = mine[mine["config"].eq(c.config)].sort_values("n")
        ok = ok_all[ok_all["config"].eq(c.config)].sort_values("n")
        label = legend_label(c.label, an.fits.get((c.config, metric)), metric, len(ok))
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
    reference_slopes(ax, ok_all, col)
    format_ticks(ax, metric)
    ax.set_xlabel("sequence length N (k = 1024)")
    if metric == "memory":
        ax.set_ylabel(memory_axis_label(cfg))
        ax.set_title(f"Peak memory vs N (log-log) — {_setting_title(cfg)}")
    else:
        ax.set_ylabel("time per call (ms, median)")
        ax.set_title(f"Time vs N (log-log) — {_setting_title(cfg)}")
    if ok_all.empty:
        ax.text(0.5, 0.5, f"no {metric} readings in this file", transform=ax.transAxes, ha="center", color="0.4")
    outside_legend(ax, _status_proxies(statuses, metric))
    return result


def cuda_figure(an: Analysis) -> PlotResult | None:
    """CUDA allocator and NVML readings vs N of the attention configurations (one panel per reading present),
    or None when the file has none."""
    cfg = an.attention
    ok = an.points[an.points["status"].eq(Status.OK) & an.points["config"].isin(cfg["config"])]
    readings = [c for c in CUDA_READINGS if (ok[c] > 0).any()]
    if not readings:
        return None
    fig, axes = new_figure(width=4.6 * len(readings), height=5.0, ncols=len(readings))
    fig.subplots_adjust(wspace=0.35)
    result = PlotResult(FIGURE_NAMES["cuda"], fig)
    style = styles(an.configs)
    for ax, reading in zip(axes[0], readings):
        set_scales(ax, "memory")
        for c in cfg.itertuples(index=False):
            mine = ok[ok["config"].eq(c.config) & (ok[reading] > 0)].sort_values("n")
            if mine.empty:
                continue
            s = style[c.config]
            (line,) = ax.plot(mine["n"].astype(float), mine[reading], color=s["color"], marker=s["marker"],
                              linestyle=s["linestyle"], markersize=4, label=c.label)
            result.lines[f"{reading}:{c.label}"] = line
        format_ticks(ax, "memory")
        ax.set_title(CUDA_READINGS[reading], fontsize="medium")
        ax.set_xlabel("sequence length N")
    axes[0, 0].set_ylabel("bytes (binary units)")
    fig.suptitle(f"CUDA / NVML memory vs N — {_setting_title(cfg)}")
    handles, labels = [], []
    for ax in axes[0]:  # one legend for all panels: every configuration once
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    axes[0, -1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                       fontsize="small" if len(labels) <= 14 else "x-small", frameon=False)
    return result


# --------------------------------------------------------------------------- position encodings

POSITION_PANELS = (("params", "param_bytes", "parameters (param_bytes)", (0.5, 1)),
                   ("memory", "memory_bytes", "peak memory per call", (1,)))


def _ratio_arrows(ax, pos, quantity: str, col: str) -> None:
    """At the largest N an encoding and the reference both ran: a double arrow between their values, labelled
    with how many times fewer (or more) bytes the encoding needs than the reference."""
    ok = pos.points[pos.points["status"].eq(Status.OK)].set_index(["config", "n"])
    for config, group in pos.ratios.groupby("config", sort=False):
        last = group.dropna(subset=[f"{quantity}_ratio"]).sort_values("n")
        if last.empty:
            continue
        n, ratio = int(last["n"].iloc[-1]), float(last[f"{quantity}_ratio"].iloc[-1])
        y_ref, y_mine = ok.at[(pos.reference, n), col], ok.at[(config, n), col]
        ax.annotate("", xy=(n, y_mine), xytext=(n, y_ref), gid=f"ratio:{quantity}:{config}",
                    arrowprops=dict(arrowstyle="<->", color="0.25", linewidth=1.2, shrinkA=4, shrinkB=4))
        names = pos.representatives.set_index("config")["mechanism"]
        text = f"{fmt_ratio(ratio)} fewer" if ratio >= 1 else f"{fmt_ratio(1 / ratio)} more"
        text = f"{names[config]}: {text}\nthan {names[pos.reference]}\nat N={fmt_n(n)}"
        ax.text(n / 1.12, math.sqrt(y_ref * y_mine), text, ha="right", va="center",
                fontsize="small", color="0.15", bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.75"))


def positions_figure(an: Analysis) -> PlotResult | None:
    """The position encodings alone: parameters and peak memory vs N (log-log, two panels), one line per
    configuration with its fitted exponent, faint ∝√N / ∝N references, and arrows giving the reference
    table ÷ each encoding at the largest common N. None when the file has no position encoding with ok points."""
    pos = an.positions
    if pos is None or not pos.points["status"].eq(Status.OK).any():
        return None
    fig, axes = new_figure(width=12.0, height=5.6, ncols=2, layout="constrained")
    result = PlotResult(FIGURE_NAMES["positions"], fig)
    style = styles(an.configs)
    ok = pos.points[pos.points["status"].eq(Status.OK)]
    for ax, (quantity, col, ylabel, powers) in zip(axes[0], POSITION_PANELS):
        set_scales(ax, "memory")
        drawn = ok[ok[col] > 0]
        for c in pos.configs.itertuples(index=False):
            mine = drawn[drawn["config"].eq(c.config)].sort_values("n")
            if mine.empty:
                continue
            s = style[c.config]
            label = legend_label(c.label, pos.fits.get((c.config, quantity)), quantity, len(mine))
            (line,) = ax.plot(mine["n"].astype(float), mine[col], color=s["color"], marker=s["marker"],
                              linestyle=s["linestyle"], linewidth=1.6, markersize=7, label=label,
                              gid=f"{quantity}:{c.label}")
            result.lines[f"{quantity}:{c.label}"] = line
        ax.autoscale_view()
        reference_slopes(ax, drawn, col, powers)
        format_ticks(ax, "memory")
        _ratio_arrows(ax, pos, quantity, col)
        ax.set_xlabel("sequence length N (k = 1024)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs N", fontsize="medium")
        if drawn.empty:
            ax.text(0.5, 0.5, f"no {ylabel} in this file", transform=ax.transAxes, ha="center", color="0.4")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize="small", frameon=False)
    fig.suptitle(f"Position encodings (not attention): parameters and peak memory vs N, log-log — "
                 f"{_setting_title(pos.configs)}")
    return result


# --------------------------------------------------------------------------- fidelity (verify)

def error_figure(verify: pd.DataFrame) -> PlotResult | None:
    """Fidelity error ‖o − dense‖/‖v‖ vs each mechanism's swept knob (log-log), one panel per mechanism and
    knob; a faint 1/√m reference on ``features`` panels. None when the verify file has no such rows."""
    sweeps = knob_sweeps(verify)
    if sweeps.empty:
        return None
    panels = list(sweeps.groupby(["mechanism", "knob"], sort=False))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = new_figure(width=4.4 * ncols, height=3.6 * nrows, nrows=nrows, ncols=ncols, layout="constrained")
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
        if _promises_ratio(mech, knob):  # a declared error ×(lo..hi) per ×4 of the knob: draw 1/√knob beside it
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


def _promises_ratio(mechanism: str, knob: str) -> bool:
    """Does ``mechanism`` declare a ``ratio_per_4x`` trend on ``knob`` (a Monte-Carlo 1/√m error)?"""
    import mechanisms

    spec = mechanisms.REGISTRY.get(mechanism)
    sweeps = (spec.fidelity or ()) if spec is not None else ()
    return any(t.kind == "ratio_per_4x" for f in sweeps if f.knob == knob for t in f.expect)


def _inverse_sqrt_reference(ax, group: pd.DataFrame) -> None:
    """Faint error ∝ 1/√m line anchored at the smallest m (random-feature Monte Carlo rate)."""
    first = group[group["error_rel"] > 0].sort_values("knob_value")
    if first.empty or first["knob_value"].iloc[0] <= 0:
        return
    m0, e0 = float(first["knob_value"].iloc[0]), float(first["error_rel"].iloc[0])
    ms = np.geomspace(m0, float(first["knob_value"].max()), 30)
    ax.plot(ms, e0 * np.sqrt(m0 / ms), color="0.55", linestyle=(0, (4, 3)), linewidth=1, alpha=0.6,
            label="∝ 1/√m (reference)", gid="reference:1/sqrt(m)")
