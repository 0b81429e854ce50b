"""What the decode rows of a results file say, in numbers: state bytes and time per token vs N, the affine fit
of the state, the largest context under a budget, the state at long contexts, and the copy bandwidth.

A decode row (``phase == "decode"``; see ``effbench.decoding``) is one configuration at one context length N:
``state_bytes`` is the KV cache or recurrent state after N tokens (sized for N + ``decode_steps`` + 4
positions), ``time_ms_per_token`` the median over the steps (IQR in ``time_ms_iqr``), ``read_gbps`` the bytes
one step reads over its time. Everything here reads files and never runs a mechanism; display is
``effbench.summary``, figures ``effbench.figures``. The vocabulary is ``effbench.analysis``'s (configuration,
point), with ``decode_steps`` part of the configuration (it sizes the cache).

- *state* is ``state_bytes`` (measured by the storage tracker), falling back to ``predicted_state_bytes``
  (fake tensors) and then ``state_bytes_analytic`` (the declared formula) on ok rows without a measurement
  (files written by ``effbench estimate --phase decode --out``);
- the state is affine in N for every mechanism, so it is fitted as bytes = a + b·N (``fits.fit_affine``):
  *grows* (b > 0: dense, sdpa, bigbird) or *constant* (windows, sinks, kernel and recurrent states); the
  log-log slope (``fits.fit_loglog``) is beside it, ≈1 or ≈0;
- the *copy bandwidth* is the device's measured ``dst.copy_(src)`` traffic (bytes read + written per second), from
  the JSON sidecar's run records (``copy_gbps``): a step that only reads streams its state at most about that fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from . import results
from .analysis import at_field_default, configurations, prepare
from .fits import BASELINES, AffineFit, Fit, affine_budget_n, baseline_config, fit_affine, fit_configs, ratio
from .status import Status
from .units import NOISY_IQR, is_noisy

DECODE = "decode"
STATE_AT_N = (4096, 32768, 131072, 1048576)  # the context lengths of the state table
STATE_SOURCES = {"state_bytes": "measured (storage tracker)", "predicted_state_bytes": "predicted on fake tensors",
                 "state_bytes_analytic": "declared formula"}
GROWS, CONSTANT, UNFITTED = "grows", "constant", "no fit"  # state classes
CLASS_TITLES = {GROWS: "state grows with N", CONSTANT: "constant state", UNFITTED: "one N only (no fit)"}
DECODE_METRICS = {"state": "state", "time": "time_ms", "read": "read_gbps"}  # log-log fits: name -> points column
_VALUES = ["state", "state_bytes_analytic", "time_ms", "time_iqr_ms", "read_gbps", "read_bytes", "memory_bytes"]


def split_phases(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(prefill rows, decode rows) of a results DataFrame; a file without the ``phase`` column is all prefill."""
    if "phase" not in df:
        return df, df.iloc[0:0]
    decode = df["phase"].astype(str).str.strip().str.lower().eq(DECODE)
    return df[~decode], df[decode]


def has_ok(df: pd.DataFrame) -> bool:
    return "status" in df and bool(df["status"].eq(Status.OK).any())


# --------------------------------------------------------------------------- the sidecar's copy bandwidth

COPY_COLUMNS = ["run_id", "copy_gbps", "copy_device", "copy_method"]


