"""The figures of `effbench plot`, drawn from an :class:`effbench.analysis.Analysis` (or a verify CSV).

- ``memory_vs_n``: peak memory per call vs N, log-log, one line per attention configuration, fitted
  exponent in the legend, faint ∝N and ∝N² references, cases that could not run marked (at their
  predicted bytes when the row has a prediction, else on the top edge);
- ``time_vs_n``: median time per call vs N, the same way;
- ``cuda_memory_vs_n``: CUDA allocator / NVML readings of the attention configurations, when the file has any;
- ``positions_vs_n``: the position encodings alone: parameters and peak memory vs N, each encoding against
  the reference table (see ``effbench.positions``);
- ``error_vs_knob``: fidelity error vs each mechanism's swept knob (from an ``effbench verify`` CSV);
- ``decode_state_vs_n`` (decode rows): KV cache / state bytes vs context N, log-log, one panel per state class
  (grows with N, constant), the fitted log-log slope and the affine fit in each label, the affine fit dotted
  out to N = 1M; configurations with the same state at every N share one line;
- ``decode_time_vs_n`` (decode rows): per state class, time per token vs N (log-log, fitted slopes, IQR bars)
  and each point's read GB/s against the device's measured copy bandwidth (a horizontal line, from the sidecar).

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
from .decode_analysis import (
    CLASS_TITLES,
    CONSTANT,
    GROWS,
    STATE_AT_N,
    STATE_SOURCES,
    UNFITTED,
    DecodeAnalysis,
    copy_lines,
)
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
from .units import fmt_bytes

STATUS_MARKERS = {Status.OOM: dict(marker="x", markersize=9, markeredgewidth=2),
                  Status.PREDICTED_OOM: dict(marker="X", markersize=9, markerfacecolor="none", markeredgewidth=1.3),
                  Status.TIMEOUT: dict(marker="v", markersize=8, markerfacecolor="none", markeredgewidth=1.5),
                  Status.KILLED: dict(marker="*", markersize=10, markerfacecolor="none", markeredgewidth=1.2)}
FIGURE_NAMES = {"memory": "memory_vs_n", "time": "time_vs_n", "cuda": "cuda_memory_vs_n", "error": "error_vs_knob",
                "positions": "positions_vs_n", "decode_state": "decode_state_vs_n", "decode_time": "decode_time_vs_n"}
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


# A scaling figure with more attention configurations than this is drawn in panels by family.
FACET_ABOVE = 8
# Panels of a faceted scaling figure: a title and the families it holds (a family not listed joins the last panel).
FAMILY_PANELS = (("exact: dense and SDPA", ("exact",)), ("sparse patterns", ("sparse",)),
                 ("kernel and low-rank", ("kernel", "low-rank")), ("hashing, recurrent and others", ("hashing", "recurrent")))


def facet_groups(cfg: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The attention configurations split into the panels of :data:`FAMILY_PANELS` (empty panels left out; a
    family no panel names joins the last one)."""
    known = {f for _, fams in FAMILY_PANELS for f in fams}
    groups = []
    for i, (title, fams) in enumerate(FAMILY_PANELS):
        last = i == len(FAMILY_PANELS) - 1
        members = cfg[cfg["family"].isin(fams) | (last & ~cfg["family"].isin(known))]
        if len(members):
            groups.append((title, members))
    return groups


def _draw_configs(ax, result: PlotResult, an: Analysis, cfg: pd.DataFrame, mine: pd.DataFrame, ok_all: pd.DataFrame,
                  metric: str, style: dict) -> set[str]:
    """One line per configuration of ``cfg`` (fitted exponent in its label), its predicted extension and markers
    where its cases could not run; the statuses drawn."""
    col = METRICS[metric]
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
    return statuses


def _axis_text(ax, an: Analysis, cfg: pd.DataFrame, metric: str) -> None:
    ax.set_xlabel("sequence length N (k = 1024)")
    ax.set_ylabel(memory_axis_label(cfg) if metric == "memory" else "time per call (ms, median)")


