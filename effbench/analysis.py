"""What a results file says, in numbers: configurations, points, fits, crossovers, budget, comparisons.

Everything here reads a results DataFrame (``effbench.results.read_results``) and never runs a
mechanism; display (tables, Markdown) is ``effbench.summary``, figures ``effbench.figures``. Knob
columns are derived from the CSV itself (every column that is neither a case column nor a result
column), so plugin knobs work without the plugin being loaded.

Vocabulary:

- a *configuration* is everything about a case except ``n`` (mechanism, knobs, batch,
  heads, head_dim, dtype, device, mode, causal, seed): one line on a plot;
- a *point* is one configuration at one ``n`` (duplicate rows, e.g. from a second
  sweep into the same file, are merged: medians of the ok rows, else the last status);
- *memory* is ``peak_tensor_bytes`` (the exact tensor-storage tracker), falling back to
  ``peak_alloc_bytes`` (CUDA allocator) on rows without a tracker reading, and to
  ``predicted_bytes`` on ok rows that have neither (files written by ``effbench estimate --out``);
- *comparable*: what a mechanism declares its rows are compared with (``mechanisms.REGISTRY[name]
  .comparable``): ``"attention"`` (figures, crossovers, budget and highlights against dense / sdpa)
  or ``"position"`` (position encodings: their own figure and table); a mechanism the registry
  does not know (a plugin not loaded) counts as attention.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from . import results
from .fits import (
    BASELINES,
    CROSSOVER_COLUMNS,
    Fit,
    baseline_config,
    budget_table,
    crossover_table,
    fit_configs,
    ratio,
    slope_table,
)
from .positions import Positions, analyse_positions
from .status import Status

ATTENTION, POSITION = "attention", "position"
SETTING_COLUMNS = ["batch", "heads", "head_dim", "dtype", "device", "mode", "causal"]
MEMORY_SOURCES = {"peak_tensor_bytes": "tracked tensor storage", "peak_alloc_bytes": "CUDA allocator peak",
                  "predicted_bytes": "predicted on fake tensors"}
CUDA_READINGS = {"peak_alloc_bytes": "CUDA allocator peak (max_memory_allocated)",
                 "peak_reserved_bytes": "CUDA allocator reserved (max_memory_reserved)",
                 "nvml_peak_bytes": "NVML device memory above idle",
                 "nvml_process_peak_bytes": "NVML process memory"}
DERIVED_COLUMNS = ("knobs", "setting", "config", "comparable", "memory_bytes", "memory_source", "time_ms",
                   "time_iqr_ms",  # added by prepare()
                   "state", "state_source", "kv_heads_eff", "decode_setting")  # and by decode_analysis.prepare_decode()


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


def comparable_of(mechanism: Any) -> str:
    """What a mechanism's rows are compared with, as it declares (``"attention"`` or ``"position"``);
    ``"attention"`` for a name the registry does not know."""
    import mechanisms  # lazily: only analyse() needs the registry

    spec = mechanisms.REGISTRY.get(str(mechanism))
    return spec.comparable if spec is not None else ATTENTION


@functools.lru_cache(maxsize=None)
def field_default_knobs(mechanism: str) -> dict[str, tuple[Any, str]]:
    """Knobs of ``mechanism`` whose default is a case field (``kv_heads``: ``heads``): knob -> (stored default,
    field); {} for a name the registry does not know."""
    import mechanisms

    spec = mechanisms.REGISTRY.get(str(mechanism))
    return {k.name: (k.default, k.default_from) for k in spec.knobs if k.default_from} if spec is not None else {}


def at_field_default(row: pd.Series, knob: str) -> bool:
    """Whether ``row``'s ``knob`` is at a default taken from a case field: empty, the stored default, or that
    field's value (``kv_heads`` empty, 0 or = ``heads``): one case, as in the case key."""
    declared = field_default_knobs(str(row.get("mechanism"))).get(knob)
    if declared is None:
        return False
    value = fmt_value(row.get(knob))
    return value is None or value in (fmt_value(declared[0]), fmt_value(row.get(declared[1])))