def read_copy_bandwidth(csv_path: str | Path, run_ids: Iterable[Any] = ()) -> tuple[pd.DataFrame, str | None]:
    """The copy bandwidth readings of the sweeps that wrote the decode rows (``run_ids``; every run with a
    reading when none of them matches), from the JSON sidecar beside ``csv_path``: a frame of
    ``COPY_COLUMNS`` and, when it is empty, why (no sidecar, unreadable, no reading)."""
    side = results.sidecar_path(csv_path)
    empty = pd.DataFrame(columns=COPY_COLUMNS)
    if not side.exists():
        return empty, f"no sidecar {side.name} beside the CSV: no copy bandwidth to compare with"
    try:
        runs = json.loads(side.read_text()).get("runs", [])
    except (json.JSONDecodeError, OSError, AttributeError) as exc:
        return empty, f"the sidecar {side.name} does not parse ({exc}): no copy bandwidth to compare with"
    with_copy = [r for r in runs if isinstance(r, dict) and _positive(r.get("copy_gbps"))]
    wanted = {str(r) for r in run_ids if pd.notna(r)}
    mine = [r for r in with_copy if str(r.get("run_id")) in wanted] or with_copy
    if not mine:
        return empty, f"the sidecar {side.name} has no copy_gbps (copy bandwidth not measured by these sweeps)"
    frame = pd.DataFrame([{"run_id": r.get("run_id"), "copy_gbps": float(r["copy_gbps"]),
                           "copy_device": str(r.get("copy_device") or "?"), "copy_method": r.get("copy_method") or ""}
                          for r in mine], columns=COPY_COLUMNS)
    return frame, None


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def copy_lines(copy: pd.DataFrame) -> pd.DataFrame:
    """One reference per device: the median ``copy_gbps`` of its runs, how many runs, the method."""
    if copy.empty:
        return pd.DataFrame(columns=["copy_device", "copy_gbps", "runs", "copy_method"])
    return copy.groupby("copy_device", sort=True).agg(copy_gbps=("copy_gbps", "median"), runs=("copy_gbps", "size"),
                                                      copy_method=("copy_method", "first")).reset_index()


# --------------------------------------------------------------------------- rows -> points

