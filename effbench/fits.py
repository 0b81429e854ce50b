"""Numbers from log-log fits: the fit itself, slopes per configuration, crossover N* against a baseline,
and the largest N under a memory budget; and the affine fit of a decode state (bytes = a + b·N) with its
largest N under a budget.

A *fit* is least squares of log y on log N over the ok points: y ≈ exp(a)·N^b, with the standard
error of b from ``numpy.polyfit``'s covariance when there are at least 3 points (with 2 points the
line is exact and the error undefined: NaN). The frames read here come from ``effbench.analysis``
(``configs``: one row per configuration; ``points``: one row per configuration and N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .status import Status

BASELINES = ("dense", "sdpa")  # the attention every other attention configuration is compared with
METRICS = {"time": "time_ms", "memory": "memory_bytes"}  # metric -> column of the points frame
FAILED_STATUSES = (Status.OOM, Status.PREDICTED_OOM, Status.TIMEOUT, Status.KILLED)  # would have run but could not


# --------------------------------------------------------------------------- the fit

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
    """Least-squares line through (log n, log y) over the positive finite pairs (``numpy.polyfit``, degree 1):
    slope, intercept and the slope's standard error (from the covariance; NaN with only 2 points).
    None with fewer than 2 distinct n."""
    ns = pd.to_numeric(pd.Series(list(n), dtype=object), errors="coerce").astype(float).to_numpy()
    ys = pd.to_numeric(pd.Series(list(y), dtype=object), errors="coerce").astype(float).to_numpy()
    keep = np.isfinite(ns) & np.isfinite(ys) & (ns > 0) & (ys > 0)
    ns, ys = ns[keep], ys[keep]
    if len(np.unique(ns)) < 2:
        return None
    x, ly = np.log(ns), np.log(ys)
    if len(x) >= 3:
        (slope, intercept), cov = np.polyfit(x, ly, 1, cov=True)
        se = math.sqrt(max(float(cov[0, 0]), 0.0))
    else:  # two points: the line goes through both, the covariance is undefined
        slope, intercept = np.polyfit(x, ly, 1)
        se = math.nan
    return Fit(slope=float(slope), intercept=float(intercept), slope_se=se, points=len(x),
               n_min=int(ns.min()), n_max=int(ns.max()))


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator when both are positive, else NaN (a missing reading is no comparison)."""
    return numerator / denominator if numerator > 0 and denominator > 0 else math.nan  # NaN compares False


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


def fit_configs(pts: pd.DataFrame, metrics: dict[str, str] | None = None) -> dict[tuple[str, str], Fit]:
    """Fit per (configuration, metric) over its ok points (``metrics``: name -> column; default ``time`` and
    ``memory``)."""
    ok = pts[pts["status"].eq(Status.OK)]
    out: dict[tuple[str, str], Fit] = {}
    for config, group in ok.groupby("config", sort=False):
        for metric, col in (METRICS if metrics is None else metrics).items():
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
                "setting": c["setting"], "comparable": c["comparable"], "metric": metric,
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

    kind: str  # "above" | "below" (cheaper above/below N*) | "always" | "never" | "n/a"
    n_star: float  # N* when it lies within a factor 2 of the measured range, else NaN
    n_cross: float  # where the fits meet, even out of range (NaN when parallel)
    text: str


def crossover(mech: Fit, base: Fit, margin: float = 2.0) -> Crossover:
    """Solve a1 + b1·x = a2 + b2·x; report N* = exp(x) when it lies within [n_lo/margin, n_hi·margin]
    (the union of both measured ranges), else say whether the mechanism is cheaper everywhere in range."""
    lo, hi = min(mech.n_min, base.n_min), max(mech.n_max, base.n_max)
    db = mech.slope - base.slope
    x = (base.intercept - mech.intercept) / db if db != 0 else math.inf
    n_cross = math.exp(x) if abs(x) < 700 else math.nan  # exp overflows past 709
    if math.isfinite(n_cross) and lo / margin <= n_cross <= hi * margin:
        kind = "above" if db < 0 else "below"
        near = "" if lo <= n_cross <= hi else " (just outside the measured range)"
        return Crossover(kind, n_cross, n_cross, f"cheaper {kind} N* ≈ {n_cross:,.0f}{near}")
    mid = math.sqrt(lo * hi)
    kind = "always" if mech.predict(mid) < base.predict(mid) else "never"
    text = f"{kind} cheaper in range"
    if not math.isfinite(n_cross):
        text += " (parallel fits)"
    elif lo / 1000 <= n_cross <= hi * 1000:
        text += f" (N* ≈ {n_cross:,.0f} not within range)"
    else:
        text += " (N* not within range)"
    return Crossover(kind, math.nan, n_cross, text)


