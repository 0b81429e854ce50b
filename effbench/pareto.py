"""Accuracy against cost at one N: each mechanism and knob value's error beside its time and peak memory.

``effbench plot results.csv --verify verify.csv [--n N]`` draws ``pareto.png`` (two panels: error vs
time per call, error vs peak memory) and writes ``pareto.md``, from files only:

- **error**: the fidelity rows of the verify file(s), ‖o − dense‖/‖v‖; on real inputs (``verify --inputs
  minilm``) when a file has them, the mean over layers × heads with its min–max across them as a bar,
  else on Gaussian inputs. The error is measured at the verify run's N (MiniLM: at most 512), not at the
  figure's N;
- **cost**: the results file's ok rows at one N (:func:`choose_n`: by default the N at which the most
  points have both readings, the largest on a tie: the longest sequence that still shows every
  mechanism that ran), in its main setting (batch, heads, head size, dtype, device, mode);
- a **point** is a verify row and a results configuration of the same mechanism and causal mode whose
  knobs agree on every knob the verify row names (a knob the results file has no column for is at its
  default); a point needs both. A verify run on MiniLM inputs measures the default knobs, so it pairs
  with a sweep at its defaults;
- **exact attention** (``dense``, ``sdpa``) has no error: it is drawn on a separate "exact" row under
  the log error axis, with a dotted line at its cost; a point at or below :data:`EXACT_ERROR` (an
  approximation at a setting that covers every key, float32 round-off) sits on that row too;
- **the front** (:func:`pareto_mask`): the points no other point beats on both error and cost, exact
  attention included (an approximation slower than exact attention is off the front); one front per
  panel, drawn as a step line and labelled.

Nothing here runs a mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter
from matplotlib.transforms import blended_transform_factory

from .analysis import POSITION, Analysis, fmt_value
from .figure_base import (
    FAMILY_MARKERS,
    PALETTE,
    PlotResult,
    format_metric_axis,
    new_figure,
)
from .fits import BASELINES
from .status import Status
from .units import UsageError, fmt_bytes, fmt_ms

FIGURE_NAME = "pareto"
TABLE_NAME = "pareto.md"
EXACT_ERROR = 1e-5  # at or below: float32 round-off of exact attention, drawn on the "exact" row
COSTS = {"time": ("time_ms", "time per call (ms, median)"), "memory": ("memory_bytes", "peak memory per call")}


# --------------------------------------------------------------------------- the front

def pareto_mask(cost: Any, error: Any) -> np.ndarray:
    """Which points are on the Pareto front when both ``cost`` and ``error`` are minimised: True where no other
    point is at most as costly and at most as wrong and strictly better in one of the two. Equal points are
    all on it; a point with a missing (NaN) value is on it never and beats nothing."""
    x = np.asarray(cost, dtype=float)
    y = np.asarray(error, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"cost and error differ in length: {x.shape} vs {y.shape}")
    valid = ~(np.isnan(x) | np.isnan(y))
    on = valid.copy()
    for i in np.flatnonzero(valid):
        no_worse = valid & (x <= x[i]) & (y <= y[i])
        better = (x < x[i]) | (y < y[i])
        on[i] = not (no_worse & better).any()
    return on


# --------------------------------------------------------------------------- verify points

def _is_real(inputs: pd.Series) -> pd.Series:
    text = inputs.fillna("").astype(str).str.strip()
    return text.ne("") & text.ne("gaussian")


def error_rows(verify: pd.DataFrame | None) -> pd.DataFrame | None:
    """The rows the error-vs-knob figure draws: the Gaussian ones (where the trends are checked), so that adding
    a MiniLM file leaves that figure as it was; a file with real-input rows only gives those."""
    if verify is None or "inputs" not in verify:
        return verify
    real = _is_real(verify["inputs"])
    fidelity = verify["check"].eq("fidelity")
    return verify[~real] if (fidelity & ~real).any() else verify


def parse_knobs(text: Any) -> dict[str, str]:
    """``"window=8, impl=eager"`` (a verify row's ``knobs``) -> {"window": "8", "impl": "eager"}."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return {}
    out = {}
    for part in str(text).split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def verify_points(verify: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """(fidelity rows with an error, as points to match; the inputs they were measured on): the real-input rows
    when there are any, else the Gaussian ones. Columns: mechanism, causal, knob, knob_value, knobs (a dict),
    error, error_min, error_max, error_std, verify_n."""
    v = verify[verify["check"].eq("fidelity")].copy()
    v["error"] = pd.to_numeric(v["error_rel"], errors="coerce")
    v = v[v["error"].notna()]
    inputs = v["inputs"] if "inputs" in v else pd.Series("", index=v.index)
    real = _is_real(inputs)
    chosen = "gaussian"
    if real.any():
        chosen = str(inputs[real].iloc[0])
        v = v[inputs.eq(chosen)]
    else:
        v = v[~real]
    for col in ("error_min", "error_max", "error_std"):
        v[col] = pd.to_numeric(v[col], errors="coerce") if col in v else np.nan
    v["causal"] = v["causal"].map(lambda x: str(x).strip().lower() == "true") if "causal" in v else False
    v["knob"] = v["knob"].fillna("").astype(str)
    v["knobs"] = (v["knobs"] if "knobs" in v else pd.Series("", index=v.index)).map(parse_knobs)
    v["verify_n"] = pd.to_numeric(v["n"], errors="coerce") if "n" in v else np.nan
    cols = ["mechanism", "causal", "knob", "knob_value", "knobs", "error", "error_min", "error_max", "error_std",
            "verify_n"]
    return v[cols].reset_index(drop=True), chosen


# --------------------------------------------------------------------------- matching with the results file

def _knob_default(mechanism: str, knob: str) -> str | None:
    import mechanisms

    spec = mechanisms.REGISTRY.get(mechanism)
    declared = next((k for k in spec.knobs if k.name == knob), None) if spec is not None else None
    return fmt_value(declared.default) if declared is not None else None


def _same(a: Any, b: Any) -> bool:
    """Knob values equal as text (``8`` = ``8.0``, ``False`` = ``false``)."""
    if a is None or b is None:
        return a is b
    a, b = str(a).lower(), str(b).lower()
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def _config_knobs(an: Analysis) -> dict[str, pd.Series]:
    """config -> its first row (knob columns and all)."""
    first = an.rows.drop_duplicates("config")
    return {row["config"]: row for _, row in first.iterrows()}


def _matches(row: pd.Series, mechanism: str, knobs: dict[str, str]) -> bool:
    for k, v in knobs.items():
        have = fmt_value(row.get(k)) if k in row.index else None
        if have is None:
            have = _knob_default(mechanism, k)
        if not _same(have, v):
            return False
    return True


def _setting_key(setting: str) -> str:
    """A setting without its causal mode (a causal-only mechanism is in the main setting's causal twin)."""
    return setting.replace(" bidirectional", "").replace(" causal", "")


def candidates(an: Analysis, points: pd.DataFrame) -> pd.DataFrame:
    """Each verify point paired with the results configurations it matches (main setting or its causal twin):
    the verify columns plus config, label, family."""
    cfg = an.configs[an.configs["comparable"].ne(POSITION)]
    cfg = cfg[cfg["setting"].map(_setting_key).eq(_setting_key(an.setting))]
    first = _config_knobs(an)
    records = []
    for p in points.to_dict("records"):
        if p["mechanism"] in BASELINES or _is_exact(p["mechanism"]):
            continue
        mine = cfg[cfg["mechanism"].eq(p["mechanism"]) & cfg["causal"].map(bool).eq(bool(p["causal"]))]
        for c in mine.itertuples(index=False):
            if _matches(first[c.config], p["mechanism"], p["knobs"]):
                records.append({**p, "config": c.config, "family": c.family})
                break
    return pd.DataFrame.from_records(records, columns=[*points.columns, "config", "family"])


def _is_exact(mechanism: str) -> bool:
    import mechanisms

    spec = mechanisms.REGISTRY.get(str(mechanism))
    return bool(spec is not None and spec.exact)


def _ok_at(an: Analysis) -> pd.DataFrame:
    pts = an.points[an.points["status"].eq(Status.OK)]
    return pts[(pts["time_ms"] > 0) & (pts["memory_bytes"] > 0)]


def choose_n(an: Analysis, matched: pd.DataFrame, n: int | None = None) -> tuple[int | None, str]:
    """(the N of the costs, how it was chosen). ``n`` given: it, if the results file has it (UsageError
    otherwise). Else the N at which the most matched points have ok time and memory, the largest on a tie
    (None when no point has both anywhere)."""
    have = sorted(int(x) for x in an.points["n"].unique())
    if n is not None:
        if n not in have:
            raise UsageError(f"--n {n}: the results file has N = {', '.join(f'{x:,}' for x in have)}")
        return n, f"N = {n:,} (--n)"
    ok = _ok_at(an)
    counts = ok[ok["config"].isin(set(matched["config"]))].groupby("n")["config"].nunique()
    if counts.empty:
        return None, "no point has time and memory at any N"
    best = counts.max()
    chosen = int(max(int(k) for k, c in counts.items() if c == best))
    return chosen, (f"N = {chosen:,}: the N at which the most mechanism/knob points ({best} of {len(matched)}) have "
                    "time and memory, the largest on a tie (--n to choose another)")


# --------------------------------------------------------------------------- the whole frontier

@dataclass
class Frontier:
    """Points (error, time, memory, on which front), exact-attention baselines, and what they were made of."""

    n: int
    inputs: str
    verify_n: list[int]
    setting: str
    n_choice: str
    points: pd.DataFrame  # label, mechanism, family, causal, knob, knob_value, error*, time_ms, memory_bytes, front_*
    baselines: pd.DataFrame  # label, mechanism, causal, time_ms, memory_bytes, front_*
    notes: list[str] = field(default_factory=list)

    @property
    def front(self) -> pd.DataFrame:
        """Every point and baseline on either front, cheapest in time first."""
        both = pd.concat([self.baselines.assign(error=0.0), self.points], ignore_index=True)
        on = both[both["front_time"] | both["front_memory"]]
        return on.sort_values(["time_ms", "error"]).reset_index(drop=True)


def _label(p: dict) -> str:
    value = p.get("knob_value")
    knob = f" {p['knob']}={fmt_value(pd.to_numeric(value, errors='coerce'))}" if p.get("knob") else ""
    return f"{p['mechanism']}{knob}" + (" (causal)" if p["causal"] else "")


def _baselines(an: Analysis, n: int, causal_modes: set[bool]) -> pd.DataFrame:
    """The exact attention at ``n``: per baseline mechanism and causal mode of the points, its configuration
    with the most ok points (the textbook one) in the main setting's mode (or its causal twin)."""
    ok = _ok_at(an)
    ok = ok[ok["n"].eq(n)]
    cfg = an.configs[an.configs["mechanism"].isin(BASELINES)]
    cfg = cfg[cfg["setting"].map(_setting_key).eq(_setting_key(an.setting))]
    records = []
    for causal in sorted(causal_modes):
        for mech in BASELINES:
            mine = cfg[cfg["mechanism"].eq(mech) & cfg["causal"].map(bool).eq(causal)]
            mine = mine.sort_values(["n_ok_points", "n_rows", "order"], ascending=[False, False, True])
            for c in mine.itertuples(index=False):
                at = ok[ok["config"].eq(c.config)]
                if len(at):
                    records.append({"label": mech + (" (causal)" if causal else ""), "mechanism": mech,
                                    "causal": causal, "config": c.config, "time_ms": float(at["time_ms"].iloc[0]),
                                    "memory_bytes": float(at["memory_bytes"].iloc[0])})
                    break
    return pd.DataFrame.from_records(records, columns=["label", "mechanism", "causal", "config", "time_ms",
                                                       "memory_bytes"])


def make_frontier(an: Analysis | None, verify: pd.DataFrame, n: int | None = None) -> Frontier | None:
    """The points, baselines and fronts at one N, or None when nothing pairs (no prefill analysis, no fidelity
    row with an error, or no verify row matching a configuration with time and memory): the reason is then
    in ``notes_of_none``. UsageError for an ``n`` the results file does not have."""
    if an is None:
        if n is not None:
            raise UsageError("--n: the results file has no ok prefill rows to take time and memory from")
        return None
    points, inputs = verify_points(verify)
    matched = candidates(an, points)
    n_used, how = choose_n(an, matched, n)
    if n_used is None:
        return None
    ok = _ok_at(an)
    at = ok[ok["n"].eq(n_used)].set_index("config")
    records, missing = [], []
    for p in matched.to_dict("records"):
        if p["config"] not in at.index:
            missing.append(_label(p))
            continue
        row = at.loc[p["config"]]
        records.append({**p, "label": _label(p), "time_ms": float(row["time_ms"]),
                        "memory_bytes": float(row["memory_bytes"])})
    cols = ["label", "mechanism", "family", "causal", "knob", "knob_value", "error", "error_min", "error_max",
            "error_std", "verify_n", "config", "time_ms", "memory_bytes"]
    pts = pd.DataFrame.from_records(records, columns=cols)
    base = _baselines(an, n_used, set(pts["causal"].map(bool)) or {False})
    notes = []
    if base.empty:
        notes.append(f"pareto: no exact attention (dense, sdpa) has time and memory at N={n_used:,}: no exact row")
    missing_base = sorted(set(BASELINES) - set(base["mechanism"]))
    if missing_base and not base.empty:
        notes.append(f"pareto: {', '.join(missing_base)} did not run at N={n_used:,}: not drawn")
    if missing:
        notes.append(f"pareto: {len(missing)} matched point(s) have no time and memory at N={n_used:,}: "
                     + ", ".join(missing[:8]) + (" …" if len(missing) > 8 else ""))
    unmatched = sorted({p["mechanism"] for p in points.to_dict("records")
                        if p["mechanism"] not in BASELINES and not _is_exact(p["mechanism"])}
                       - set(matched["mechanism"]))
    skipped = _skipped_at_configs(an, verify, inputs, unmatched)
    for mech, (knobs, why) in skipped.items():
        notes.append(f"pareto: no {mech} point: its verify row at the knobs of the sweep ({knobs}) was skipped: {why}")
    rest = [m for m in unmatched if m not in skipped]
    if rest:
        notes.append("pareto: no results configuration has the knobs of the verify rows of "
                     + ", ".join(rest) + " (a MiniLM verify run measures the default knobs; sweep those)")
    if pts.empty:
        notes.append(f"pareto: no point at N={n_used:,}: not drawn")
        return None
    both = pd.concat([base.assign(error=0.0), pts.assign(error=pts["error"].where(pts["error"] > EXACT_ERROR, 0.0))],
                     ignore_index=True)
    for metric, (col, _) in COSTS.items():
        mask = pareto_mask(both[col], both["error"])
        base[f"front_{metric}"] = mask[: len(base)]
        pts[f"front_{metric}"] = mask[len(base):]
    verify_n = sorted({int(x) for x in pts["verify_n"].dropna()})
    return Frontier(n=n_used, inputs=inputs, verify_n=verify_n, setting=_setting_key(an.setting), n_choice=how,
                    points=pts, baselines=base, notes=notes)


def _skipped_at_configs(an: Analysis, verify: pd.DataFrame, inputs: str, mechs: list[str]) -> dict[str, tuple]:
    """For each of ``mechs``: (knobs, reason) of a fidelity row on ``inputs`` without an error (skipped) whose knobs
    match a results configuration, i.e. why the setting the sweep measured has no error."""
    if not mechs or "reason" not in verify:
        return {}
    v = verify[verify["check"].eq("fidelity") & verify["mechanism"].isin(mechs)
               & pd.to_numeric(verify["error_rel"], errors="coerce").isna()]
    if "inputs" in v:
        v = v[v["inputs"].fillna("gaussian").replace("", "gaussian").eq(inputs)]
    cfg = an.configs[an.configs["setting"].map(_setting_key).eq(_setting_key(an.setting))]
    first = _config_knobs(an)
    out: dict[str, tuple] = {}
    for r in v.to_dict("records"):
        knobs = parse_knobs(r.get("knobs"))
        mine = cfg[cfg["mechanism"].eq(r["mechanism"])]
        if r["mechanism"] not in out and any(_matches(first[c], r["mechanism"], knobs) for c in mine["config"]):
            out[r["mechanism"]] = (str(r.get("knobs")), str(r.get("reason")))
    return out


def notes_of_none(an: Analysis | None, verify: pd.DataFrame) -> list[str]:
    """Why :func:`make_frontier` gave None, in one note."""
    if an is None:
        return ["pareto not drawn: the results file has no ok prefill rows"]
    points, _ = verify_points(verify)
    if points.empty:
        return ["pareto not drawn: the verify file has no fidelity row with an error"]
    return [("pareto not drawn: no verify row has the mechanism, causal mode and knobs of a results configuration "
             "with time and memory (a MiniLM verify run measures the default knobs: pair it with a sweep at them)")]


def build(an: Analysis | None, verify: pd.DataFrame | None, n: int | None = None) -> tuple[Frontier | None, list[str]]:
    """`effbench plot`'s one call: (the frontier or None, notes for the summary). UsageError for ``n`` without a
    verify file or not in the results file (raised before anything is written)."""
    if verify is None:
        if n is not None:
            raise UsageError("--n picks the N of the accuracy-vs-cost figure: give --verify too")
        return None, []
    fr = make_frontier(an, verify, n)
    if fr is None:
        return None, notes_of_none(an, verify)
    return fr, fr.notes


# --------------------------------------------------------------------------- the figure

def inputs_text(fr: Frontier) -> str:
    ns = ", ".join(f"{x:,}" for x in fr.verify_n)
    if fr.inputs == "minilm":
        return f"all-MiniLM-L6-v2 q, k, v at N={ns} (mean over layers × heads; bar: min–max across heads)"
    return f"{fr.inputs} q, k, v at N={ns}"


def figure(fr: Frontier) -> PlotResult:
    """Two panels: error against time and against peak memory, log-log, one marker per point (colour per
    mechanism, shape per family; a faint bar for its spread across heads), exact attention on the row under the
    error axis with a dotted line at its cost, and each panel's front a step line whose points are numbered and
    listed in the panel."""
    fig, axes = new_figure(width=15.0, height=6.8, nrows=1, ncols=2, layout="constrained")
    result = PlotResult(FIGURE_NAME, fig)
    pts, base = fr.points, fr.baselines
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(dict.fromkeys(pts["mechanism"]))}
    means = pts.loc[pts["error"] > EXACT_ERROR, "error"]
    lo = float(means.min()) if len(means) else 1e-3
    hi = float(np.nanmax(pts.loc[pts["error"] > EXACT_ERROR, ["error", "error_max"]].to_numpy())) if len(means) else 1
    exact_y = lo / 6  # the "exact" row, under every mean error; spread bars are cut at its top
    band = exact_y * 1.7
    bottom, top = exact_y / 1.7, hi * 1.5
    for ax, (metric, (col, xlabel)) in zip(axes.flat, COSTS.items()):
        ax.set_xscale("log", base=10 if metric == "time" else 2)
        ax.set_yscale("log")
        ax.axhspan(bottom, band, color="0.93", zorder=0)
        ax.axhline(band, color="0.6", linewidth=0.8, linestyle=(0, (2, 2)), zorder=1)
        for p in pts.itertuples(index=False):
            y = p.error if p.error > EXACT_ERROR else exact_y
            on = bool(getattr(p, f"front_{metric}"))
            style = {"color": colours[p.mechanism], "marker": FAMILY_MARKERS.get(p.family, "o"),
                     "markersize": 8 if on else 6.5, "linestyle": "none", "markeredgewidth": 1.0, "zorder": 4,
                     "markeredgecolor": "black" if on else "none", "alpha": 1.0 if on else 0.8}
            (line,) = ax.plot([getattr(p, col)], [y], **style)
            result.lines[f"{metric}:{p.label}"] = line
            if p.error > EXACT_ERROR and pd.notna(p.error_min) and pd.notna(p.error_max):
                ax.plot([getattr(p, col)] * 2, [max(p.error_min, band), p.error_max], color=colours[p.mechanism],
                        alpha=0.3, linewidth=1.3, zorder=3, solid_capstyle="butt")
        _baseline_marks(ax, base, col, exact_y, result, metric, pts[col])
        _front_line(ax, fr, metric, col, exact_y, result)
        ax.set_ylim(bottom, top)
        _cost_ticks(ax, metric)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: "" if v < band else f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.text(-0.012, exact_y, "exact\n(0)", transform=blended_transform_factory(ax.transAxes, ax.transData),
                ha="right", va="center", fontsize="small")
        ax.set_xlabel(f"{xlabel} at N={fr.n:,}")
        ax.set_ylabel("error ‖o − dense‖ / ‖v‖")
        ax.set_title(f"error vs {'time' if metric == 'time' else 'peak memory'}", fontsize="medium")
        ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=colours[m], marker=FAMILY_MARKERS.get(f, "o"), linestyle="none", markersize=7,
                      label=m) for m, f in dict(zip(pts["mechanism"], pts["family"])).items()]
    handles += [Line2D([], [], marker="*", color="black", linestyle="none", markersize=11, label="exact attention"),
                Line2D([], [], color="black", linewidth=1.6, label="Pareto front (black-edged, numbered)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize="small",
               frameon=False)
    fig.suptitle(f"Accuracy vs cost at N={fr.n:,} ({fr.setting}): one point per mechanism and knob value\n"
                 f"error on {inputs_text(fr)}", fontsize="medium")
    return result


def _baseline_marks(ax, base: pd.DataFrame, col: str, exact_y: float, result: PlotResult, metric: str,
                    others: pd.Series) -> None:
    """Exact attention on the exact row: a star and a dotted line at its cost; baselines at (nearly) the same cost
    share one label."""
    groups: list[tuple[float, list[str]]] = []
    for b in base.sort_values(col).itertuples(index=False):
        x = float(getattr(b, col))
        ax.axvline(x, color="0.3", linewidth=0.9, linestyle=(0, (1, 2)), zorder=1)
        (line,) = ax.plot([x], [exact_y], marker="*", markersize=13, color="black", linestyle="none", zorder=5)
        result.lines[f"{metric}:{b.label}"] = line
        if groups and x <= groups[-1][0] * 1.15:
            groups[-1][1].append(b.label)
        else:
            groups.append((x, [b.label]))
    xs = [x for x, _ in groups] + [float(v) for v in others]
    middle = float(np.sqrt(min(xs) * max(xs))) if xs else 1.0  # log-scale midpoint of what the panel shows
    for i, (x, labels) in enumerate(groups):
        right = x <= middle  # label on the side with room
        ax.annotate(", ".join(labels), (x, exact_y), xytext=(8 if right else -8, 7 + 11 * (i % 2)),
                    textcoords="offset points", ha="left" if right else "right", fontsize="small", fontweight="bold")


def _cost_ticks(ax, metric: str) -> None:
    """Cost axis labels: ms with 2× and 5× between decades when the span is short; bytes at powers of two."""
    format_metric_axis(ax.xaxis, metric, ax.get_xlim(), short_span=100)


def _front_line(ax, fr: Frontier, metric: str, col: str, exact_y: float, result: PlotResult) -> None:
    """The front of one panel: a step line through its points (cheapest first), each numbered beside its marker
    and listed, with error and cost, in a box in the empty upper right of the panel."""
    on = pd.concat([fr.baselines.assign(error=0.0), fr.points], ignore_index=True)
    on = on[on[f"front_{metric}"]].sort_values([col, "error"], ascending=[True, False])
    if on.empty:
        return
    xs = on[col].to_numpy(dtype=float)
    errs = on["error"].to_numpy(dtype=float)
    ys = np.where(errs > EXACT_ERROR, errs, exact_y)
    (line,) = ax.step(xs, ys, where="post", color="black", linewidth=1.6, zorder=2, label="Pareto front")
    result.lines[f"{metric}:front"] = line
    lines, numbers = [], {}
    for i, r in enumerate(on.itertuples(index=False), start=1):
        cost = fmt_ms(r.time_ms) + " ms" if metric == "time" else fmt_bytes(r.memory_bytes)
        exact = r.mechanism in BASELINES or not r.error > EXACT_ERROR
        lines.append(f"{i:>2}  {r.label}: " + ("exact" if exact else f"{r.error:.2g}") + f", {cost}")
        numbers.setdefault((float(getattr(r, col)), float(ys[i - 1])), []).append(str(i))  # one label per spot
    for (x, y), nums in numbers.items():
        ax.annotate(",".join(nums), (x, y), xytext=(-5, 5) if y > exact_y else (-8, -13), textcoords="offset points",
                    ha="right", fontsize="small", fontweight="bold", zorder=6)
    ax.text(0.985, 0.985, "Pareto front\n" + "\n".join(lines), transform=ax.transAxes, ha="right", va="top",
            multialignment="left", fontsize="small", family="monospace", zorder=7,
            bbox={"boxstyle": "round,pad=0.4", "facecolor": "white", "edgecolor": "0.7", "alpha": 0.92})


# --------------------------------------------------------------------------- the table

def front_table(fr: Frontier) -> pd.DataFrame:
    """The front (either panel's) as display strings, cheapest in time first."""
    rows = []
    for r in fr.front.itertuples(index=False):
        exact = r.mechanism in BASELINES or not r.error > EXACT_ERROR
        spread = (f" ({r.error_min:.2g}–{r.error_max:.2g})" if not exact and pd.notna(getattr(r, "error_min", None))
                  and pd.notna(getattr(r, "error_max", None)) else "")
        on = [m for m in COSTS if getattr(r, f"front_{m}")]
        rows.append({"mechanism / knob": r.label, "error": ("0 (exact)" if exact else f"{r.error:.3g}") + spread,
                     f"time (ms) at N={fr.n:,}": fmt_ms(r.time_ms),
                     f"peak memory at N={fr.n:,}": fmt_bytes(r.memory_bytes),
                     "on the front of": ", ".join(on)})
    return pd.DataFrame(rows)


def points_table(fr: Frontier) -> pd.DataFrame:
    """Every point, lowest error first."""
    rows = []
    for r in fr.points.sort_values("error").itertuples(index=False):
        rows.append({"mechanism / knob": r.label, "error": f"{r.error:.3g}", "time (ms)": fmt_ms(r.time_ms),
                     "peak memory": fmt_bytes(r.memory_bytes),
                     "front": ", ".join(m for m in COSTS if getattr(r, f"front_{m}")) or "—"})
    return pd.DataFrame(rows)


def markdown(fr: Frontier, image: bool = True) -> str:
    """``pareto.md`` (and, without the image, the section of ``summary.md``): what was paired with what, the front,
    every point."""
    from .summary import md_table

    how = "; in the tables, min–max across heads in brackets" if fr.inputs != "gaussian" else ""
    lines = [f"## Accuracy vs cost at N = {fr.n:,}", "",
             (f"Error: `effbench verify` fidelity ‖o − dense‖/‖v‖ on {inputs_text(fr)}{how}. "
             f"Time and peak memory: the results file at {fr.n_choice}, setting `{fr.setting}`. A point is a verify "
             "row and a results configuration of the same mechanism, causal mode and knobs. Exact attention (dense, "
             "sdpa) has error 0; the front is the set of points no other point beats on both error and cost, exact "
             "attention included."), "",
             *(["![Accuracy vs cost: error against time and peak memory, Pareto front](pareto.png)", ""] if image else []),
             "### The Pareto front", "", md_table(front_table(fr)), "",
             "### Every point", "", md_table(points_table(fr))]
    if fr.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in fr.notes]
    return "\n".join(lines) + "\n"


def write_markdown(fr: Frontier, out_dir: Path) -> Path:
    path = Path(out_dir) / TABLE_NAME
    path.write_text(markdown(fr))
    return path
