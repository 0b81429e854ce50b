"""What a results file says: log-log slopes, crossover N*, largest N under a memory budget, summary tables.

Everything here reads a results DataFrame (``effbench.results.read_results``) and
never runs a mechanism. Knob columns are derived from the CSV itself (every column
that is neither a case column nor a result column), so plugin knobs work without the
plugin being loaded.

Vocabulary:

- a *configuration* is everything about a case except ``n`` (mechanism, knobs, batch,
  heads, head_dim, dtype, device, mode, causal, seed): one line on a plot;
- a *point* is one configuration at one ``n`` (duplicate rows, e.g. from a second
  sweep into the same file, are merged: medians of the ok rows, else the last status);
- *memory* is ``peak_tensor_bytes`` (the exact tensor-storage tracker), falling back to
  ``peak_alloc_bytes`` (CUDA allocator) on rows without a tracker reading, and to
  ``predicted_bytes`` on ok rows that have neither (files written by ``effbench estimate --out``);
- a *fit* is least squares of log y on log N over the ok points: y ≈ exp(a)·N^b, with
  the standard error of b when there are at least 3 points.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd

from . import results
from .units import fmt_bytes, fmt_ms

SETTING_COLUMNS = ["batch", "heads", "head_dim", "dtype", "device", "mode", "causal"]
FAILED_STATUSES = ("oom", "predicted_oom", "timeout", "killed")  # cases that would have run but could not
BASELINES = ("dense", "sdpa")
METRICS = {"time": "time_ms", "memory": "memory_bytes"}
MEMORY_SOURCES = {"peak_tensor_bytes": "tracked tensor storage", "peak_alloc_bytes": "CUDA allocator peak",
                  "predicted_bytes": "predicted on fake tensors"}
CUDA_READINGS = {"peak_alloc_bytes": "CUDA allocator peak (max_memory_allocated)",
                 "peak_reserved_bytes": "CUDA allocator reserved (max_memory_reserved)",
                 "nvml_peak_bytes": "NVML device memory above idle",
                 "nvml_process_peak_bytes": "NVML process memory"}
DERIVED_COLUMNS = ("knobs", "setting", "config", "memory_bytes", "memory_source", "time_ms", "time_iqr_ms")  # prepare()


# --------------------------------------------------------------------------- rows -> points

def knob_columns(df: pd.DataFrame) -> list[str]:
    """Knob columns of a results DataFrame: neither case nor result columns, sorted."""
    known = set(results.CASE_COLUMNS) | set(results.RESULT_COLUMNS) | set(DERIVED_COLUMNS)
    return sorted(c for c in df.columns if c not in known)


def fmt_value(value: Any) -> str | None:
    """A knob or case value as text (``32.0`` -> ``32``, booleans lower case); None when empty."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        return str(int(value)) if float(value).is_integer() else f"{value:g}"
    text = str(value).strip()
    return text or None


def fmt_n(n: Any) -> str:
    """A sequence length with thousands separators."""
    return f"{int(n):,}"


def _knob_text(row: pd.Series, knobs: list[str]) -> str:
    parts = [f"{k}={v}" for k in knobs if (v := fmt_value(row.get(k))) is not None]
    return ",".join(parts)