def _knob_text(row: pd.Series, knobs: list[str], effective: Iterable[str] = ()) -> str:
    """``k=v`` of the knobs that have a value; a knob at its case-field default (``kv_heads`` = ``heads``) is
    left out, unless it is in ``effective``: then it shows the value in force (the field's)."""
    parts = []
    for k in knobs:
        if at_field_default(row, k):
            if k in effective:
                parts.append(f"{k}={fmt_value(row.get(field_default_knobs(str(row.get('mechanism')))[k][1]))}")
            continue
        if (v := fmt_value(row.get(k))) is not None:
            parts.append(f"{k}={v}")
    return ",".join(parts)


def _setting_text(row: pd.Series) -> str:
    return (f"B={row['batch']} H={row['heads']} D={row['head_dim']} {row['dtype']} {row['device']} "
            f"{row['mode']} {'causal' if row['causal'] else 'bidirectional'}")


def _numeric(df: pd.DataFrame, col: str) -> pd.Series:
    """Column ``col`` as floats (NaN where missing or not a number; all NaN when the file has no such column)."""
    if col not in df:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce").astype(float)


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``knobs``, ``setting``, ``config`` (unique key of the configuration), ``comparable``,
    ``memory_bytes``/``memory_source`` and ``time_ms`` to the rows of a results file."""
    df = df.copy()
    for col in SETTING_COLUMNS + ["seed", "family", "error"]:
        if col not in df:
            df[col] = pd.NA
    knobs = knob_columns(df)
    df["knobs"] = df.apply(_knob_text, axis=1, knobs=knobs) if len(df) else pd.Series(dtype=str)
    df["setting"] = df.apply(_setting_text, axis=1) if len(df) else pd.Series(dtype=str)
    df["config"] = (df["mechanism"].astype(str) + "[" + df["knobs"] + "] " + df["setting"]
                    + " seed=" + df["seed"].astype(str))
    df["comparable"] = df["mechanism"].map({m: comparable_of(m) for m in df["mechanism"].unique()})
    tracker = _numeric(df, "peak_tensor_bytes")
    alloc = _numeric(df, "peak_alloc_bytes")
    predicted = _numeric(df, "predicted_bytes")
    df["memory_bytes"] = tracker.fillna(alloc).fillna(predicted.where(df["status"].eq(Status.OK)))
    df["memory_source"] = np.select([tracker.notna(), alloc.notna(), df["memory_bytes"].notna()],
                                    ["peak_tensor_bytes", "peak_alloc_bytes", "predicted_bytes"], "")
    df["time_ms"] = _numeric(df, "time_ms_median")
    df["time_iqr_ms"] = _numeric(df, "time_ms_iqr")
    df["predicted_bytes"] = predicted
    for col in ["param_bytes", *CUDA_READINGS]:
        df[col] = _numeric(df, col)
    return df


def configurations(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: identity, a short ``label`` unique in the file, counts and memory source.

    The label is the mechanism, the knobs that vary among that mechanism's configurations
    (all its knobs if none varies), and the case settings that vary in the file.
    """
    ok_rows = rows[rows["status"].eq(Status.OK)]
    first = rows.groupby("config", sort=False).first()
    counts = rows.assign(ok=rows["status"].eq(Status.OK)).groupby("config", sort=False).agg(
        n_rows=("status", "size"), n_ok=("ok", "sum"))
    cfg = first[["mechanism", "family", "comparable", "knobs", "setting", "seed"] + SETTING_COLUMNS].join(counts)
    cfg["n_ok_points"] = ok_rows.groupby("config")["n"].nunique().reindex(cfg.index).fillna(0)
    sources = ok_rows[ok_rows["memory_source"].ne("")].groupby("config")["memory_source"].agg(
        lambda s: "+".join(sorted(set(s))))
    cfg["memory_source"] = sources.reindex(cfg.index).fillna("")
    cfg["label"] = _labels(cfg, rows)
    baseline_rank = cfg["mechanism"].map({m: i for i, m in enumerate(BASELINES)}).fillna(len(BASELINES))
    cfg = cfg.assign(_rank=baseline_rank, _seen=range(len(cfg))).sort_values(["_rank", "_seen"], kind="stable")
    cfg["order"] = range(len(cfg))
    return cfg.drop(columns=["_rank", "_seen"]).reset_index()