CROSSOVER_COLUMNS = ["label", "mechanism", "baseline", "metric", "kind", "n_star", "n_cross", "verdict", "config",
                     "baseline_config"]


def _crossover_against(mine: Fit | None, theirs: Fit | None, base: str, base_cfg: str | None,
                       metric: str) -> Crossover:
    """The crossover of one configuration's fit against one baseline's, or why there is none."""
    if base_cfg is None:
        return Crossover("n/a", math.nan, math.nan, f"no {base} rows in this setting")
    if mine is None or theirs is None:
        who = "this configuration" if mine is None else base
        return Crossover("n/a", math.nan, math.nan, f"no {metric} fit for {who} (< 2 ok points)")
    return crossover(mine, theirs)


def crossover_table(cfg: pd.DataFrame, fitted: dict[tuple[str, str], Fit],
                    baselines: Iterable[str] = BASELINES) -> pd.DataFrame:
    """For every configuration in ``cfg`` (attention configurations: the caller leaves position encodings out)
    against each baseline configuration of the same setting, in time and in memory: N* and a verdict."""
    records = []
    baselines = [b for b in baselines if cfg["mechanism"].eq(b).any()]  # only baselines present in the file
    for _, c in cfg.iterrows():
        for base in baselines:
            if c["mechanism"] == base:
                continue
            base_cfg = baseline_config(cfg, base, c["setting"])
            for metric in METRICS:
                theirs = fitted.get((base_cfg, metric)) if base_cfg else None
                result = _crossover_against(fitted.get((c["config"], metric)), theirs, base, base_cfg, metric)
                records.append({"label": c["label"], "mechanism": c["mechanism"], "baseline": base,
                                "metric": metric, "kind": result.kind, "n_star": result.n_star,
                                "n_cross": result.n_cross, "verdict": result.text, "config": c["config"],
                                "baseline_config": base_cfg})
    return pd.DataFrame.from_records(records, columns=CROSSOVER_COLUMNS)


# --------------------------------------------------------------------------- memory budget

def budget_table(pts: pd.DataFrame, cfg: pd.DataFrame, budget_bytes: int) -> pd.DataFrame:
    """Largest N under ``budget_bytes`` per configuration of ``cfg``, from the memory trend.

    The trend is fitted over the measured memory of ok points and the ``predicted_bytes``
    of points that could not run (oom, predicted_oom, timeout, killed); N = floor(exp((log B − a)/b)).
    ``extrapolated`` is true when that N lies outside the fitted points' range.
    """
    measured = pts[pts["status"].eq(Status.OK)][["config", "n", "memory_bytes"]].rename(
        columns={"memory_bytes": "bytes"})
    predicted = pts[pts["status"].isin(FAILED_STATUSES)][["config", "n", "predicted_bytes"]].rename(
        columns={"predicted_bytes": "bytes"})
    trend = pd.concat([measured.assign(kind="measured"), predicted.assign(kind="predicted")]).dropna(subset=["bytes"])
    records = []
    for _, c in cfg.iterrows():
        mine = trend[trend["config"].eq(c["config"])]
        fit = fit_loglog(mine["n"], mine["bytes"])
        fitting = mine[mine["kind"].eq("measured") & (mine["bytes"] <= budget_bytes)]
        n_budget, text = _budget_n(fit, budget_bytes)
        extrapolated = fit is not None and n_budget is not pd.NA and not (fit.n_min <= n_budget <= fit.n_max)
        records.append({"label": c["label"], "mechanism": c["mechanism"], "budget_bytes": budget_bytes,
                        "n_max": n_budget, "extrapolated": bool(extrapolated),
                        "fit_n_min": fit.n_min if fit else pd.NA, "fit_n_max": fit.n_max if fit else pd.NA,
                        "largest_measured_n": int(fitting["n"].max()) if len(fitting) else pd.NA,
                        "points": fit.points if fit else 0,
                        "predicted_points": int(mine["kind"].eq("predicted").sum()),
                        "slope": fit.slope if fit else math.nan,
                        "verdict": text + (" (extrapolated)" if extrapolated else ""),
                        "config": c["config"]})
    return pd.DataFrame.from_records(records)


