"""``effbench plot results.csv --against NAME``: measured rows beside a preset's published numbers.

A measured row belongs to a preset *method* (the paper's name for a mechanism, e.g. "PyTorch Attention" for
``dense``) when its mechanism is the entry's and its knobs are the entry's knobs at its N
(:meth:`effbench.presets.Preset.method_of`); rows at the preset's setting (B, H, D, the entry's dtype) are
preferred, other rows are used, with a note, only when a method has none there. Per method, mode, metric
(``time`` in ms: the median; ``memory`` in MB = 2^20 bytes: effbench's memory column, see
``effbench.analysis``) and N: the measured value (or the status of a case that could not run), the published
one, their ratio, and both against the preset's baseline method at the same N (the ratios between mechanisms).
Per method: the fitted log-log exponents (``effbench.fits.fit_loglog``) of both over the N both have, and of
the published numbers over all their N. Methods the preset lists as published only are shown with their
published numbers and exponents.

Writes ``against_<preset>.png`` (and the other formats asked for), ``against_<preset>.md`` and
``against_<preset>.csv`` (the tidy per-N table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import transforms
from matplotlib.lines import Line2D

from . import analysis, results
from .figure_base import (
    PALETTE,
    PlotResult,
    format_ticks,
    new_figure,
    save_figure,
    set_scales,
)
from .fits import Fit, fit_loglog
from .presets import Preset, PresetError, load_preset
from .status import Status

MB = float(2**20)
METRIC_COLUMNS = {"time": "time_ms", "memory": "memory_bytes"}
METRIC_UNITS = {"time": "ms", "memory": "MB"}
POINT_COLUMNS = ["method", "mechanism", "metric", "mode", "n", "measured", "status", "published", "published_note",
                 "unit", "ratio", "measured_vs_baseline", "published_vs_baseline"]
EXPONENT_COLUMNS = ["method", "mechanism", "metric", "mode", "n_common", "n_min", "n_max", "measured_slope",
                    "measured_se", "published_slope", "published_se", "published_all_slope", "published_all_n_min",
                    "published_all_n_max", "measured_all_slope", "ratio_median", "measured_vs_baseline",
                    "published_vs_baseline", "n_baseline"]


@dataclass
class AgainstReport:
    """What ``--against`` produced: the tidy tables, their display versions, notes, the figure and the files."""

    preset: Preset
    title: str
    points: pd.DataFrame
    exponents: pd.DataFrame
    points_display: pd.DataFrame
    exponent_display: pd.DataFrame
    notes: list[str]
    figure: PlotResult | None
    files: list[Path] = field(default_factory=list)
    markdown: str = ""


def load(ref: str) -> Preset:
    """The preset to compare against: PresetError when it is unknown or ships no published numbers."""
    preset = load_preset(ref)
    if not preset.published_file:
        raise PresetError(f"--against {ref}: preset {preset.ref} ships no published numbers (it is effbench's own "
                          "table); choose a preset with a 'published' column in `effbench presets`")
    return preset


# --------------------------------------------------------------------------- measured rows -> methods

def _knobs(row: pd.Series, cols: Sequence[str]) -> dict[str, Any]:
    return {c: row[c] for c in cols if c in row and not (isinstance(row[c], float) and math.isnan(row[c]))
            and row[c] is not pd.NA}


def assign_methods(df: pd.DataFrame, preset: Preset) -> tuple[pd.DataFrame, list[str]]:
    """The prefill rows of a results DataFrame that belong to a method of ``preset``, prepared
    (``analysis.prepare``) with ``method`` and ``at_setting``; and notes on rows set aside or compared loosely."""
    rows = analysis.prepare(df)
    if "phase" in rows:
        rows = rows[rows["phase"].fillna("prefill").astype(str).eq("prefill")]
    notes: list[str] = []
    if rows.empty:
        return rows.assign(method=pd.Series(dtype=str), at_setting=pd.Series(dtype=bool)), notes
    knob_cols = analysis.knob_columns(df)
    found = rows.apply(lambda r: preset.method_of(str(r["mechanism"]), _knobs(r, knob_cols), int(r["n"])), axis=1)
    rows = rows.assign(method=[m for m, _ in found], exact=[e for _, e in found])
    outside = sorted(set(rows.loc[rows["method"].isna(), "mechanism"].astype(str)))
    if outside:
        notes.append(f"rows of {', '.join(outside)} are not part of preset {preset.ref}: left out")
    rows = rows[rows["method"].notna()]
    loose = sorted(set(rows.loc[~rows["exact"].astype(bool), "method"]))
    if loose:
        notes.append(f"{', '.join(loose)}: some rows have other knobs than the preset's; they are compared anyway")
    dtypes = {e.method: e.dtype or preset.dtype for e in preset.all_entries()}
    rows = rows.assign(at_setting=rows["batch"].astype(int).eq(preset.batch) & rows["heads"].astype(int).eq(preset.heads)
                       & rows["head_dim"].astype(int).eq(preset.head_dim)
                       & rows["dtype"].astype(str).eq(rows["method"].map(dtypes)))
    keep = []
    for method, group in rows.groupby("method", sort=False):
        if group["at_setting"].any():
            keep.append(group[group["at_setting"]])
        else:
            keep.append(group)
            s = group.iloc[0]
            notes.append(f"{method}: no row at the preset's setting (B={preset.batch} H={preset.heads} "
                         f"D={preset.head_dim} {dtypes[method]}); compared at B={s['batch']} H={s['heads']} "
                         f"D={s['head_dim']} {s['dtype']}: the absolute ratios say little, the exponents still do")
    return (pd.concat(keep) if keep else rows.iloc[0:0]), notes


def measured_points(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, mode, metric, N): the median of the ok rows (ms; MB = 2^20 bytes), or the last status
    of a case that could not run."""
    records = []
    for (method, mode, n), group in rows.groupby(["method", "mode", "n"], sort=False):
        ok = group[group["status"].eq(Status.OK)]
        for metric, col in METRIC_COLUMNS.items():
            values = ok[col].dropna() if len(ok) else pd.Series(dtype=float)
            values = values[values > 0]
            value = float(values.median()) / (MB if metric == "memory" else 1.0) if len(values) else math.nan
            status = Status.OK.value if len(ok) else str(group["status"].iloc[-1])
            if status == Status.OK.value and math.isnan(value):
                status = "no reading"
            records.append({"method": method, "mechanism": str(group["mechanism"].iloc[0]), "mode": mode,
                            "metric": metric, "n": int(n), "measured": value, "status": status})
    return pd.DataFrame.from_records(records, columns=["method", "mechanism", "mode", "metric", "n", "measured",
                                                       "status"])