def scaling_figure(an: Analysis, metric: str) -> PlotResult:
    """Memory (``metric="memory"``) or time (``"time"``) vs N, log-log, one line per attention configuration,
    with the fitted exponent in each label, ∝N/∝N² references and markers where cases could not run. With more
    than :data:`FACET_ABOVE` configurations, one panel per family group (:data:`FAMILY_PANELS`) on shared axes,
    dense and SDPA of the main setting repeated in grey in every other panel."""
    cfg = an.attention
    groups = facet_groups(cfg) if len(cfg) > FACET_ABOVE else []
    if len(groups) > 1:
        return _faceted_scaling_figure(an, metric, groups)
    col = METRICS[metric]
    fig, axes = new_figure()
    ax = axes[0, 0]
    set_scales(ax, metric)
    result = PlotResult(FIGURE_NAMES[metric], fig)
    style = styles(an.configs)
    mine = an.points[an.points["config"].isin(cfg["config"])]
    ok_all = mine[mine["status"].eq(Status.OK) & (mine[col] > 0)]
    statuses = _draw_configs(ax, result, an, cfg, mine, ok_all, metric, style)
    ax.autoscale_view()
    reference_slopes(ax, ok_all, col)
    format_ticks(ax, metric)
    _axis_text(ax, an, cfg, metric)
    what = "Peak memory" if metric == "memory" else "Time"
    ax.set_title(f"{what} vs N (log-log) — {_setting_title(cfg)}")
    if ok_all.empty:
        ax.text(0.5, 0.5, f"no {metric} readings in this file", transform=ax.transAxes, ha="center", color="0.4")
    outside_legend(ax, _status_proxies(statuses, metric))
    return result


REFERENCE_LINESTYLES = {"dense": "-", "sdpa": "--"}


def _faceted_scaling_figure(an: Analysis, metric: str, groups: list[tuple[str, pd.DataFrame]]) -> PlotResult:
    """The scaling figure in panels (two columns, shared log-log axes), each with its own legend below it."""
    from .fits import BASELINES, baseline_config

    col = METRICS[metric]
    cfg = an.attention
    ncols = 2
    nrows = math.ceil(len(groups) / ncols)
    entries = max(len(members) for _, members in groups) + 5  # lines, two references, two slopes, a status
    fig, axes = new_figure(width=15.5, height=nrows * (4.2 + 0.2 * entries), nrows=nrows, ncols=ncols,
                           layout="constrained")
    flat = list(axes.flat)
    for ax in flat[1:]:
        ax.sharex(flat[0])
        ax.sharey(flat[0])
    result = PlotResult(FIGURE_NAMES[metric], fig)
    style = styles(an.configs)
    mine = an.points[an.points["config"].isin(cfg["config"])]
    ok_all = mine[mine["status"].eq(Status.OK) & (mine[col] > 0)]
    refs = [(b, c) for b in BASELINES if (c := baseline_config(cfg, b, an.setting)) is not None]
    panel_statuses = []
    for ax, (title, members) in zip(flat, groups):
        set_scales(ax, metric)
        panel_statuses.append(_draw_configs(ax, result, an, members, mine, ok_all, metric, style))
        shown = set(members["config"])
        for base, config in refs:
            if config in shown:
                continue
            ok = ok_all[ok_all["config"].eq(config)].sort_values("n")
            label = cfg.loc[cfg["config"].eq(config), "label"].iloc[0]
            fit = an.fits.get((config, metric))
            ax.plot(ok["n"].astype(float), ok[col], color=style[config]["color"], alpha=0.4, linewidth=2.6,
                    linestyle=REFERENCE_LINESTYLES.get(base, ":"), zorder=1, gid=f"baseline:{label}",
                    label=f"{label}, the reference ({SHORT[metric]} ∝ {fmt_slope(fit)})")
    for ax in flat[len(groups):]:
        ax.set_visible(False)
    flat[0].autoscale_view()
    for ax, (title, members), statuses in zip(flat, groups, panel_statuses):
        panel_ok = ok_all[ok_all["config"].isin(members["config"])]
        reference_slopes(ax, panel_ok, col)
        format_ticks(ax, metric)
        _axis_text(ax, an, cfg, metric)
        ax.set_title(title, fontsize="medium")
        if panel_ok.empty:
            ax.text(0.5, 0.5, f"no {metric} readings in this panel", transform=ax.transAxes, ha="center", color="0.4")
        handles, labels = ax.get_legend_handles_labels()
        proxies = _status_proxies(statuses, metric)
        ax.legend(handles + proxies, labels + [h.get_label() for h in proxies], loc="upper center",
                  bbox_to_anchor=(0.5, -0.13), fontsize="small", frameon=False, ncol=1)
    what = "Peak memory" if metric == "memory" else "Time"
    fig.suptitle(f"{what} vs N (log-log) — {_setting_title(cfg)}\none panel per family, on shared axes; faint wide "
                 "lines: dense (solid) and SDPA (dashed) of the main setting, repeated in every panel for reference",
                 fontsize="medium")
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


# --------------------------------------------------------------------------- decode

DECODE_CLASSES = (GROWS, CONSTANT, UNFITTED)


def _decode_groups(da: DecodeAnalysis, col: str) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """Per state class with ok points in ``col``: (class, its configurations, their ok points), in class order."""
    ok = da.points[da.points["status"].eq(Status.OK) & (da.points[col] > 0)]
    groups = []
    for cls in DECODE_CLASSES:
        cfg = da.configs[da.configs["state_class"].eq(cls)]
        pts = ok[ok["config"].isin(cfg["config"])]
        if len(pts):
            groups.append((cls, cfg[cfg["config"].isin(pts["config"])], pts))
    return groups