def _setting_text(row: pd.Series) -> str:
    return (f"B={row['batch']} H={row['heads']} D={row['head_dim']} {row['dtype']} {row['device']} "
            f"{row['mode']} {'causal' if row['causal'] else 'bidirectional'}")


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``knobs``, ``setting``, ``config`` (unique key of the configuration), ``memory_bytes``/``memory_source``
    and ``time_ms`` to the rows of a results file."""
    df = df.copy()
    for col in SETTING_COLUMNS + ["seed", "family", "error"]:
        if col not in df:
            df[col] = pd.NA
    knobs = knob_columns(df)
    df["knobs"] = df.apply(_knob_text, axis=1, knobs=knobs) if len(df) else pd.Series(dtype=str)
    df["setting"] = df.apply(_setting_text, axis=1) if len(df) else pd.Series(dtype=str)
    df["config"] = (df["mechanism"].astype(str) + "[" + df["knobs"] + "] " + df["setting"]
                    + " seed=" + df["seed"].astype(str))
    tracker = _numeric(df, "peak_tensor_bytes")
    alloc = _numeric(df, "peak_alloc_bytes")
    predicted = _numeric(df, "predicted_bytes")
    df["memory_bytes"] = tracker.fillna(alloc).fillna(predicted.where(df["status"].eq("ok")))
    df["memory_source"] = np.select([tracker.notna(), alloc.notna(), df["memory_bytes"].notna()],
                                    ["peak_tensor_bytes", "peak_alloc_bytes", "predicted_bytes"], "")
    df["time_ms"] = _numeric(df, "time_ms_median")
    df["time_iqr_ms"] = _numeric(df, "time_ms_iqr")
    df["predicted_bytes"] = predicted
    for col in CUDA_READINGS:
        df[col] = _numeric(df, col)
    return df


def _numeric(df: pd.DataFrame, col: str) -> pd.Series:
    if col not in df:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce").astype(float)


def configurations(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: identity, a short ``label`` unique in the file, counts and memory source.

    The label is the mechanism, the knobs that vary among that mechanism's configurations
    (all its knobs if none varies), and the case settings that vary in the file.
    """
    first = rows.groupby("config", sort=False).first()
    counts = rows.assign(ok=rows["status"].eq("ok")).groupby("config", sort=False).agg(
        n_rows=("status", "size"), n_ok=("ok", "sum"))
    cfg = first[["mechanism", "family", "knobs", "setting", "seed"] + SETTING_COLUMNS].join(counts)
    cfg["n_ok_points"] = rows[rows["status"].eq("ok")].groupby("config")["n"].nunique().reindex(cfg.index).fillna(0)
    sources = rows[rows["status"].eq("ok") & rows["memory_source"].ne("")].groupby("config")["memory_source"].agg(
        lambda s: "+".join(sorted(set(s))))
    cfg["memory_source"] = sources.reindex(cfg.index).fillna("")
    cfg["label"] = _labels(cfg, rows)
    baseline_rank = cfg["mechanism"].map({m: i for i, m in enumerate(BASELINES)}).fillna(len(BASELINES))
    cfg = cfg.assign(_rank=baseline_rank, _seen=range(len(cfg))).sort_values(["_rank", "_seen"], kind="stable")
    cfg["order"] = range(len(cfg))
    return cfg.drop(columns=["_rank", "_seen"]).reset_index()


def _labels(cfg: pd.DataFrame, rows: pd.DataFrame) -> pd.Series:
    knobs = knob_columns(rows)
    varying_setting = [c for c in SETTING_COLUMNS + ["seed"] if rows[c].astype(str).nunique() > 1]
    per_config = rows.groupby("config", sort=False)[knobs].first() if knobs else pd.DataFrame(index=cfg.index)
    labels = {}
    for mech, group in cfg.groupby("mechanism", sort=False):
        kv = per_config.loc[group.index]
        shown = [k for k in knobs if kv[k].map(fmt_value).nunique(dropna=False) > 1] or knobs
        for config in group.index:
            text = _knob_text(kv.loc[config], shown)
            label = f"{mech}[{text}]" if text else str(mech)
            extra = [_setting_part(c, cfg.at[config, c]) for c in varying_setting]
            labels[config] = " ".join([label] + extra)
    return pd.Series(labels).reindex(cfg.index)


def _setting_part(col: str, value: Any) -> str:
    if col == "causal":
        return "causal" if value else "bidir"
    prefix = {"batch": "B=", "heads": "H=", "head_dim": "D=", "seed": "seed="}.get(col, "")
    return f"{prefix}{fmt_value(value)}"


def points(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration, n): status ``ok`` if any row there is ok (values: medians of the ok rows),
    else the last row's status; ``predicted_bytes`` the largest prediction; ``error`` the last message."""
    keys = ["config", "n"]
    values = ["time_ms", "time_iqr_ms", "memory_bytes", *CUDA_READINGS]
    ok = rows[rows["status"].eq("ok")].groupby(keys)[values].median()
    last = rows.groupby(keys).agg(last_status=("status", "last"), predicted_bytes=("predicted_bytes", "max"),
                                  error=("error", "last"))
    pts = last.join(ok)
    pts["status"] = np.where(pts.index.isin(ok.index), "ok", pts["last_status"])
    return pts.drop(columns="last_status").reset_index()


# --------------------------------------------------------------------------- fits

@dataclass(frozen=True)
class Fit:
    """log y = intercept + slope·log N, by least squares over ``points`` ok points in [n_min, n_max]."""

    slope: float
    intercept: float
    slope_se: float  # standard error of the slope; NaN with fewer than 3 points
    points: int
    n_min: int
    n_max: int

    def predict(self, n: float) -> float:
        """The fitted y at ``n``."""
        return math.exp(self.intercept + self.slope * math.log(n))