def _budget_n(fit: Fit | None, budget_bytes: int) -> tuple[Any, str]:
    """The largest whole N whose fitted memory is within the budget, and a verdict (pd.NA when there is none)."""
    if fit is None:
        return pd.NA, "no memory trend (fewer than 2 points)"
    if fit.slope <= 1e-9:
        return pd.NA, "memory does not grow with N in the fit"
    x = (math.log(budget_bytes) - fit.intercept) / fit.slope
    if x > 700:
        return pd.NA, "beyond any practical N"
    n = whole_n(math.exp(x))
    if n < 1:
        return 0, "even N = 1 does not fit"
    return n, f"N ≤ {n:,}"


def whole_n(value: float) -> int:
    """``value`` rounded down to a whole N, but not one below by float noise (3.9999999999999 -> 4)."""
    nearest = round(value)
    return nearest if abs(value - nearest) <= 1e-11 * abs(value) else math.floor(value)


# --------------------------------------------------------------------------- affine state (decode)

CONSTANT_REL = 1e-6  # a state whose fitted growth over the measured N is below this fraction of its size is constant


@dataclass(frozen=True)
class AffineFit:
    """bytes = intercept + per_n·N, by least squares (``numpy.polyfit``, degree 1) over ``points`` points in
    [n_min, n_max]. ``constant``: the state does not grow with N (all values equal, or the fitted growth over
    the measured range below ``CONSTANT_REL`` of the state); then ``per_n`` is 0 and ``intercept`` the mean."""

    intercept: float
    per_n: float
    points: int
    n_min: int
    n_max: int
    constant: bool

    def predict(self, n: float) -> float:
        """The fitted bytes at ``n``."""
        return self.intercept + self.per_n * n


def fit_affine(n: Iterable[float], y: Iterable[float]) -> AffineFit | None:
    """The affine fit y ≈ a + b·N over the finite pairs with y ≥ 0; None with fewer than 2 distinct n."""
    ns = pd.to_numeric(pd.Series(list(n), dtype=object), errors="coerce").astype(float).to_numpy()
    ys = pd.to_numeric(pd.Series(list(y), dtype=object), errors="coerce").astype(float).to_numpy()
    keep = np.isfinite(ns) & np.isfinite(ys) & (ns > 0) & (ys >= 0)
    ns, ys = ns[keep], ys[keep]
    if len(np.unique(ns)) < 2:
        return None
    per_n, intercept = (float(c) for c in np.polyfit(ns, ys, 1))
    mean = float(ys.mean())
    constant = bool(np.all(ys == ys[0])) or abs(per_n) * float(ns.max()) <= CONSTANT_REL * max(abs(mean), 1.0)
    if constant:
        per_n, intercept = 0.0, mean
    return AffineFit(intercept=intercept, per_n=per_n, points=len(ns), n_min=int(ns.min()), n_max=int(ns.max()),
                     constant=constant)


def affine_budget_n(fit: AffineFit | None, budget_bytes: int) -> tuple[Any, str]:
    """The largest whole N whose fitted state a + b·N is within the budget: ``(N, "N ≤ …")``; ``(pd.NA,
    "unbounded …")`` for a state that does not grow (and fits); ``(0, …)`` when not even N = 1 fits;
    ``(pd.NA, "no state trend …")`` without a fit."""
    if fit is None:
        return pd.NA, "no state trend (fewer than 2 N)"
    if fit.constant or fit.per_n <= 0:
        if fit.intercept > budget_bytes:
            return 0, "the state alone exceeds the budget at every N"
        return pd.NA, "unbounded (the state does not grow with N)"
    n = whole_n((budget_bytes - fit.intercept) / fit.per_n)
    if n < 1:
        return 0, "even N = 1 does not fit"
    return n, f"N ≤ {n:,}"
