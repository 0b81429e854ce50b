"""What a results file says, for people: display tables (strings), highlight lines, notes and summary.md.

Everything here formats an :class:`effbench.analysis.Analysis` (the prefill rows) and an
:class:`effbench.decode_analysis.DecodeAnalysis` (the decode rows); it computes no fit, crossover or
budget itself. Position encodings have their own tables and are absent from the attention ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .analysis import MEMORY_SOURCES, Analysis
from .decode_analysis import CLASS_TITLES, STATE_AT_N, STATE_SOURCES, DecodeAnalysis, DecodeComparison, copy_lines
from .fits import BASELINES, FAILED_STATUSES, METRICS, AffineFit, Fit, verdict
from .positions import Positions
from .status import Status
from .units import NOISY_IQR, fmt_bytes, fmt_ms, is_noisy


def fmt_n(n: Any) -> str:
    """A sequence length with thousands separators."""
    return f"{int(n):,}"


def fmt_slope(fit: Fit | None) -> str:
    """``N^1.02±0.01`` (no ± with 2 points), or a dash without a fit."""
    if fit is None:
        return "—"
    text = f"N^{fit.slope:.2f}".replace("N^-0.00", "N^0.00")  # a flat fit's float noise is no sign
    return text + (f"±{fit.slope_se:.2f}" if math.isfinite(fit.slope_se) else "")


def fmt_ratio(ratio: float) -> str:
    """A ratio as ``180.5×`` (``0.33×`` below 1); a dash when undefined."""
    if not math.isfinite(ratio):
        return "—"
    return f"{ratio:,.1f}×" if ratio >= 1 else f"{ratio:.2f}×"


def memory_axis_label(cfg: pd.DataFrame) -> str:
    """Which reading the memory numbers are (tracker, CUDA allocator, prediction, or a mix), on two lines."""
    used = sorted({s for text in cfg["memory_source"] for s in text.split("+") if s})
    if not used:
        used = ["peak_tensor_bytes"]
    names = [f"{MEMORY_SOURCES.get(s, s)} ({s})" for s in used]
    return "peak memory per call\n" + ("; ".join(names) if len(names) < 3 else ", ".join(used))


# --------------------------------------------------------------------------- attention tables

def _cell(point: Any, metric: str) -> str:
    """One textbook cell: the value of an ok point, else its status (with the predicted bytes of a failure)."""
    if point is None:
        return ""
    status = point.status
    if status == Status.OK:
        return fmt_bytes(point.memory_bytes) if metric == "memory" else fmt_ms(point.time_ms)
    if metric == "memory" and pd.notna(point.predicted_bytes) and status in FAILED_STATUSES:
        return f"{status} (≈{fmt_bytes(point.predicted_bytes)})"
    return str(status)


def textbook_tables(pts: pd.DataFrame, reps: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The textbook tables (rows = N; columns N, N² score entries, then one column per mechanism's representative),
    as display strings: ``{"memory": ..., "time": ...}`` ("time" left out when the file has no timings).
    A failed case shows its status."""
    mine = pts[pts["config"].isin(reps["config"])]
    ns = sorted(mine["n"].dropna().astype(int).unique())
    by_key = {(r.config, int(r.n)): r for r in mine.itertuples(index=False)}
    tables = {}
    for metric in METRICS:
        if metric == "time" and not mine["time_ms"].notna().any():
            continue  # a file of predictions (effbench estimate --out) has no timings
        data: dict[str, list[str]] = {"N": [fmt_n(n) for n in ns], "N² (scores)": [fmt_n(n * n) for n in ns]}
        for rep in reps.itertuples(index=False):
            data[rep.mechanism] = [_cell(by_key.get((rep.config, n)), metric) for n in ns]
        tables[metric] = pd.DataFrame(data)
    return tables