def fit_loglog(n: Iterable[float], y: Iterable[float]) -> Fit | None:
    """Least-squares line through (log n, log y) over positive finite pairs; None with fewer than 2 distinct n."""
    frame = pd.DataFrame({"n": pd.to_numeric(pd.Series(list(n), dtype=object), errors="coerce"),
                          "y": pd.to_numeric(pd.Series(list(y), dtype=object), errors="coerce")}).astype(float)
    frame = frame[np.isfinite(frame["n"]) & np.isfinite(frame["y"]) & (frame["n"] > 0) & (frame["y"] > 0)]
    if frame["n"].nunique() < 2:
        return None
    x, ly = np.log(frame["n"].to_numpy()), np.log(frame["y"].to_numpy())
    xm, ym = x.mean(), ly.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (ly - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    k = len(x)
    if k >= 3:
        resid = ly - (intercept + slope * x)
        se = math.sqrt(float((resid ** 2).sum()) / (k - 2) / sxx)
    else:
        se = math.nan
    return Fit(slope=slope, intercept=intercept, slope_se=se, points=k,
               n_min=int(frame["n"].min()), n_max=int(frame["n"].max()))


def verdict(slope: float) -> str:
    """Growth class of a fitted exponent: ≈N below 1.25, ≈N² above 1.75, in between otherwise
    (and sub-linear below 0.75, where fixed overheads dominate)."""
    if not math.isfinite(slope):
        return "no fit"
    if slope < 0.75:
        return "sub-linear"
    if slope < 1.25:
        return "≈N"
    if slope > 1.75:
        return "≈N²"
    return "in between"


def fmt_slope(fit: Fit | None) -> str:
    """``N^1.02±0.01`` (no ± with 2 points), or a dash without a fit."""
    if fit is None:
        return "—"
    text = f"N^{fit.slope:.2f}"
    return text + (f"±{fit.slope_se:.2f}" if math.isfinite(fit.slope_se) else "")


def fits(pts: pd.DataFrame, cfg: pd.DataFrame) -> dict[tuple[str, str], Fit]:
    """Fit per (configuration, metric) over its ok points (metrics: ``time``, ``memory``)."""
    ok = pts[pts["status"].eq("ok")]
    out: dict[tuple[str, str], Fit] = {}
    for config, group in ok.groupby("config", sort=False):
        for metric, col in METRICS.items():
            fit = fit_loglog(group["n"], group[col])
            if fit is not None:
                out[(config, metric)] = fit
    return out


def slope_table(cfg: pd.DataFrame, fitted: dict[tuple[str, str], Fit]) -> pd.DataFrame:
    """Tidy slope table (the content of slopes.csv): one row per configuration and metric."""
    records = []
    for _, c in cfg.iterrows():
        for metric in METRICS:
            fit = fitted.get((c["config"], metric))
            records.append({
                "label": c["label"], "mechanism": c["mechanism"], "family": c["family"], "knobs": c["knobs"],
                "setting": c["setting"], "metric": metric,
                "quantity": (c["memory_source"] or "peak_tensor_bytes") if metric == "memory" else "time_ms_median",
                "slope": fit.slope if fit else math.nan, "slope_se": fit.slope_se if fit else math.nan,
                "intercept": fit.intercept if fit else math.nan, "points": fit.points if fit else 0,
                "n_min": fit.n_min if fit else pd.NA, "n_max": fit.n_max if fit else pd.NA,
                "verdict": verdict(fit.slope) if fit else f"no fit ({int(c['n_ok_points'])} ok point(s))",
                "config": c["config"],
            })
    return pd.DataFrame.from_records(records)


# --------------------------------------------------------------------------- crossovers

def baseline_config(cfg: pd.DataFrame, mechanism: str, setting: str) -> str | None:
    """The configuration of ``mechanism`` in ``setting`` with the most ok points (None if there is none)."""
    cands = cfg[cfg["mechanism"].eq(mechanism) & cfg["setting"].eq(setting) & (cfg["n_ok_points"] > 0)]
    if cands.empty:
        return None
    return cands.sort_values(["n_ok_points", "order"], ascending=[False, True])["config"].iloc[0]


@dataclass(frozen=True)
class Crossover:
    """Where a fit ``a1 + b1·x`` (mechanism) meets ``a2 + b2·x`` (baseline), x = log N."""

    kind: str  # "above" | "below" (cheaper above/below N*) | "always" | "never"
    n_star: float  # N* when it lies within a factor 2 of the measured range, else NaN
    n_cross: float  # where the fits meet, even out of range (NaN when parallel)
    text: str


def crossover(mech: Fit, base: Fit, margin: float = 2.0) -> Crossover:
    """Solve a1 + b1·x = a2 + b2·x; report N* = exp(x) when it lies within [n_lo/margin, n_hi·margin]
    (the union of both measured ranges), else say whether the mechanism is cheaper everywhere in range."""
    lo, hi = min(mech.n_min, base.n_min), max(mech.n_max, base.n_max)
    db = mech.slope - base.slope
    n_cross = math.exp((base.intercept - mech.intercept) / db) if db != 0 and _safe_exp_arg(mech, base) else math.nan
    if math.isfinite(n_cross) and lo / margin <= n_cross <= hi * margin:
        kind = "above" if db < 0 else "below"
        near = "" if lo <= n_cross <= hi else " (just outside the measured range)"
        return Crossover(kind, n_cross, n_cross, f"cheaper {kind} N* ≈ {n_cross:,.0f}{near}")
    mid = math.sqrt(lo * hi)
    cheaper = mech.predict(mid) < base.predict(mid)
    kind = "always" if cheaper else "never"
    text = f"{kind} cheaper in range"
    if not math.isfinite(n_cross):
        text += " (parallel fits)"
    elif lo / 1000 <= n_cross <= hi * 1000:
        text += f" (N* ≈ {n_cross:,.0f} not within range)"
    else:
        text += " (N* not within range)"
    return Crossover(kind, math.nan, n_cross, text)


def _safe_exp_arg(mech: Fit, base: Fit) -> bool:
    x = (base.intercept - mech.intercept) / (mech.slope - base.slope)
    return abs(x) < 700


def crossover_table(cfg: pd.DataFrame, fitted: dict[tuple[str, str], Fit],
                    baselines: Iterable[str] = BASELINES) -> pd.DataFrame:
    """For every configuration (position encodings excepted) against each baseline configuration of the same
    setting, in time and in memory: the crossover N* and a verdict."""
    records = []
    baselines = [b for b in baselines if cfg["mechanism"].eq(b).any()]  # only baselines present in the file
    for _, c in cfg.iterrows():
        if c["family"] == "position":
            continue
        for base in baselines:
            if c["mechanism"] == base:
                continue
            base_cfg = baseline_config(cfg, base, c["setting"])
            for metric in METRICS:
                mine = fitted.get((c["config"], metric))
                theirs = fitted.get((base_cfg, metric)) if base_cfg else None
                if base_cfg is None:
                    result = Crossover("n/a", math.nan, math.nan, f"no {base} rows in this setting")
                elif mine is None or theirs is None:
                    who = "this configuration" if mine is None else base
                    result = Crossover("n/a", math.nan, math.nan, f"no {metric} fit for {who} (< 2 ok points)")
                else:
                    result = crossover(mine, theirs)
                records.append({"label": c["label"], "mechanism": c["mechanism"], "baseline": base,
                                "metric": metric, "kind": result.kind, "n_star": result.n_star,
                                "n_cross": result.n_cross, "verdict": result.text, "config": c["config"],
                                "baseline_config": base_cfg})
    return pd.DataFrame.from_records(records, columns=["label", "mechanism", "baseline", "metric", "kind", "n_star",
                                                       "n_cross", "verdict", "config", "baseline_config"])


# --------------------------------------------------------------------------- memory budget

def budget_table(pts: pd.DataFrame, cfg: pd.DataFrame, budget_bytes: int) -> pd.DataFrame:
    """Largest N under ``budget_bytes`` per configuration, from the memory trend.

    The trend is fitted over the measured memory of ok points and the ``predicted_bytes``
    of points that could not run (oom, predicted_oom, timeout, killed); N = floor(exp((log B − a)/b)).
    ``extrapolated`` is true when that N lies outside the fitted points' range.
    """
    measured = pts[pts["status"].eq("ok")][["config", "n", "memory_bytes"]].rename(columns={"memory_bytes": "bytes"})
    predicted = pts[pts["status"].isin(FAILED_STATUSES)][["config", "n", "predicted_bytes"]].rename(
        columns={"predicted_bytes": "bytes"})
    trend = pd.concat([measured.assign(kind="measured"), predicted.assign(kind="predicted")]).dropna(subset=["bytes"])
    records = []
    for _, c in cfg.iterrows():
        mine = trend[trend["config"].eq(c["config"])]
        fit = fit_loglog(mine["n"], mine["bytes"])
        fitting = mine[mine["kind"].eq("measured") & (mine["bytes"] <= budget_bytes)]
        largest_measured = int(fitting["n"].max()) if len(fitting) else pd.NA
        n_budget, text = _budget_n(fit, budget_bytes)
        extrapolated = (fit is not None and n_budget is not pd.NA
                        and not (fit.n_min <= n_budget <= fit.n_max))
        records.append({"label": c["label"], "mechanism": c["mechanism"], "budget_bytes": budget_bytes,
                        "n_max": n_budget, "extrapolated": bool(extrapolated),
                        "fit_n_min": fit.n_min if fit else pd.NA, "fit_n_max": fit.n_max if fit else pd.NA,
                        "largest_measured_n": largest_measured,
                        "points": fit.points if fit else 0,
                        "predicted_points": int(mine["kind"].eq("predicted").sum()),
                        "slope": fit.slope if fit else math.nan,
                        "verdict": text + (" (extrapolated)" if extrapolated else ""),
                        "config": c["config"]})
    return pd.DataFrame.from_records(records)


def _budget_n(fit: Fit | None, budget_bytes: int) -> tuple[Any, str]:
    if fit is None:
        return pd.NA, "no memory trend (fewer than 2 points)"
    if fit.slope <= 1e-9:
        return pd.NA, "memory does not grow with N in the fit"
    x = (math.log(budget_bytes) - fit.intercept) / fit.slope
    if x > 700:
        return pd.NA, "beyond any practical N"
    value = math.exp(x)
    nearest = round(value)
    n = nearest if abs(value - nearest) <= 1e-11 * value else math.floor(value)  # round down, but not float noise
    if n < 1:
        return 0, "even N = 1 does not fit"
    return n, f"N ≤ {n:,}"


# --------------------------------------------------------------------------- tables

def main_setting(cfg: pd.DataFrame) -> str:
    """The case setting with the most ok points (the one the textbook table shows)."""
    return cfg.groupby("setting", sort=False)["n_ok_points"].sum().sort_values(ascending=False, kind="stable").index[0]


def representatives(cfg: pd.DataFrame) -> pd.DataFrame:
    """One configuration per mechanism for the textbook table: in the main setting if it has ok points there,
    else anywhere; the one with the most ok points (then most rows, then first seen). Baselines first."""
    setting = main_setting(cfg)
    cfg = cfg.assign(in_main=cfg["setting"].eq(setting) & (cfg["n_ok_points"] > 0))
    ranked = cfg.sort_values(["in_main", "n_ok_points", "n_rows", "order"], ascending=[False, False, False, True])
    reps = ranked.drop_duplicates("mechanism")
    rank = {m: i for i, m in enumerate(BASELINES)}
    return reps.assign(_first=reps["mechanism"].map(rank).fillna(len(rank)),
                       _order=reps["mechanism"].map(cfg.drop_duplicates("mechanism").set_index("mechanism")["order"])
                       ).sort_values(["_first", "_order"]).drop(columns=["_first", "_order", "in_main"])


def _cell(point: pd.Series | None, metric: str) -> str:
    if point is None:
        return ""
    status = point["status"]
    if status == "ok":
        return fmt_bytes(point["memory_bytes"]) if metric == "memory" else fmt_ms(point["time_ms"])
    if metric == "memory" and pd.notna(point["predicted_bytes"]) and status in FAILED_STATUSES:
        return f"{status} (≈{fmt_bytes(point['predicted_bytes'])})"
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
        data: dict[str, list[str]] = {"N": [fmt_n(n) for n in ns], "N² (scores)": [fmt_n(n * n) for n in ns]}
        for rep in reps.itertuples(index=False):
            col = []
            for n in ns:
                p = by_key.get((rep.config, n))
                col.append(_cell(pd.Series(p._asdict()) if p is not None else None, metric))
            data[rep.mechanism] = col
        if metric == "time" and not mine["time_ms"].notna().any():
            continue  # a file of predictions (effbench estimate --out) has no timings
        tables[metric] = pd.DataFrame(data)
    return tables


def full_table(pts: pd.DataFrame, cfg: pd.DataFrame) -> pd.DataFrame:
    """Every configuration at every N (display strings): label, setting, N, status, memory, time ± IQR, predicted."""
    merged = pts.merge(cfg[["config", "label", "setting", "order"]], on="config").sort_values(["order", "n"])
    return pd.DataFrame({
        "configuration": merged["label"], "setting": merged["setting"], "N": merged["n"].map(fmt_n),
        "status": merged["status"],
        "peak memory": [fmt_bytes(m) if s == "ok" else "" for m, s in zip(merged["memory_bytes"], merged["status"])],
        "time (ms, median ± IQR)": [fmt_ms(t, i) if s == "ok" else "" for t, i, s in
                                    zip(merged["time_ms"], merged["time_iqr_ms"], merged["status"])],
        "predicted": merged["predicted_bytes"].map(lambda b: fmt_bytes(b) if pd.notna(b) else ""),
        "note": [(str(e)[:80] if s != "ok" and isinstance(e, str) else "") for e, s in
                 zip(merged["error"], merged["status"])],
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


def budget_display(budget: pd.DataFrame) -> pd.DataFrame:
    """The budget table for people: largest N (or why there is none), how it was obtained, and the largest
    measured N whose memory is under the budget."""
    def how(r) -> str:
        if pd.isna(r["n_max"]):
            return r["verdict"]
        span = f"{fmt_n(r['fit_n_min'])}–{fmt_n(r['fit_n_max'])}"
        pred = f", {r['predicted_points']} predicted" if r["predicted_points"] else ""
        return (f"extrapolated from N {span}" if r["extrapolated"] else f"within measured N {span}") + \
            f" ({r['points']} points{pred}, ∝ N^{r['slope']:.2f})"

    return pd.DataFrame({
        "configuration": budget["label"],
        "largest N": budget["n_max"].map(lambda n: fmt_n(n) if pd.notna(n) else "—"),
        "how": [how(r) for _, r in budget.iterrows()],
        "largest ok N under budget": budget["largest_measured_n"].map(lambda n: fmt_n(n) if pd.notna(n) else "—"),
    })


def highlights(pts: pd.DataFrame, reps: pd.DataFrame, cfg: pd.DataFrame, baseline: str = "dense") -> list[str]:
    """hyperfine-style lines: each representative against the baseline in the same setting (a causal-only
    mechanism against causal dense), at the largest N both ran
    ("local[window=256] is 12.3× faster and uses 8.1× less memory than dense at N=16,384")."""
    ok = pts[pts["status"].eq("ok")]
    main = main_setting(cfg) if len(cfg) else ""
    lines = []
    for rep in reps.itertuples(index=False):
        if rep.mechanism == baseline:
            continue
        base_cfg = baseline_config(cfg, baseline, rep.setting)
        if base_cfg is None:
            continue
        b = ok[ok["config"].eq(base_cfg)].set_index("n")
        base_name = baseline if rep.setting == main else f"{baseline} ({_setting_word(rep.setting, main)})"
        m = ok[ok["config"].eq(rep.config)].set_index("n")
        common = sorted(set(m.index) & set(b.index))
        if not common:
            continue
        n = common[-1]
        parts = []
        if m.at[n, "time_ms"] > 0 and b.at[n, "time_ms"] > 0:  # NaN compares False
            r = b.at[n, "time_ms"] / m.at[n, "time_ms"]
            parts.append(f"is {r:.1f}× faster" if r >= 1 else f"is {1 / r:.1f}× slower")
        if m.at[n, "memory_bytes"] > 0 and b.at[n, "memory_bytes"] > 0:
            r = b.at[n, "memory_bytes"] / m.at[n, "memory_bytes"]
            parts.append(f"uses {r:.1f}× less memory" if r >= 1 else f"uses {1 / r:.1f}× more memory")
        if parts:
            lines.append(f"{rep.label} {' and '.join(parts)} than {base_name} at N={fmt_n(n)}")
        beyond = m.index[m.index > b.index.max()]
        if len(beyond):
            lines.append(f"{rep.label} ran to N={fmt_n(beyond.max())}, beyond {base_name}'s largest ok N={fmt_n(b.index.max())}")
    return lines


def _setting_word(setting: str, main: str) -> str:
    """How ``setting`` differs from the main one, for a label: "causal" when that is all, else the whole setting."""
    return "causal" if setting == main.replace(" bidirectional", " causal") else setting


# --------------------------------------------------------------------------- the whole analysis

@dataclass
class Analysis:
    """Everything derived from one results file (no figures)."""

    rows: pd.DataFrame  # the CSV rows, prepared
    configs: pd.DataFrame  # one row per configuration (label, counts, memory source)
    points: pd.DataFrame  # one row per (configuration, N)
    fits: dict[tuple[str, str], Fit]
    slopes: pd.DataFrame  # tidy: configuration × metric
    crossovers: pd.DataFrame  # configuration × baseline × metric
    budget: pd.DataFrame | None  # configuration: largest N under the budget (None without a budget)
    representatives: pd.DataFrame
    textbook: dict[str, pd.DataFrame]  # "memory" / "time": rows = N, one column per mechanism
    full: pd.DataFrame
    highlights: list[str] = field(default_factory=list)

    @property
    def setting(self) -> str:
        return main_setting(self.configs)


def analyse(df: pd.DataFrame, budget_bytes: int | None = None, source: str = "results file") -> Analysis:
    """Run every analysis on a results DataFrame; raise ResultsError when it has no ok rows."""
    if "status" not in df or not df["status"].eq("ok").any():
        counts = df["status"].value_counts() if "status" in df else pd.Series(dtype=int)
        what = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no rows"
        raise results.ResultsError(f"{source} has no ok rows ({what}): nothing to plot; "
                                   "run `effbench sweep` with sizes that fit")
    rows = prepare(df)
    cfg = configurations(rows)
    pts = points(rows)
    fitted = fits(pts, cfg)
    reps = representatives(cfg)
    return Analysis(
        rows=rows, configs=cfg, points=pts, fits=fitted, slopes=slope_table(cfg, fitted),
        crossovers=crossover_table(cfg, fitted),
        budget=budget_table(pts, cfg, budget_bytes) if budget_bytes else None,
        representatives=reps, textbook=textbook_tables(pts, reps), full=full_table(pts, cfg),
        highlights=highlights(pts, reps, cfg),
    )


# --------------------------------------------------------------------------- verify output

VERIFY_COLUMNS = ("mechanism", "check", "knob", "knob_value", "error_rel")


def read_verify(path) -> pd.DataFrame:
    """Read an ``effbench verify`` CSV; raise ResultsError when it is missing or not one."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise results.ResultsError(f"verify file not found: {path}")
    try:
        df = pd.read_csv(path, dtype={"knob": str, "check": str, "mechanism": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise results.ResultsError(f"{path} could not be parsed as an effbench verify CSV: {exc}") from None
    missing = [c for c in VERIFY_COLUMNS if c not in df.columns]
    if missing:
        raise results.ResultsError(f"{path} is not an effbench verify CSV (missing columns: {', '.join(missing)})")
    return df


def knob_sweeps(verify: pd.DataFrame) -> pd.DataFrame:
    """Fidelity rows with a swept knob and numbers: mechanism, knob, knob_value, error_rel, causal, n."""
    v = verify[verify["check"].eq("fidelity") & verify["knob"].fillna("").str.strip().ne("")].copy()
    v["knob_value"] = pd.to_numeric(v["knob_value"], errors="coerce")
    v["error_rel"] = pd.to_numeric(v["error_rel"], errors="coerce")
    if "causal" not in v:
        v["causal"] = False
    v["causal"] = v["causal"].map(lambda x: str(x).strip().lower() == "true")
    if "n" not in v:
        v["n"] = pd.NA
    return v.dropna(subset=["knob_value", "error_rel"]).sort_values(["mechanism", "knob", "causal", "knob_value"])


# --------------------------------------------------------------------------- markdown

def md_table(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (cells escaped; numeric-looking columns right-aligned)."""
    if df.empty:
        return "_(empty)_\n"
    cols = [str(c) for c in df.columns]

    def esc(v: Any) -> str:
        return ("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)).replace("|", "\\|").replace("\n", " ")

    def numeric(col) -> bool:
        vals = [str(v) for v in df[col] if str(v) not in ("", "—")]
        return bool(vals) and all(re.match(r"^[\d,.\s]+(ms|[KMGT]i?B|B)?( ± [\d,.]+)?$", v) for v in vals)

    align = ["---:" if numeric(c) else "---" for c in df.columns]
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