def _state(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The state bytes of each row (measured, else predicted, else declared on ok rows) and where it came from."""
    cols = {c: pd.to_numeric(df[c], errors="coerce").astype(float) if c in df else pd.Series(np.nan, index=df.index)
            for c in STATE_SOURCES}
    ok = df["status"].eq(Status.OK)
    state = cols["state_bytes"].copy()
    source = pd.Series(np.where(state.notna(), "state_bytes", ""), index=df.index, dtype=object)
    for col in ("predicted_state_bytes", "state_bytes_analytic"):
        fill = state.isna() & ok & cols[col].notna()
        state[fill] = cols[col][fill]
        source[fill] = col
    return state, source


def _kv_heads(row: pd.Series) -> Any:
    """The key/value heads in force: the ``kv_heads`` knob unless it is at its default (then ``heads``)."""
    if "kv_heads" not in row or at_field_default(row, "kv_heads") or pd.isna(row["kv_heads"]):
        return row["heads"]
    return int(row["kv_heads"])


def prepare_decode(df: pd.DataFrame) -> pd.DataFrame:
    """``analysis.prepare`` for decode rows, plus ``decode_steps`` in the configuration key, ``state`` and
    ``state_source``, ``time_ms`` (per token), ``read_gbps``/``read_bytes``, ``kv_heads_eff`` and ``decode_setting``."""
    rows = prepare(df)
    steps = pd.to_numeric(rows["decode_steps"], errors="coerce") if "decode_steps" in rows else pd.Series(
        np.nan, index=rows.index)
    rows["decode_steps"] = steps.astype("Int64")
    rows["config"] = rows["config"] + " steps=" + rows["decode_steps"].astype(str)
    rows["state"], rows["state_source"] = _state(rows)
    for col in ("state_bytes_analytic", "predicted_state_bytes", "read_gbps", "read_bytes"):
        rows[col] = pd.to_numeric(rows[col], errors="coerce").astype(float) if col in rows else np.nan
    rows["time_ms"] = pd.to_numeric(rows["time_ms_per_token"], errors="coerce").astype(float) \
        if "time_ms_per_token" in rows else np.nan
    rows["kv_heads_eff"] = rows.apply(_kv_heads, axis=1) if len(rows) else pd.Series(dtype=object)
    rows["decode_setting"] = [f"B={r.batch} H={r.heads} kv_heads={r.kv_heads_eff} D={r.head_dim} {r.dtype} {r.device}"
                              for r in rows.itertuples(index=False)]
    return rows


def decode_points(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration, n): status ``ok`` if any row there is ok (values: medians of the ok rows),
    else the last row's status; ``predicted_state_bytes`` the largest prediction; ``error`` the last message."""
    keys = ["config", "n"]
    ok = rows[rows["status"].eq(Status.OK)].groupby(keys)[_VALUES].median()
    last = rows.groupby(keys).agg(last_status=("status", "last"),
                                  predicted_state_bytes=("predicted_state_bytes", "max"), error=("error", "last"))
    pts = last.join(ok)
    pts["status"] = np.where(pts.index.isin(ok.index), Status.OK.value, pts["last_status"])
    return pts.drop(columns="last_status").reset_index()


def decode_configurations(rows: pd.DataFrame) -> pd.DataFrame:
    """``analysis.configurations`` plus ``decode_steps``, ``kv_heads``, ``decode_setting`` and ``state_source``;
    the label says ``steps=K`` when the file has more than one ``decode_steps``."""
    cfg = configurations(rows)
    ran = set(rows.loc[rows["status"].eq(Status.OK), "config"])
    if ran and len(ran) < len(cfg):  # label the configurations that decoded among themselves: a skipped
        # bidirectional position encoding does not make every decode label say "causal"
        labels = configurations(rows[rows["config"].isin(ran)]).set_index("config")["label"]
        cfg["label"] = cfg["config"].map(labels).fillna(cfg["label"])
    first = rows.groupby("config", sort=False)[["decode_steps", "kv_heads_eff", "decode_setting"]].first()
    cfg = cfg.join(first.rename(columns={"kv_heads_eff": "kv_heads"}), on="config")
    ok = rows[rows["status"].eq(Status.OK) & rows["state_source"].ne("")]
    sources = ok.groupby("config")["state_source"].agg(lambda s: "+".join(sorted(set(s))))
    cfg["state_source"] = cfg["config"].map(sources).fillna("")
    if rows["decode_steps"].astype(str).nunique() > 1:
        cfg["label"] = cfg["label"] + " steps=" + cfg["decode_steps"].astype(str)
    return cfg


# --------------------------------------------------------------------------- the analysis

@dataclass
class DecodeComparison:
    """The best constant-state configuration against the baseline at the largest N both decoded."""

    n: int
    label: str
    config: str
    time_ms: float
    baseline: str  # the baseline's label
    baseline_config: str
    baseline_time_ms: float
    time_ratio: float  # baseline time / its time
    state_ratio: float  # baseline state / its state


@dataclass
class DecodeAnalysis:
    """Everything computed from the decode rows of one file (numbers; no display strings, no figures)."""

    rows: pd.DataFrame  # the decode rows, prepared
    configs: pd.DataFrame  # one row per configuration (label, kv_heads, decode_steps, state_class, ...)
    points: pd.DataFrame  # one row per (configuration, N)
    fits: dict[tuple[str, str], Fit]  # (config, "state" | "time" | "read") -> log-log Fit
    affine: dict[str, AffineFit]  # config -> state = a + b·N
    state_at: pd.DataFrame  # config × STATE_AT_N: bytes from the affine fit, extrapolated or not
    budget: pd.DataFrame | None  # config: largest N whose state fits the budget (None without a budget)
    copy: pd.DataFrame  # the sidecar's copy bandwidth readings (COPY_COLUMNS), maybe empty
    copy_note: str | None  # why there is no copy bandwidth
    comparison: DecodeComparison | None
    budget_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def settings(self) -> list[str]:
        """The distinct ``B=… H=… kv_heads=… D=… dtype device`` of the configurations with ok points."""
        fitted = self.configs[self.configs["n_ok_points"] > 0]
        return list(dict.fromkeys(fitted["decode_setting"]))

    @property
    def steps(self) -> list[int]:
        return sorted({int(s) for s in self.configs["decode_steps"].dropna()})

    @property
    def largest_n(self) -> int | None:
        """The largest N with an ok point."""
        ok = self.points[self.points["status"].eq(Status.OK)]
        return int(ok["n"].max()) if len(ok) else None


def state_class(fit: AffineFit | None) -> str:
    if fit is None:
        return UNFITTED
    return CONSTANT if fit.constant or fit.per_n <= 0 else GROWS


def state_at_table(cfg: pd.DataFrame, affine: dict[str, AffineFit], ns: Iterable[int] = STATE_AT_N) -> pd.DataFrame:
    """Tidy: per fitted configuration and N of ``ns``, the affine state a + b·N and whether N lies outside the
    measured range (``extrapolated``)."""
    records = []
    for c in cfg.itertuples(index=False):
        fit = affine.get(c.config)
        if fit is None:
            continue
        for n in ns:
            records.append({"config": c.config, "label": c.label, "n": int(n), "state_bytes": fit.predict(n),
                            "extrapolated": not (fit.n_min <= n <= fit.n_max), "fit_n_max": fit.n_max})
    return pd.DataFrame.from_records(records, columns=["config", "label", "n", "state_bytes", "extrapolated",
                                                       "fit_n_max"])


BUDGET_COLUMNS = ["label", "mechanism", "budget_bytes", "n_max", "unbounded", "extrapolated", "intercept_bytes",
                  "per_n_bytes", "fit_n_min", "fit_n_max", "points", "verdict", "decode_setting", "config"]


def decode_budget_table(cfg: pd.DataFrame, affine: dict[str, AffineFit], budget_bytes: int) -> pd.DataFrame:
    """Largest context N whose state a + b·N is within ``budget_bytes``, per configuration: N = floor((budget −
    a)/b); ``unbounded`` when the state is constant and fits. ``extrapolated``: N outside the measured range."""
    records = []
    for c in cfg.itertuples(index=False):
        fit = affine.get(c.config)
        n, text = affine_budget_n(fit, budget_bytes)
        unbounded = fit is not None and n is pd.NA and text.startswith("unbounded")
        extrapolated = fit is not None and n is not pd.NA and n > 0 and not (fit.n_min <= n <= fit.n_max)
        records.append({"label": c.label, "mechanism": c.mechanism, "budget_bytes": budget_bytes, "n_max": n,
                        "unbounded": unbounded, "extrapolated": bool(extrapolated),
                        "intercept_bytes": fit.intercept if fit else math.nan,
                        "per_n_bytes": fit.per_n if fit else math.nan,
                        "fit_n_min": fit.n_min if fit else pd.NA, "fit_n_max": fit.n_max if fit else pd.NA,
                        "points": fit.points if fit else 0,
                        "verdict": text + (" (extrapolated)" if extrapolated else ""),
                        "decode_setting": c.decode_setting, "config": c.config})
    return pd.DataFrame.from_records(records, columns=BUDGET_COLUMNS)


def best_against_baseline(cfg: pd.DataFrame, pts: pd.DataFrame) -> DecodeComparison | None:
    """The constant-state configuration that decodes fastest at the largest N it shares with the baseline (dense,
    else sdpa; same setting), against that baseline at that N. None without both."""
    ok = pts[pts["status"].eq(Status.OK) & (pts["time_ms"] > 0)]
    by_config = {c: g.set_index("n") for c, g in ok.groupby("config", sort=False)}
    for base in BASELINES:
        best: tuple | None = None
        for c in cfg[cfg["state_class"].eq(CONSTANT)].itertuples(index=False):
            base_cfg = baseline_config(cfg[cfg["config"].isin(by_config)], base, c.setting)
            if base_cfg is None or c.config not in by_config:
                continue
            mine, theirs = by_config[c.config], by_config[base_cfg]
            common = sorted(set(mine.index) & set(theirs.index))
            if not common:
                continue
            n = common[-1]
            key = (n, -mine.at[n, "time_ms"])
            if best is None or key > best[0]:
                best = (key, c, base_cfg, n)
        if best is None:
            continue
        _, c, base_cfg, n = best
        mine, theirs = by_config[c.config], by_config[base_cfg]
        base_label = cfg.set_index("config").at[base_cfg, "label"]
        return DecodeComparison(n=int(n), label=c.label, config=c.config, time_ms=float(mine.at[n, "time_ms"]),
                                baseline=base_label, baseline_config=base_cfg,
                                baseline_time_ms=float(theirs.at[n, "time_ms"]),
                                time_ratio=ratio(theirs.at[n, "time_ms"], mine.at[n, "time_ms"]),
                                state_ratio=ratio(theirs.at[n, "state"], mine.at[n, "state"]))
    return None


def decode_notes(rows: pd.DataFrame, pts: pd.DataFrame, copy: pd.DataFrame, copy_note: str | None) -> list[str]:
    """What the reader should know about the decode rows: rows not plotted, noisy timings, the copy bandwidth."""
    notes = []
    hidden = rows[rows["status"].isin([Status.SKIPPED, Status.ERROR])]
    for status, group in hidden.groupby("status", sort=False):
        mechs = ", ".join(dict.fromkeys(group["mechanism"].astype(str)))
        notes.append(f"{len(group)} decode row(s) {status} ({mechs}): not plotted (listed in summary.md)")
    ok = pts[pts["status"].eq(Status.OK)]
    noisy = sum(is_noisy(m, i) for m, i in zip(ok["time_ms"], ok["time_iqr_ms"]))
    if noisy:
        notes.append(f"{noisy} of {int(ok['time_ms'].notna().sum())} decode timing(s) have IQR above "
                     f"{NOISY_IQR:.0%} of the median: time-per-token slopes are less certain (more --decode-steps "
                     "give steadier medians)")
    if copy_note:
        notes.append(copy_note)
    elif len(ok):
        lines = copy_lines(copy).set_index("copy_device")["copy_gbps"]
        device = rows.groupby("config")["device"].first()
        ceiling = ok["config"].map(device).map(lines)
        faster = int((ok["read_gbps"] > ceiling).sum())
        if faster:
            notes.append(f"{faster} decode point(s) read faster than the measured copy bandwidth: their state is "
                         "small enough that it may stay in a CPU cache the 256 MiB copy does not fit in")
    return notes


def analyse_decode(df: pd.DataFrame, budget_bytes: int | None = None, copy: pd.DataFrame | None = None,
                   copy_note: str | None = None) -> DecodeAnalysis | None:
    """The decode analysis of a results DataFrame's decode rows; None when none of them is ok."""
    _, decode = split_phases(df)
    if not has_ok(decode):
        return None
    rows = prepare_decode(decode)
    cfg = decode_configurations(rows)
    pts = decode_points(rows)
    fitted = fit_configs(pts, DECODE_METRICS)
    ok = pts[pts["status"].eq(Status.OK)]
    affine = {}
    for config, group in ok.groupby("config", sort=False):
        fit = fit_affine(group["n"], group["state"])
        if fit is not None:
            affine[config] = fit
    cfg["state_class"] = cfg["config"].map(lambda c: state_class(affine.get(c)))
    copy = copy if copy is not None else pd.DataFrame(columns=COPY_COLUMNS)
    if copy.empty and copy_note is None:
        copy_note = "no copy bandwidth given: no reference line"
    return DecodeAnalysis(
        rows=rows, configs=cfg, points=pts, fits=fitted, affine=affine, state_at=state_at_table(cfg, affine),
        budget=decode_budget_table(cfg, affine, budget_bytes) if budget_bytes else None, copy=copy,
        copy_note=copy_note if copy.empty else None, comparison=best_against_baseline(cfg, pts),
        budget_bytes=budget_bytes, notes=decode_notes(rows, pts, copy, copy_note if copy.empty else None))


def fits_table(da: DecodeAnalysis) -> pd.DataFrame:
    """The content of decode_fits.csv: per configuration the affine state fit, the log-log slopes of state, time
    per token and read GB/s, and the state at each N of ``STATE_AT_N``."""
    records = []
    at = da.state_at.set_index(["config", "n"]) if len(da.state_at) else None
    for c in da.configs.itertuples(index=False):
        fit = da.affine.get(c.config)
        rec = {"label": c.label, "mechanism": c.mechanism, "batch": c.batch, "heads": c.heads, "kv_heads": c.kv_heads,
               "head_dim": c.head_dim, "dtype": c.dtype, "device": c.device, "decode_steps": c.decode_steps,
               "state_source": c.state_source, "state_class": c.state_class,
               "intercept_bytes": fit.intercept if fit else math.nan, "per_n_bytes": fit.per_n if fit else math.nan,
               "points": fit.points if fit else 0, "n_min": fit.n_min if fit else pd.NA,
               "n_max": fit.n_max if fit else pd.NA}
        for metric in DECODE_METRICS:
            f = da.fits.get((c.config, metric))
            rec[f"{metric}_slope"] = f.slope if f else math.nan
            rec[f"{metric}_slope_se"] = f.slope_se if f else math.nan
        for n in STATE_AT_N:
            known = at is not None and (c.config, n) in at.index
            rec[f"state_bytes_at_{n}"] = at.at[(c.config, n), "state_bytes"] if known else math.nan
        rec["config"] = c.config
        records.append(rec)
    return pd.DataFrame.from_records(records)