def full_table(pts: pd.DataFrame, cfg: pd.DataFrame) -> pd.DataFrame:
    """Every configuration at every N (display strings): label, setting, N, status, memory, time ± IQR, predicted."""
    merged = pts.merge(cfg[["config", "label", "setting", "order"]], on="config").sort_values(["order", "n"])
    ok = merged["status"].eq(Status.OK)
    return pd.DataFrame({
        "configuration": merged["label"], "setting": merged["setting"], "N": merged["n"].map(fmt_n),
        "status": merged["status"],
        "peak memory": [fmt_bytes(m) if s else "" for m, s in zip(merged["memory_bytes"], ok)],
        "time (ms, median ± IQR)": [fmt_ms(t, i) if s else "" for t, i, s in
                                    zip(merged["time_ms"], merged["time_iqr_ms"], ok)],
        "predicted": merged["predicted_bytes"].map(lambda b: fmt_bytes(b) if pd.notna(b) else ""),
        "note": [(str(e)[:80] if not s and isinstance(e, str) else "") for e, s in zip(merged["error"], ok)],
    }).reset_index(drop=True)


def slopes_display(cfg: pd.DataFrame, fitted: dict[tuple[str, str], Fit]) -> pd.DataFrame:
    """Slopes, one row per configuration: memory and time exponents ± standard error, with verdicts."""
    rows = []
    for _, c in cfg.iterrows():
        mem, tim = fitted.get((c["config"], "memory")), fitted.get((c["config"], "time"))
        rows.append({"configuration": c["label"], "ok points": int(c["n_ok_points"]),
                     "memory ∝": fmt_slope(mem), "memory": verdict(mem.slope) if mem else "—",
                     "time ∝": fmt_slope(tim), "time": verdict(tim.slope) if tim else "—"})
    return pd.DataFrame(rows)


def crossover_display(cross: pd.DataFrame) -> pd.DataFrame:
    """Crossover verdicts pivoted: one row per configuration, a column per (metric, baseline)."""
    if cross.empty:
        return pd.DataFrame()
    cross = cross.assign(column=cross["metric"] + " vs " + cross["baseline"])
    wide = cross.pivot_table(index="label", columns="column", values="verdict", aggfunc="first", sort=False)
    order = [f"{m} vs {b}" for m in METRICS for b in BASELINES if f"{m} vs {b}" in wide.columns]
    return wide[order].fillna("—").reset_index().rename(columns={"label": "configuration"})


def _budget_how(r: pd.Series) -> str:
    """How a budget N was obtained: within or extrapolated from which measured range, from how many points."""
    if pd.isna(r["n_max"]):
        return r["verdict"]
    span = f"{fmt_n(r['fit_n_min'])}–{fmt_n(r['fit_n_max'])}"
    pred = f", {r['predicted_points']} predicted" if r["predicted_points"] else ""
    where = f"extrapolated from N {span}" if r["extrapolated"] else f"within measured N {span}"
    return where + f" ({r['points']} points{pred}, ∝ N^{r['slope']:.2f})"


def budget_display(budget: pd.DataFrame) -> pd.DataFrame:
    """The budget table for people: largest N (or why there is none), how it was obtained, and the largest
    measured N whose memory is under the budget."""
    return pd.DataFrame({
        "configuration": budget["label"],
        "largest N": budget["n_max"].map(lambda n: fmt_n(n) if pd.notna(n) else "—"),
        "how": [_budget_how(r) for _, r in budget.iterrows()],
        "largest ok N under budget": budget["largest_measured_n"].map(lambda n: fmt_n(n) if pd.notna(n) else "—"),
    })


def _setting_word(setting: str, main: str) -> str:
    """How ``setting`` differs from the main one, for a label: "causal" when that is all, else the whole setting."""
    return "causal" if setting == main.replace(" bidirectional", " causal") else setting