def _decode_setting_title(da: DecodeAnalysis) -> str:
    settings = da.settings
    steps = da.steps
    text = settings[0] if len(settings) == 1 else "several settings (see summary.md)"
    return text + (f", {steps[0]} steps" if len(steps) == 1 else "")


def _wrap_names(labels: list[str], width: int = 48) -> str:
    """Labels joined by commas, broken onto lines of about ``width`` characters."""
    lines, line = [], ""
    for lab in labels:
        piece = lab if not line else f", {lab}"
        if line and len(line) + len(piece) > width:
            lines.append(line + ",")
            line = lab
        else:
            line += piece
    return "\n".join(lines + [line])


def _affine_text(fit) -> str:
    if fit is None:
        return "no affine fit"
    if fit.constant:
        return fmt_bytes(fit.intercept)
    return f"{fmt_bytes(fit.intercept)} + {fmt_bytes(fit.per_n)}·N"


def decode_state_figure(da: DecodeAnalysis) -> PlotResult | None:
    """State bytes vs context N (log-log), one panel per state class; configurations with the same state at every
    N share a line labelled with all their names, the log-log slope and the affine fit; dotted: the affine fit from
    the largest measured N out to 1M, hollow markers at the N of the state table. None without state readings."""
    groups = _decode_groups(da, "state")
    if not groups:
        return None
    entries = max(len(cfg) for _, cfg, _ in groups)  # legend lines below the tallest panel: about two per entry
    fig, axes = new_figure(width=6.6 * len(groups), height=4.4 + 0.36 * entries, ncols=len(groups),
                           layout="constrained")
    result = PlotResult(FIGURE_NAMES["decode_state"], fig)
    style = styles(da.configs)
    far = max(STATE_AT_N)
    for ax, (cls, cfg, pts) in zip(axes[0], groups):
        set_scales(ax, "memory")
        series: dict[tuple, list] = {}
        for c in cfg.itertuples(index=False):
            mine = pts[pts["config"].eq(c.config)].sort_values("n")
            key = tuple(zip(mine["n"].astype(int), mine["state"].round(3)))
            series.setdefault(key, []).append(c)
        for members in sorted(series.values(), key=lambda m: -float(pts.loc[pts["config"].eq(m[0].config),
                                                                             "state"].max())):
            first = members[0]
            mine = pts[pts["config"].eq(first.config)].sort_values("n")
            s = style[first.config]
            fit, affine = da.fits.get((first.config, "state")), da.affine.get(first.config)
            label = f"{_wrap_names([m.label for m in members])}\n(∝ {fmt_slope(fit)}; {_affine_text(affine)})"
            (line,) = ax.plot(mine["n"].astype(float), mine["state"], color=s["color"], marker=s["marker"],
                              linestyle="-", linewidth=1.8, markersize=6, label=label, gid=f"state:{first.label}")
            for m in members:
                result.lines[m.label] = line
            if affine is not None and affine.n_max < far:
                ns = np.geomspace(affine.n_max, far, 40)
                ax.plot(ns, [affine.predict(n) for n in ns], color=s["color"], linestyle=":", linewidth=1.2,
                        alpha=0.8, label="_nolegend_", gid=f"extrapolated:{first.label}")
                at = [n for n in STATE_AT_N if n > affine.n_max]
                ax.plot(at, [affine.predict(n) for n in at], color=s["color"], linestyle="none", marker="o",
                        markerfacecolor="white", markersize=5, label="_nolegend_")
            for m in members:
                failed = da.points[da.points["config"].eq(m.config)].rename(
                    columns={"predicted_bytes": "_p", "predicted_state_bytes": "predicted_bytes"})
                result.markers += _draw_failures(ax, failed, m.label, style[m.config], "memory", None)
        if cls == CONSTANT:  # flat lines: leave room above and below
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo / 2, hi * 2)
        format_ticks(ax, "memory")
        ax.set_xlabel("context length N (k = 1024, M = 1024²)")
        ax.set_title(CLASS_TITLES[cls], fontsize="medium")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small", frameon=False)
    sources = sorted({s for text in da.configs["state_source"] for s in text.split("+") if s}) or ["state_bytes"]
    axes[0, 0].set_ylabel("KV cache / state after the context\n"
                          + "; ".join(f"{STATE_SOURCES[s]} ({s})" for s in sources))
    fig.suptitle(f"Decode: cache / state bytes vs context N (log-log) — {_decode_setting_title(da)}\n"
                 "dotted: the affine fit a + b·N extrapolated to N = 1M (hollow: the N of the summary's state table)",
                 fontsize="medium")
    return result