# --------------------------------------------------------------------------- the comparison

def method_order(preset: Preset, pub: pd.DataFrame) -> list[str]:
    """The preset's methods in its order, then the published-only ones, then any other method of the table."""
    order = [e.method for e in preset.all_entries()] + [p.get("method", "") for p in preset.published_only]
    return list(dict.fromkeys(order + list(pub["method"].unique())))


def compare(measured: pd.DataFrame, pub: pd.DataFrame, preset: Preset) -> pd.DataFrame:
    """The per-N table (:data:`POINT_COLUMNS`) over the (mode, metric) pairs the paper reports."""
    pairs = pub[["mode", "metric"]].drop_duplicates()
    mine = measured.merge(pairs, on=["mode", "metric"])
    theirs = pub.rename(columns={"value": "published", "note": "published_note"})[
        ["method", "mechanism", "mode", "metric", "n", "published", "published_note", "unit"]]
    pts = theirs.merge(mine.drop(columns="mechanism"), on=["method", "mode", "metric", "n"], how="outer")
    pts["mechanism"] = pts["mechanism"].fillna(pts["method"].map(
        {e.method: e.mechanism for e in preset.all_entries()})).fillna("")
    pts["unit"] = pts["unit"].fillna(pts["metric"].map(METRIC_UNITS))
    pts["published_note"] = pts["published_note"].fillna("")
    pts["status"] = pts["status"].fillna("")
    pts["ratio"] = _div(pts["measured"], pts["published"])
    base = preset.baseline
    if base is not None:
        keys = ["mode", "metric", "n"]
        b = pts[pts["method"].eq(base)].set_index(keys)
        idx = pd.MultiIndex.from_frame(pts[keys])
        pts["measured_vs_baseline"] = _div(pts["measured"], pd.Series(b["measured"].reindex(idx).to_numpy(), pts.index))
        pts["published_vs_baseline"] = _div(pts["published"],
                                            pd.Series(b["published"].reindex(idx).to_numpy(), pts.index))
    else:
        pts["measured_vs_baseline"] = pts["published_vs_baseline"] = math.nan
    order = {m: i for i, m in enumerate(method_order(preset, pub))}
    pair_order = {tuple(p): i for i, p in enumerate(pairs.itertuples(index=False))}
    pts = pts.assign(_m=pts["method"].map(order), _p=[pair_order[(a, b)] for a, b in zip(pts["mode"], pts["metric"])])
    return pts.sort_values(["_p", "_m", "n"]).drop(columns=["_m", "_p"]).reset_index(drop=True)[POINT_COLUMNS]