def highlight_lines(comparisons: pd.DataFrame, main: str) -> list[str]:
    """hyperfine-style lines from ``Analysis.comparisons``
    ("my-attn[window=256] is 12.3× faster and uses 8.1× less memory than dense at N=16,384")."""
    lines = []
    for c in comparisons.itertuples(index=False):
        base = c.baseline if c.setting == main else f"{c.baseline} ({_setting_word(c.setting, main)})"
        parts = []
        if (r := c.time_ratio) > 0:  # NaN compares False
            parts.append(f"is {r:.1f}× faster" if r >= 1 else f"is {1 / r:.1f}× slower")
        if (r := c.memory_ratio) > 0:
            parts.append(f"uses {r:.1f}× less memory" if r >= 1 else f"uses {1 / r:.1f}× more memory")
        if parts:
            lines.append(f"{c.label} {' and '.join(parts)} than {base} at N={fmt_n(c.n)}")
        if pd.notna(c.largest_n):
            lines.append(f"{c.label} ran to N={fmt_n(c.largest_n)}, beyond {base}'s largest ok N="
                         f"{fmt_n(c.baseline_largest_n)}")
    return lines


# --------------------------------------------------------------------------- position encodings

def positions_table(pos: Positions) -> pd.DataFrame:
    """Rows = N; per representative position encoding (the reference first) its parameters and peak memory,
    then reference ÷ each other encoding, in parameters and in memory (display strings)."""
    reps = pos.representatives
    ordered = sorted(reps.itertuples(index=False), key=lambda r: r.config != pos.reference)
    ns = sorted(pos.points["n"].dropna().astype(int).unique())
    by_key = {(p.config, int(p.n)): p for p in pos.points.itertuples(index=False)}
    data: dict[str, list[str]] = {"N": [fmt_n(n) for n in ns]}
    for rep in ordered:
        cells = [by_key.get((rep.config, n)) for n in ns]
        data[f"{rep.mechanism} params"] = [_param_cell(p) for p in cells]
        data[f"{rep.mechanism} peak memory"] = [_cell(p, "memory") for p in cells]
    names = reps.set_index("config")["mechanism"]
    for config, group in pos.ratios.groupby("config", sort=False):
        ratios = group.set_index("n")
        what = f"{names[pos.reference]} ÷ {names[config]}"
        for quantity in ("params", "memory"):
            data[f"{what} ({quantity})"] = [fmt_ratio(ratios.at[n, f"{quantity}_ratio"]) if n in ratios.index
                                            else "" for n in ns]
    return pd.DataFrame(data)


def _param_cell(point: Any) -> str:
    """Parameter bytes of an ok point ("—" when the file has no parameter count), else its status."""
    if point is None:
        return ""
    return fmt_bytes(point.param_bytes) if point.status == Status.OK else str(point.status)