def _iqr_bars(mine: pd.DataFrame) -> np.ndarray:
    """Error bars of median ± IQR/2, the lower one kept above zero for the log axis."""
    half = (mine["time_iqr_ms"].fillna(0) / 2).to_numpy(dtype=float)
    median = mine["time_ms"].to_numpy(dtype=float)
    return np.vstack([np.minimum(half, 0.9 * median), half])


def decode_time_figure(da: DecodeAnalysis) -> PlotResult | None:
    """Per state class (rows): time per token vs N (log-log, IQR bars, fitted slope in the legend) and read GB/s
    vs N against the device's measured copy bandwidth (horizontal line; said in the panel when the sidecar has
    none). None without timings."""
    groups = _decode_groups(da, "time_ms")
    if not groups:
        return None
    fig, axes = new_figure(width=16.0, height=4.6 * len(groups) + 0.6, nrows=len(groups), ncols=2,
                           layout="constrained")
    result = PlotResult(FIGURE_NAMES["decode_time"], fig)
    style = styles(da.configs)
    copies = copy_lines(da.copy)
    copy_styles = ["--", "-."]
    for (ax_t, ax_r), (cls, cfg, pts) in zip(axes, groups):
        set_scales(ax_t, "time")
        ax_r.set_xscale("log", base=2)
        ax_r.set_yscale("log", base=10)
        for c in cfg.itertuples(index=False):
            mine = pts[pts["config"].eq(c.config)].sort_values("n")
            s = style[c.config]
            fit = da.fits.get((c.config, "time"))
            bars = ax_t.errorbar(mine["n"].astype(float), mine["time_ms"], yerr=_iqr_bars(mine), color=s["color"],
                                 marker=s["marker"], linestyle=s["linestyle"], linewidth=1.5, markersize=5,
                                 capsize=2.5, elinewidth=0.9, label=f"{c.label} (time ∝ {fmt_slope(fit)})")
            bars.lines[0].set_gid(f"time:{c.label}")
            result.lines[f"time:{c.label}"] = bars.lines[0]
            mine_all = da.points[da.points["config"].eq(c.config)]
            result.markers += _draw_failures(ax_t, mine_all, c.label, s, "time", None)
            read = mine[mine["read_gbps"] > 0]
            if len(read):
                (line,) = ax_r.plot(read["n"].astype(float), read["read_gbps"], color=s["color"], marker=s["marker"],
                                    linestyle=s["linestyle"], linewidth=1.5, markersize=5, label="_nolegend_",
                                    gid=f"read:{c.label}")
                result.lines[f"read:{c.label}"] = line
        for i, r in enumerate(copies.itertuples(index=False)):
            runs = f", median of {r.runs} runs" if r.runs > 1 else ""
            line = ax_r.axhline(r.copy_gbps, color="0.15", linestyle=copy_styles[i % 2], linewidth=1.6, zorder=1,
                                label=f"copy bandwidth (measured): {r.copy_gbps:,.2f} GB/s on {r.copy_device}{runs}",
                                gid=f"copy:{r.copy_device}")
            result.lines[f"copy:{r.copy_device}"] = line
        if copies.empty:
            ax_r.text(0.5, 0.97, "no copy bandwidth (copy_gbps) in the sidecar:\nno device reference line drawn",
                      transform=ax_r.transAxes, ha="center", va="top", color="firebrick", fontsize="medium",
                      bbox=dict(boxstyle="round", facecolor="white", edgecolor="firebrick"), gid="no-copy-bandwidth")
        format_ticks(ax_t, "time")
        format_ticks(ax_r, "time")
        ax_r.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax_t.set_ylabel("time per token (ms)\nmedian over the steps, bars ± IQR/2")
        ax_r.set_ylabel("read GB/s (10⁹ B/s)")
        ax_t.set_title(f"{CLASS_TITLES[cls]}: time per token", fontsize="medium")
        ax_r.set_title(f"{CLASS_TITLES[cls]}: bytes one step reads / its time", fontsize="medium")
        for ax in (ax_t, ax_r):
            ax.set_xlabel("context length N (k = 1024)")
        handles, labels = ax_t.get_legend_handles_labels()
        extra, extra_labels = ax_r.get_legend_handles_labels()
        ax_r.legend(handles + extra, labels + extra_labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                    borderaxespad=0.0, fontsize="small" if len(handles) <= 10 else "x-small", frameon=False)
    fig.suptitle(f"Decode: time per token and read bandwidth vs context N (log-log) — {_decode_setting_title(da)}\n"
                 "a step cannot read its state faster than the device copies memory (dashed line)", fontsize="medium")
    return result