def _div(a: pd.Series, b: pd.Series) -> pd.Series:
    a, b = pd.to_numeric(a, errors="coerce").astype(float), pd.to_numeric(b, errors="coerce").astype(float)
    return (a / b).where((a > 0) & (b > 0))


def exponents(pts: pd.DataFrame) -> pd.DataFrame:
    """Per (method, metric, mode): exponents of measured and published over the N both have, of the published over
    all its N and of the measured over all its ok N; the median ratio; both against the baseline at the largest
    N both have (:data:`EXPONENT_COLUMNS`)."""
    records = []
    for (method, metric, mode), g in pts.groupby(["method", "metric", "mode"], sort=False):
        both = g[(g["measured"] > 0) & (g["published"] > 0)].sort_values("n")
        fm = fit_loglog(both["n"], both["measured"])
        fp = fit_loglog(both["n"], both["published"])
        pub_all = g[g["published"] > 0]
        fpa = fit_loglog(pub_all["n"], pub_all["published"])
        fma = fit_loglog(g.loc[g["measured"] > 0, "n"], g.loc[g["measured"] > 0, "measured"])
        vs = both.dropna(subset=["measured_vs_baseline", "published_vs_baseline"])
        last = vs.iloc[-1] if len(vs) else None
        records.append({
            "method": method, "mechanism": g["mechanism"].iloc[0], "metric": metric, "mode": mode,
            "n_common": len(both), "n_min": int(both["n"].min()) if len(both) else pd.NA,
            "n_max": int(both["n"].max()) if len(both) else pd.NA,
            **_fit_cols("measured", fm), **_fit_cols("published", fp),
            "published_all_slope": fpa.slope if fpa else math.nan,
            "published_all_n_min": fpa.n_min if fpa else pd.NA, "published_all_n_max": fpa.n_max if fpa else pd.NA,
            "measured_all_slope": fma.slope if fma else math.nan,
            "ratio_median": float(both["ratio"].median()) if len(both) else math.nan,
            "measured_vs_baseline": float(last["measured_vs_baseline"]) if last is not None else math.nan,
            "published_vs_baseline": float(last["published_vs_baseline"]) if last is not None else math.nan,
            "n_baseline": int(last["n"]) if last is not None else pd.NA})
    return pd.DataFrame.from_records(records, columns=EXPONENT_COLUMNS)


def _fit_cols(prefix: str, fit: Fit | None) -> dict[str, float]:
    return {f"{prefix}_slope": fit.slope if fit else math.nan, f"{prefix}_se": fit.slope_se if fit else math.nan}


# --------------------------------------------------------------------------- display

def _num(value: Any, digits: int = 2) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    if math.isnan(value):
        return "—"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if value >= 0.01 else f"{value:.2g}"


def _slope(slope: float, se: float = math.nan) -> str:
    if not math.isfinite(slope):
        return "—"
    return f"N^{slope:.2f}".replace("N^-0.00", "N^0.00") + (f"±{se:.2f}" if math.isfinite(se) else "")