def _labels(cfg: pd.DataFrame, rows: pd.DataFrame) -> pd.Series:
    """Label per configuration: mechanism, the knobs that vary for it, the settings that vary in the file."""
    knobs = knob_columns(rows)
    varying_setting = [c for c in SETTING_COLUMNS + ["seed"] if rows[c].astype(str).nunique() > 1]
    per_config = rows.groupby("config", sort=False)[["mechanism", *SETTING_COLUMNS, *knobs]].first()
    labels = {}
    for mech, group in cfg.groupby("mechanism", sort=False):
        kv = per_config.loc[group.index]
        in_force = {k: kv.apply(lambda r, k=k: _knob_text(r, [k], effective=[k]), axis=1) for k in knobs}
        varying = [k for k in knobs if in_force[k].nunique() > 1]
        # nothing varies: the numeric knobs (window, chunk, ...) name the setting; a choice of implementation without a
        # sweep axis (impl, backend) is named only where it is off its declared default
        shown = varying or [k for k in knobs if not _quiet_default(str(mech), k, kv[k])]
        for config in group.index:
            text = _knob_text(kv.loc[config], shown, effective=varying)
            label = f"{mech}[{text}]" if text else str(mech)
            extra = [_setting_part(c, cfg.at[config, c]) for c in varying_setting]
            labels[config] = " ".join([label] + extra)
    return pd.Series(labels).reindex(cfg.index)


def _quiet_default(mechanism: str, knob: str, values: pd.Series) -> bool:
    """True for a text knob of ``mechanism`` with no sweep axis (an implementation choice) whose every value is its
    declared default (or empty)."""
    import mechanisms

    spec = mechanisms.REGISTRY.get(mechanism)
    declared = next((k for k in spec.knobs if k.name == knob), None) if spec is not None else None
    if declared is None or declared.axis is not None or declared.type is not str:
        return False
    default = fmt_value(declared.default)
    return all(fmt_value(v) in (None, default) for v in values)


def _setting_part(col: str, value: Any) -> str:
    if col == "causal":
        return "causal" if value else "bidir"
    prefix = {"batch": "B=", "heads": "H=", "head_dim": "D=", "seed": "seed="}.get(col, "")
    return f"{prefix}{fmt_value(value)}"


def points(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration, n): status ``ok`` if any row there is ok (values: medians of the ok rows),
    else the last row's status; ``predicted_bytes`` the largest prediction; ``error`` the last message."""
    keys = ["config", "n"]
    values = ["time_ms", "time_iqr_ms", "memory_bytes", "param_bytes", *CUDA_READINGS]
    ok = rows[rows["status"].eq(Status.OK)].groupby(keys)[values].median()
    last = rows.groupby(keys).agg(last_status=("status", "last"), predicted_bytes=("predicted_bytes", "max"),
                                  error=("error", "last"))
    pts = last.join(ok)
    pts["status"] = np.where(pts.index.isin(ok.index), Status.OK.value, pts["last_status"])
    return pts.drop(columns="last_status").reset_index()


# --------------------------------------------------------------------------- representatives and comparisons

def main_setting(cfg: pd.DataFrame) -> str:
    """The case setting with the most ok points (the one the textbook table shows); "" without configurations."""
    if cfg.empty:
        return ""
    return cfg.groupby("setting", sort=False)["n_ok_points"].sum().sort_values(ascending=False, kind="stable").index[0]


def representatives(cfg: pd.DataFrame) -> pd.DataFrame:
    """One configuration per mechanism for the textbook table: in the main setting if it has ok points there,
    else anywhere; the one with the most ok points (then most rows, then first seen). Baselines first."""
    if cfg.empty:
        return cfg.copy()
    setting = main_setting(cfg)
    cfg = cfg.assign(in_main=cfg["setting"].eq(setting) & (cfg["n_ok_points"] > 0))
    ranked = cfg.sort_values(["in_main", "n_ok_points", "n_rows", "order"], ascending=[False, False, False, True])
    reps = ranked.drop_duplicates("mechanism")
    rank = {m: i for i, m in enumerate(BASELINES)}
    first_seen = cfg.drop_duplicates("mechanism").set_index("mechanism")["order"]
    return reps.assign(_first=reps["mechanism"].map(rank).fillna(len(rank)),
                       _order=reps["mechanism"].map(first_seen)
                       ).sort_values(["_first", "_order"]).drop(columns=["_first", "_order", "in_main"])


COMPARISON_COLUMNS = ["label", "setting", "baseline", "baseline_config", "n", "time_ratio", "memory_ratio",
                      "largest_n", "baseline_largest_n"]