def positions_slopes(pos: Positions, fitted: dict[tuple[str, str], Fit]) -> pd.DataFrame:
    """One row per position configuration: parameter, memory and time exponents ± standard error."""
    rows = []
    for _, c in pos.configs.iterrows():
        params, memory = pos.fits.get((c["config"], "params")), pos.fits.get((c["config"], "memory"))
        rows.append({"configuration": c["label"], "ok points": int(c["n_ok_points"]),
                     "params ∝": fmt_slope(params), "memory ∝": fmt_slope(memory),
                     "time ∝": fmt_slope(fitted.get((c["config"], "time")))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- all tables of a file

@dataclass
class Summary:
    """The display tables of one analysis (strings, ready for Markdown or the terminal)."""

    textbook: dict[str, pd.DataFrame]  # "memory" / "time": rows = N, one column per attention mechanism
    slopes: pd.DataFrame  # attention configurations
    crossovers: pd.DataFrame
    budget: pd.DataFrame | None
    full: pd.DataFrame  # every configuration at every N
    highlights: list[str] = field(default_factory=list)
    positions: pd.DataFrame | None = None  # rows = N, parameters and memory per position encoding
    position_slopes: pd.DataFrame | None = None


def summarise(an: Analysis) -> Summary:
    """Every display table of ``an``."""
    pos = an.positions
    return Summary(
        textbook=textbook_tables(an.points, an.representatives), slopes=slopes_display(an.attention, an.fits),
        crossovers=crossover_display(an.crossovers),
        budget=budget_display(an.budget) if an.budget is not None else None,
        full=full_table(an.points, an.configs), highlights=highlight_lines(an.comparisons, an.setting),
        positions=positions_table(pos) if pos is not None else None,
        position_slopes=positions_slopes(pos, an.fits) if pos is not None else None)


def data_notes(an: Analysis) -> list[str]:
    """What the reader should know about the rows: statuses not plotted, noisy timings."""
    notes = []
    counts = an.rows["status"].value_counts()
    hidden = {s: int(counts[s]) for s in (Status.ERROR, Status.SKIPPED) if s in counts}
    if hidden:
        notes.append(", ".join(f"{v} {k}" for k, v in hidden.items()) + " row(s) not plotted (listed in summary.md)")
    ok = an.points[an.points["status"].eq(Status.OK)]
    noisy = sum(is_noisy(m, i) for m, i in zip(ok["time_ms"], ok["time_iqr_ms"]))
    if noisy:
        notes.append(f"{noisy} timing(s) have IQR above {NOISY_IQR:.0%} of the median: slopes of time are less "
                     "certain (re-run with --warmup 3 or --min-time 2 for steadier timings)")
    return notes


# --------------------------------------------------------------------------- Markdown

def md_table(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (cells escaped; numeric-looking columns right-aligned)."""
    if df.empty:
        return "_(empty)_\n"

    def esc(v: Any) -> str:
        text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    def numeric(col) -> bool:
        vals = [str(v) for v in df[col] if str(v) not in ("", "—")]
        return bool(vals) and all(re.match(r"^[\d,.\s]+(ms|[KMGT]i?B|B|×|%)?( ± [\d,.]+)?( †)?$", v) for v in vals)

    align = ["---:" if numeric(c) else "---" for c in df.columns]
    lines = ["| " + " | ".join(esc(c) for c in df.columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _md_header(an: Analysis, csv_path: Path) -> list[str]:
    """Title, source counts, units and the representative of each attention mechanism."""
    counts = an.rows["status"].value_counts()
    lines = [f"# effbench summary: {csv_path.name}", "",
             f"Source: `{csv_path}`: {len(an.rows)} rows, {len(an.configs)} configurations; statuses: "
             + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", "",
             f"Memory axis: {memory_axis_label(an.attention).replace(chr(10), ': ')}. Time: median per call (ms). "
             "Bytes in binary units (MiB = 2^20 B).", "",
             f"The textbook tables show one configuration per mechanism (the one with the most ok rows, "
             f"in the setting `{an.setting}` where it ran there); every configuration is in the last table.", ""]
    lines += [f"- **{r.mechanism}**: `{r.label}` ({int(r.n_ok_points)} ok N" +
              (f"; setting `{r.setting}`" if r.setting != an.setting else "") + ")"
              for r in an.representatives.itertuples()]
    return lines


def _md_attention(s: Summary, budget_bytes: int | None) -> list[str]:
    """Textbook tables, slopes, crossovers and the budget (attention configurations)."""
    lines = ["", "## Peak memory per call", "", md_table(s.textbook["memory"])]
    if "time" in s.textbook:
        lines += ["## Time per call (ms, median)", "", md_table(s.textbook["time"])]
    lines += ["## Fitted log-log slopes", "",
              "Least squares of log y on log N over the ok points, ± the standard error of the slope (≥ 3 points). "
              "Verdict: ≈N below 1.25, ≈N² above 1.75, in between otherwise (sub-linear below 0.75).", "",
              md_table(s.slopes),
              "## Crossover N*", "",
              "Where each configuration becomes cheaper than dense / sdpa (same setting), from the two log-log fits; "
              "reported when within a factor 2 of the measured range.", "",
              md_table(s.crossovers)]
    if s.budget is not None and budget_bytes:
        lines += [f"## Largest N under {fmt_bytes(budget_bytes)}", "",
                  "From the memory trend (measured, plus predicted bytes of cases that could not run), rounded down.",
                  "", md_table(s.budget)]
    return lines


def _md_positions(an: Analysis, s: Summary) -> list[str]:
    """The position encodings' own section: parameters and memory per N, the ratio to the reference, slopes."""
    pos = an.positions
    if pos is None or s.positions is None:
        return []
    lines = ["## Position encodings", "",
             "Mechanisms declared `comparable = \"position\"` are not attention: they are left out of the attention "
             "tables, figures, crossovers, budget and highlights, and shown here (figure `positions_vs_n`). "
             "Parameters are `param_bytes`; peak memory is per call, as above."]
    if pos.reference is not None:
        ref = pos.representatives.set_index("config").at[pos.reference, "mechanism"]
        lines += ["", f"Each encoding is compared with `{ref}`, the one whose parameters grow fastest with N "
                      "(reference ÷ encoding: how many times fewer bytes the encoding needs)."]
    lines += [""] + [f"- **{r.mechanism}**: `{r.label}` ({int(r.n_ok_points)} ok N)"
                     for r in pos.representatives.itertuples()]
    lines += ["", md_table(s.positions), "Log-log slopes of the position encodings:", "", md_table(s.position_slopes)]
    return lines


def _md_figures(files: list[Path], out_dir: Path) -> list[str]:
    """Links to the figures written (images embedded for png/svg/jpg)."""
    figs = [f for f in files if f.suffix.lstrip(".") in ("png", "svg", "jpg", "jpeg", "pdf")]
    if not figs:
        return []
    lines = ["## Figures", ""]
    for f in figs:
        rel = f.relative_to(out_dir) if f.is_relative_to(out_dir) else f
        lines.append(f"![{f.stem}]({rel})" if f.suffix in (".png", ".svg", ".jpg") else f"- [{f.name}]({rel})")
    return lines + [""]


def markdown(an: Analysis | None, s: Summary | None, csv_path: Path, files: list[Path], out_dir: Path,
             budget_bytes: int | None, notes: list[str], decode: DecodeAnalysis | None = None,
             d: DecodeSummary | None = None, decode_rows: int = 0) -> str:
    """summary.md: textbook tables, slopes, crossovers, budget, position encodings (prefill rows), the decode
    section (decode rows), highlights, notes, figures and the full tables. ``decode_rows``: how many decode rows
    the file has (said in the header of a file with prefill rows too)."""
    lines = []
    if an is not None and s is not None:
        lines += _md_header(an, csv_path)
        if decode_rows:
            lines += ["", f"The file also has {decode_rows} decode row(s) (`phase = decode`): they are in the "
                          "*Decode* section and nowhere else; every prefill table and figure uses prefill rows only."]
        lines += _md_attention(s, budget_bytes) + _md_positions(an, s)
    elif decode is not None:
        counts = decode.rows["status"].value_counts()
        lines += [f"# effbench summary: {csv_path.name}", "",
                  f"Source: `{csv_path}`: {len(decode.rows)} decode rows, {len(decode.configs)} configurations; "
                  "statuses: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ". No prefill rows with status "
                  "ok: only the decode section. Bytes in binary units (MiB = 2^20 B)."]
    if decode is not None and d is not None:
        lines += _md_decode(decode, d, budget_bytes)
    highlights = (s.highlights if s is not None else []) + (d.highlights if d is not None else [])
    if highlights:
        lines += ["## Highlights", ""] + [f"- {h}" for h in highlights] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += _md_figures(files, out_dir)
    if s is not None:
        lines += ["## All configurations", "", md_table(s.full)]
    if d is not None:
        lines += ["## Decode: all configurations", "", md_table(d.full)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- decode

def fmt_affine(fit: AffineFit | None) -> str:
    """``48.0 KiB + 4.0 KiB·N``, ``1.0 MiB`` for a constant state, a dash without a fit."""
    if fit is None:
        return "—"
    return fmt_bytes(fit.intercept) if fit.constant else f"{fmt_bytes(fit.intercept)} + {fmt_bytes(fit.per_n)}·N"


def fmt_gbps(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    return "—" if not math.isfinite(value) else f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def _one_or_column(cfg: pd.DataFrame) -> str | None:
    """The single ``decode_setting`` of ``cfg`` (None when there are several: the tables get a column)."""
    settings = list(dict.fromkeys(cfg["decode_setting"]))
    return settings[0] if len(settings) == 1 else None


def _with_setting(df: pd.DataFrame, cfg: pd.DataFrame, single: str | None) -> pd.DataFrame:
    if single is None:
        df.insert(1, "B H kv_heads D dtype", cfg["decode_setting"].str.replace(r" \S+$", "", regex=True).to_list())
    return df


def _fitted(da: DecodeAnalysis) -> pd.DataFrame:
    """The configurations with an affine state fit, in the file's order."""
    return da.configs[da.configs["config"].isin(da.affine)].reset_index(drop=True)


def decode_state_display(da: DecodeAnalysis) -> tuple[pd.DataFrame, str, str]:
    """Cache / state bytes per configuration at N = 4K, 32K, 128K, 1M from the affine fit (``†`` where N lies
    outside the measured range), with the table's caption (the B, H, kv_heads, D and dtype it holds for) and its
    footnote."""
    cfg = _fitted(da)
    at = da.state_at.set_index(["config", "n"])
    data: dict[str, list[str]] = {"configuration": cfg["label"].to_list(),
                                  "state = a + b·N": [fmt_affine(da.affine[c]) for c in cfg["config"]],
                                  "∝ (log-log)": [fmt_slope(da.fits.get((c, "state"))) for c in cfg["config"]]}
    for n in STATE_AT_N:
        data[f"N={fmt_n(n)}"] = [fmt_bytes(at.at[(c, n), "state_bytes"])
                                 + (" †" if at.at[(c, n), "extrapolated"] else "") for c in cfg["config"]]
    single = _one_or_column(cfg)
    df = _with_setting(pd.DataFrame(data), cfg, single)
    ranges = {(f.n_min, f.n_max) for f in da.affine.values()}
    span = (f"N {fmt_n(next(iter(ranges))[0])}–{fmt_n(next(iter(ranges))[1])}" if len(ranges) == 1
            else "N of that configuration (decode_fits.csv)")
    footnote = (f"† extrapolated: outside the measured {span}; the value is the affine fit a + b·N of the ok rows "
                "(the state is affine in N for every mechanism).")
    return df, _state_caption(da, single), footnote


def _state_caption(da: DecodeAnalysis, single: str | None) -> str:
    sources = sorted({x for text in da.configs["state_source"] for x in text.split("+") if x}) or ["state_bytes"]
    steps = da.steps
    room = f"N + {steps[0]} + 4" if len(steps) == 1 else "N + decode_steps + 4"
    where = f"for {single}" if single is not None else "per configuration (column B H kv_heads D dtype)"
    return (f"State bytes {where}; the cache holds {room} positions; "
            + "; ".join(f"{STATE_SOURCES[x]} (`{x}`)" for x in sources) + ".")


def decode_budget_display(da: DecodeAnalysis) -> pd.DataFrame | None:
    """Largest context N whose state fits the budget, per configuration: the N (``unbounded`` for a constant
    state), the affine fit it comes from and how it was obtained."""
    if da.budget is None:
        return None
    b = da.budget[da.budget["points"] > 0].reset_index(drop=True)
    cfg = da.configs.set_index("config").loc[b["config"]].reset_index()

    def largest(r: pd.Series) -> str:
        if r["unbounded"]:
            return "unbounded"
        return fmt_n(r["n_max"]) if pd.notna(r["n_max"]) else "—"

    def how(r: pd.Series) -> str:
        span = f"{fmt_n(r['fit_n_min'])}–{fmt_n(r['fit_n_max'])}"
        if r["unbounded"]:
            return f"constant state (measured N {span}, {r['points']} points)"
        if pd.isna(r["n_max"]) or r["n_max"] == 0:
            return r["verdict"]
        where = f"extrapolated from N {span}" if r["extrapolated"] else f"within measured N {span}"
        return f"(budget − a)/b, {where} ({r['points']} points)"

    df = pd.DataFrame({"configuration": b["label"],
                       "state = a + b·N": [fmt_affine(da.affine.get(c)) for c in b["config"]],
                       "largest N": [largest(r) for _, r in b.iterrows()],
                       "how": [how(r) for _, r in b.iterrows()]})
    return _with_setting(df, cfg, _one_or_column(cfg))


def decode_slopes_display(da: DecodeAnalysis) -> pd.DataFrame:
    """One row per configuration that decoded: its state class and log-log slopes of state and time per token,
    and at its largest ok N the time per token, read GB/s and that as a share of the copy bandwidth."""
    ok = da.points[da.points["status"].eq(Status.OK)]
    copy = copy_lines(da.copy).set_index("copy_device")["copy_gbps"]
    rows = []
    for c in da.configs[da.configs["n_ok_points"] > 0].itertuples(index=False):
        mine = ok[ok["config"].eq(c.config)].sort_values("n")
        last = mine.iloc[-1]
        bw = copy.get(c.device, math.nan)
        share = f"{100 * last['read_gbps'] / bw:,.0f}%" if bw > 0 and last["read_gbps"] > 0 else "—"
        rows.append({"configuration": c.label, "ok N": int(c.n_ok_points), "state": CLASS_TITLES[c.state_class],
                     "state ∝": fmt_slope(da.fits.get((c.config, "state"))),
                     "time/token ∝": fmt_slope(da.fits.get((c.config, "time"))), "at N": fmt_n(last["n"]),
                     "time/token (ms)": fmt_ms(last["time_ms"], last["time_iqr_ms"]),
                     "read GB/s": fmt_gbps(last["read_gbps"]), "of copy bandwidth": share})
    return pd.DataFrame(rows)


def decode_full_table(da: DecodeAnalysis) -> pd.DataFrame:
    """Every decode configuration at every N (display strings)."""
    merged = da.points.merge(da.configs[["config", "label", "decode_setting", "order"]], on="config").sort_values(
        ["order", "n"])
    ok = merged["status"].eq(Status.OK)
    return pd.DataFrame({
        "configuration": merged["label"], "setting": merged["decode_setting"], "N": merged["n"].map(fmt_n),
        "status": merged["status"],
        "state": [fmt_bytes(v) if k else "" for v, k in zip(merged["state"], ok)],
        "time/token (ms, median ± IQR)": [fmt_ms(t, i) if k else "" for t, i, k in
                                          zip(merged["time_ms"], merged["time_iqr_ms"], ok)],
        "read GB/s": [fmt_gbps(v) if k else "" for v, k in zip(merged["read_gbps"], ok)],
        "step peak (above the state)": [fmt_bytes(v) if k else "" for v, k in zip(merged["memory_bytes"], ok)],
        "note": [(str(e)[:80] if not k and isinstance(e, str) else "") for e, k in zip(merged["error"], ok)],
    }).reset_index(drop=True)


def decode_highlight_lines(c: DecodeComparison | None) -> list[str]:
    """"at N=8,192 local decodes a token in 0.41 ms, dense in 2.10 ms (5.1× faster), holding 32.0× less state"."""
    if c is None or not c.time_ratio > 0:
        return []
    r = c.time_ratio
    speed = f"{r:.1f}× faster" if r >= 1 else f"{1 / r:.1f}× slower"
    state = ""
    if c.state_ratio > 0:
        state = (f", holding {c.state_ratio:.1f}× less state" if c.state_ratio >= 1
                 else f", holding {1 / c.state_ratio:.1f}× more state")
    return [f"at N={fmt_n(c.n)} {c.label} decodes a token in {fmt_ms(c.time_ms)} ms, {c.baseline} in "
            f"{fmt_ms(c.baseline_time_ms)} ms ({speed}){state}"]


@dataclass
class DecodeSummary:
    """The display tables of one decode analysis."""

    state_at: pd.DataFrame  # configuration × N = 4K, 32K, 128K, 1M
    state_caption: str
    state_footnote: str
    budget: pd.DataFrame | None
    slopes: pd.DataFrame
    full: pd.DataFrame
    highlights: list[str] = field(default_factory=list)


def summarise_decode(da: DecodeAnalysis) -> DecodeSummary:
    state, caption, footnote = decode_state_display(da)
    return DecodeSummary(state_at=state, state_caption=caption, state_footnote=footnote,
                         budget=decode_budget_display(da), slopes=decode_slopes_display(da),
                         full=decode_full_table(da), highlights=decode_highlight_lines(da.comparison))


def copy_text(da: DecodeAnalysis) -> str:
    """The copy bandwidth the decode rows are read against, in a sentence (or why there is none)."""
    lines = copy_lines(da.copy)
    if lines.empty:
        return f"No copy bandwidth: {da.copy_note}." if da.copy_note else "No copy bandwidth."
    parts = [f"{r.copy_gbps:,.2f} GB/s on {r.copy_device}" + (f" (median of {r.runs} runs)" if r.runs > 1 else "")
             + (f" ({r.copy_method})" if r.copy_method else "") for r in lines.itertuples(index=False)]
    return "Copy bandwidth (measured, from the sidecar): " + "; ".join(parts) + "."


def _md_decode(da: DecodeAnalysis, d: DecodeSummary, budget_bytes: int | None) -> list[str]:
    """The decode section: what the numbers are, the state at long contexts, the budget and the slopes."""
    ok = da.rows["status"].eq(Status.OK)
    lines = ["", "## Decode: one token at a time after a context of N", "",
             f"{len(da.rows)} decode rows ({int(ok.sum())} ok), {int((da.configs['n_ok_points'] > 0).sum())} "
             "configurations that decoded (figures `decode_state_vs_n`, `decode_time_vs_n`; numbers in "
             "`decode_fits.csv`). State: the KV cache or recurrent state after the context, as the storage tracker "
             "measured it. Time: median per token over the steps (± IQR). Read GB/s: the bytes one step reads from "
             "its state over its median time (GB = 10⁹ B); a step cannot read faster than the device copies memory.",
             "", copy_text(da), "",
             "### Cache / state bytes at long contexts", "", d.state_caption, "", md_table(d.state_at),
             d.state_footnote, ""]
    if d.budget is not None and budget_bytes:
        lines += [f"### Largest context that fits in {fmt_bytes(budget_bytes)}", "",
                  "State bytes only (the KV cache or recurrent state, not the weights or one step's own peak), from "
                  "the affine fit state = a + b·N of the ok rows: N = ⌊(budget − a) / b⌋, rounded down; "
                  f"*unbounded* where the state does not grow with N. {d.state_caption}", "", md_table(d.budget)]
    lines += ["### Decode slopes and time per token", "",
              "Log-log slopes over the ok points (± standard error with ≥ 3 points); time, read GB/s and the share "
              "of the copy bandwidth at each configuration's largest ok N.", "", md_table(d.slopes)]
    return lines