def _ratio(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{value:.3g}×"


def measured_pairs(pts: pd.DataFrame) -> set[tuple[str, str]]:
    """The (metric, mode) pairs with at least one measured value."""
    got = pts[pts["measured"] > 0]
    return set(zip(got["metric"], got["mode"]))


def display_exponents(ex: pd.DataFrame, preset: Preset, pairs: set[tuple[str, str]] | None = None) -> pd.DataFrame:
    """The exponent table for people (``pairs``: only these (metric, mode) pairs)."""
    only = {p.get("method") for p in preset.published_only}
    out = []
    for r in ex.itertuples(index=False):
        if pairs is not None and (r.metric, r.mode) not in pairs:
            continue
        common = ("—" if not r.n_common else f"{int(r.n_min):,} ({r.n_common})" if r.n_min == r.n_max
                  else f"{int(r.n_min):,}–{int(r.n_max):,} ({r.n_common})")
        pub_all = (f"{_slope(r.published_all_slope)} ({int(r.published_all_n_min):,}–{int(r.published_all_n_max):,})"
                   if math.isfinite(r.published_all_slope) else "—")
        measured = ("published only" if r.method in only else _slope(r.measured_slope, r.measured_se))
        if r.method not in only and not r.n_common:
            measured = f"no common N (all measured: {_slope(r.measured_all_slope)})" \
                if math.isfinite(r.measured_all_slope) else "not measured"
        vs = ("(the baseline)" if r.method == preset.baseline else
              f"{_ratio(r.measured_vs_baseline)} / {_ratio(r.published_vs_baseline)} at {int(r.n_baseline):,}"
              if not pd.isna(r.n_baseline) else "—")
        out.append({"method": r.method, "mechanism": r.mechanism or "(published only)",
                    "metric": f"{r.metric} ({METRIC_UNITS[r.metric]}) {r.mode}", "N (both)": common,
                    "exponent measured": measured, "exponent published (same N)": _slope(r.published_slope, r.published_se),
                    "published, all its N": pub_all, "measured / published (median)": _ratio(r.ratio_median),
                    f"vs {preset.baseline or 'baseline'}: measured / published": vs})
    return pd.DataFrame(out)


def display_points(pts: pd.DataFrame, only_measured: bool = False) -> pd.DataFrame:
    """The per-N table for people (``only_measured``: the rows with a measurement or a status)."""
    rows = pts[~pts["status"].isin(["", "no reading"])] if only_measured else pts
    out = []
    for r in rows.itertuples(index=False):
        measured = _num(r.measured) if r.status in ("ok", "") else r.status
        published = _num(r.published) if math.isfinite(r.published) else (
            "— (OOM)" if r.published_note.startswith("out of memory") else
            "— (not run)" if r.published_note.startswith("not run") else "—")
        out.append({"method": r.method, "mechanism": r.mechanism or "(published only)",
                    "metric": f"{r.metric} ({r.unit}) {r.mode}", "N": f"{int(r.n):,}", "measured": measured,
                    "published": published, "measured / published": _ratio(r.ratio),
                    "vs baseline: measured": _ratio(r.measured_vs_baseline),
                    "vs baseline: published": _ratio(r.published_vs_baseline)})
    return pd.DataFrame(out, columns=["method", "mechanism", "metric", "N", "measured", "published",
                                      "measured / published", "vs baseline: measured", "vs baseline: published"])


def hardware_note(preset: Preset, rows: pd.DataFrame, pub: pd.DataFrame) -> str:
    """Absolute values depend on the hardware; the exponents and the ratios between mechanisms should carry over."""
    hw = preset.source.get("hardware") or "; ".join(sorted(set(pub["hardware"]) - {""})) or "the paper's machine"
    devices = rows.get("device_name", pd.Series(dtype=str)).dropna().astype(str)
    devices = devices[devices.str.strip().ne("")]
    here = ", ".join(sorted(set(devices))) or ", ".join(sorted(set(rows.get("device", pd.Series(dtype=str)).astype(str))))
    return (f"Absolute values depend on the hardware: the paper measured on {hw}, these rows ran on "
            f"{here or 'this machine'}. The fitted exponents and the ratios between mechanisms (the 'vs "
            f"{preset.baseline or 'baseline'}' columns) should carry over; measured / published mostly says how much "
            "faster the paper's device is, and on a GPU the smallest N are launch-bound (flat), which lowers a "
            "published exponent fitted over them.")


def memory_note(rows: pd.DataFrame) -> str | None:
    """What the two memory numbers are, when the comparison has memory."""
    sources = sorted(set(rows.loc[rows["status"].eq(Status.OK), "memory_source"].astype(str)) - {""})
    if not sources:
        return None
    what = ", ".join(analysis.MEMORY_SOURCES.get(s, s) + f" ({s})" for s in sources)
    return ("Memory: published MB are 2^20 bytes of the device allocator's peak (everything allocated, the inputs "
            f"included); measured: {what}, which counts what the call allocates, not its inputs: expect the "
            "measured value below the published one, most at small N, where the inputs weigh most.")


# --------------------------------------------------------------------------- the figure

def draw(pts: pd.DataFrame, preset: Preset, title: str) -> PlotResult | None:
    """Measured (solid, filled markers) and published (dashed, hollow) vs N on log-log axes, one panel per (metric,
    mode) the paper reports, one colour per method; cases that could not run marked on the top edge."""
    pairs = list(dict.fromkeys(zip(pts["metric"], pts["mode"])))
    if not pairs:
        return None
    methods = list(dict.fromkeys(pts["method"]))
    colour = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    only = {p.get("method") for p in preset.published_only}
    fig, axes = new_figure(width=5.4 * len(pairs) + 3.2, height=5.2, ncols=len(pairs), layout="constrained")
    result = PlotResult(f"against_{preset.name}", fig)
    for ax, (metric, mode) in zip(axes[0], pairs):
        set_scales(ax, "time")
        panel = pts[pts["metric"].eq(metric) & pts["mode"].eq(mode)]
        for method in methods:
            g = panel[panel["method"].eq(method)].sort_values("n")
            pub = g[g["published"] > 0]
            if len(pub):
                (line,) = ax.plot(pub["n"].astype(float), pub["published"], color=colour[method], linestyle="--",
                                  marker="o", markerfacecolor="white", markersize=5,
                                  linewidth=1.0 if method in only else 1.4, alpha=0.55 if method in only else 0.9,
                                  gid=f"published:{metric}:{mode}:{method}")
                result.lines[f"published:{metric}:{mode}:{method}"] = line
            mine = g[g["measured"] > 0]
            if len(mine):
                (line,) = ax.plot(mine["n"].astype(float), mine["measured"], color=colour[method], linestyle="-",
                                  marker="o", markersize=5, linewidth=1.8, gid=f"measured:{metric}:{mode}:{method}")
                result.lines[f"measured:{metric}:{mode}:{method}"] = line
            failed = g[~g["status"].isin(["", Status.OK.value, "no reading"])]
            if len(failed):
                edge = transforms.blended_transform_factory(ax.transData, ax.transAxes)
                ax.plot(failed["n"].astype(float), np.ones(len(failed)), transform=edge, color=colour[method],
                        linestyle="none", marker="x", markersize=8, markeredgewidth=2, clip_on=False,
                        gid=f"failed:{metric}:{mode}:{method}")
        ax.autoscale_view()
        format_ticks(ax, "time")
        ax.set_xlabel("sequence length N (k = 1024)")
        ax.set_ylabel("time per call (ms)" if metric == "time" else "peak memory (MB = 2^20 bytes)")
        ax.set_title(f"{metric} — {mode}", fontsize="medium")
    handles = [Line2D([], [], color="0.15", linestyle="-", marker="o", markersize=5, label="measured here"),
               Line2D([], [], color="0.15", linestyle="--", marker="o", markerfacecolor="white", markersize=5,
                      label=f"published ({preset.source.get('hardware', 'paper')})"),
               Line2D([], [], color="0.15", linestyle="none", marker="x", markeredgewidth=2,
                      label="could not run here (status; top edge)")]
    mech = dict(zip(pts["method"], pts["mechanism"]))
    for method in methods:
        label = f"{method} (published only)" if method in only or not mech.get(method) else (
            f"{method} = {mech[method]}" if mech[method] != method else method)
        handles.append(Line2D([], [], color=colour[method], linewidth=3, label=label))
    fig.legend(handles=handles, loc="outside right center", fontsize="small", frameon=False)
    fig.suptitle(title, fontsize="medium")
    return result


# --------------------------------------------------------------------------- the whole report

def make_against(csv_path: str | Path, preset: Preset | str, out_dir: str | Path,
                 formats: Sequence[str] = ("png",)) -> AgainstReport:
    """Compare the results file with the preset's published numbers; write the figure, the Markdown and the CSV."""
    preset = load(preset) if isinstance(preset, str) else preset
    pub = preset.published()
    rows, notes = assign_methods(results.read_results(csv_path), preset)
    pts = compare(measured_points(rows), pub, preset)
    ex = exponents(pts)
    src = preset.source
    title = (f"{preset.ref}: measured here (solid) vs published (dashed)\npublished: {src.get('cite', preset.name)}, "
             f"arXiv {src.get('arxiv', '')}, on {src.get('hardware', 'the paper machine')}")
    notes = [hardware_note(preset, rows, pub)] + ([m] if (m := memory_note(rows)) else []) + notes
    if rows.empty:
        notes.append(f"no row of {Path(csv_path).name} belongs to preset {preset.ref}: only the published numbers "
                     f"are shown (run `effbench sweep --preset {preset.name}` or `effbench estimate --preset "
                     f"{preset.name} --out ...`)")
    missing = sorted(set(pub.loc[pub["mechanism"].ne(""), "method"]) - set(rows["method"]) if len(rows) else set())
    if missing and len(rows):
        notes.append(f"not measured in this file: {', '.join(missing)}")
    left_out = sorted({f"{m} {d}" for m, d in zip(pts["metric"], pts["mode"])} -
                      {f"{m} {d}" for m, d in measured_pairs(pts)})
    if left_out and len(rows):
        notes.append(f"no measured value for {', '.join(left_out)} in this file (not run, or predictions only): left "
                     f"out of the printed tables; the published numbers are in against_{preset.name}.md and the figure")
    report = AgainstReport(preset=preset, title=title, points=pts, exponents=ex,
                           points_display=display_points(pts, only_measured=True),
                           exponent_display=display_exponents(ex, preset, measured_pairs(pts)), notes=notes,
                           figure=draw(pts, preset, title))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if report.figure is not None:
        report.files += save_figure(report.figure, out, list(formats))
    pts.to_csv(out / f"against_{preset.name}.csv", index=False)
    report.files.append(out / f"against_{preset.name}.csv")
    report.markdown = markdown(report, Path(csv_path))
    (out / f"against_{preset.name}.md").write_text(report.markdown)
    report.files.append(out / f"against_{preset.name}.md")
    return report


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(none)\n"
    def esc(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def markdown(report: AgainstReport, csv_path: Path) -> str:
    """``against_<preset>.md``: source, notes, the exponent table, the preset's entries and the per-N table."""
    from .presets import entries_table

    p, src = report.preset, report.preset.source
    parts = [f"# {p.ref} — measured here vs published\n",
             (f"Results: `{csv_path}`. Published: {src.get('paper', '')}, arXiv {src.get('arxiv', '')}, "
              f"{src.get('tables', '')}; hardware: {src.get('hardware', '')}.\n"),
             f"Preset: {p.description}\n"]
    parts += [f"- {n}" for n in report.notes] + [""]
    parts += ["## Exponents and ratios\n", _md_table(display_exponents(report.exponents, p))]
    parts += ["## The preset's methods\n", _md_table(pd.DataFrame(list(entries_table(p)))),
              *[f"- {n}" for n in p.notes], "", f"Published values checked: {p.checked}\n" if p.checked else ""]
    parts += ["## Per N\n", _md_table(display_points(report.points))]
    figures = [f for f in report.files if f.suffix not in (".md", ".csv")]
    if figures:
        parts += ["## Figure\n", *[f"![{f.stem}]({f.name})" for f in figures if f.suffix == ".png"], ""]
    return "\n".join(parts)