def comparisons(pts: pd.DataFrame, reps: pd.DataFrame, cfg: pd.DataFrame, baseline: str = BASELINES[0]) -> pd.DataFrame:
    """Each representative against ``baseline`` in the same setting (a causal-only mechanism against causal
    dense), at the largest N both ran: ``time_ratio`` = baseline time / its time, ``memory_ratio`` likewise;
    ``largest_n`` its largest ok N when that is beyond the baseline's largest (``baseline_largest_n``), else NA."""
    ok = pts[pts["status"].eq(Status.OK)]
    records = []
    for rep in reps.itertuples(index=False):
        base_cfg = None if rep.mechanism == baseline else baseline_config(cfg, baseline, rep.setting)
        if base_cfg is None:
            continue
        b = ok[ok["config"].eq(base_cfg)].set_index("n")
        m = ok[ok["config"].eq(rep.config)].set_index("n")
        common = sorted(set(m.index) & set(b.index))
        if not common:
            continue
        n = common[-1]
        beyond = m.index[m.index > b.index.max()]
        records.append({"label": rep.label, "setting": rep.setting, "baseline": baseline, "baseline_config": base_cfg,
                        "n": int(n), "time_ratio": ratio(b.at[n, "time_ms"], m.at[n, "time_ms"]),
                        "memory_ratio": ratio(b.at[n, "memory_bytes"], m.at[n, "memory_bytes"]),
                        "largest_n": int(beyond.max()) if len(beyond) else pd.NA,
                        "baseline_largest_n": int(b.index.max())})
    return pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS)


# --------------------------------------------------------------------------- the whole analysis

@dataclass
class Analysis:
    """Everything computed from one results file (numbers; no display strings, no figures).

    Crossovers, budget, representatives and comparisons cover the attention configurations only;
    position encodings are in ``positions``."""

    rows: pd.DataFrame  # the CSV rows, prepared
    configs: pd.DataFrame  # one row per configuration (label, comparable, counts, memory source)
    points: pd.DataFrame  # one row per (configuration, N)
    fits: dict[tuple[str, str], Fit]  # (config, "time" | "memory") -> Fit
    slopes: pd.DataFrame  # tidy: configuration × metric (every configuration)
    crossovers: pd.DataFrame  # attention configuration × baseline × metric
    budget: pd.DataFrame | None  # attention configuration: largest N under the budget (None without a budget)
    representatives: pd.DataFrame  # one attention configuration per mechanism
    comparisons: pd.DataFrame  # each representative against dense at the largest common N
    positions: Positions | None  # the position encodings (None when the file has none)

    @property
    def attention(self) -> pd.DataFrame:
        """The configurations compared with attention (every one not declared a position encoding)."""
        return self.configs[self.configs["comparable"].ne(POSITION)]

    @property
    def setting(self) -> str:
        """The main setting: the one with the most ok attention points."""
        return main_setting(self.attention) or main_setting(self.configs)


def _no_ok_rows(df: pd.DataFrame, source: str) -> results.ResultsError:
    counts = df["status"].value_counts() if "status" in df else pd.Series(dtype=int)
    what = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no rows"
    return results.ResultsError(f"{source} has no ok rows ({what}): nothing to plot; "
                                "run `effbench sweep` with sizes that fit")


def analyse(df: pd.DataFrame, budget_bytes: int | None = None, source: str = "results file") -> Analysis:
    """Run every analysis on a results DataFrame; raise ResultsError when it has no ok rows."""
    if "status" not in df or not df["status"].eq(Status.OK).any():
        raise _no_ok_rows(df, source)
    rows = prepare(df)
    cfg = configurations(rows)
    pts = points(rows)
    fitted = fit_configs(pts)
    attention = cfg[cfg["comparable"].ne(POSITION)]
    reps = representatives(attention)
    return Analysis(
        rows=rows, configs=cfg, points=pts, fits=fitted, slopes=slope_table(cfg, fitted),
        crossovers=crossover_table(attention, fitted) if len(attention) else pd.DataFrame(columns=CROSSOVER_COLUMNS),
        budget=budget_table(pts, attention, budget_bytes) if budget_bytes else None,
        representatives=reps, comparisons=comparisons(pts, reps, attention),
        positions=analyse_positions(cfg[cfg["comparable"].eq(POSITION)], pts, representatives),
    )


# --------------------------------------------------------------------------- verify output

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
