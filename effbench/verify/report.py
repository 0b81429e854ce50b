"""The verify report: one typed record per check, the report, and the CSV writer and reader side by side.

Every fact a reader needs is a field of :class:`CheckResult` (mode, result, reason, trend, ...);
``detail`` is prose for people and is never parsed back.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import pandas as pd

from ..results import ResultsError

class Outcome(str, Enum):
    """What became of one check (the ``result`` column)."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"  # could not run here (the mechanism said why)
    NA = "n/a"  # does not apply (a trend without the points it needs, a position encoding's fidelity)

    def __str__(self) -> str:
        return self.value


@dataclass
class CheckResult:
    """One row of the verify table and CSV.

    ``passed`` True/False for a check that ran; None for one that was skipped (``reason`` says why)
    or does not apply (``applicable`` False, ``reason`` says why).
    """

    mechanism: str
    check: str  # impl-output | impl-grad | fidelity | trend
    n: int
    causal: bool | None = None
    knob: str = ""
    knob_value: Any = None
    error_rel: float | None = None
    cosine: float | None = None
    max_abs_err: float | None = None
    tolerance: float | None = None
    passed: bool | None = None
    detail: str = ""
    mode: str = ""  # causal | bidirectional | position encoding
    reason: str = ""  # why skipped / not applicable, or what failed
    applicable: bool = True
    trend: str = ""  # trend rows: decreasing | ratio_per_4x | equals_dense_at
    expected: str = ""  # trend rows: what theory promises, e.g. "0.35–0.65"
    seeds: int | None = None  # fidelity rows: seeds averaged over
    target: str = ""  # fidelity rows: what the output is compared with
    knobs: str = ""  # the knob setting of the check
    inputs: str = ""  # fidelity and trend rows: gaussian | minilm (the q, k, v the error was measured on)
    error_std: float | None = None  # real inputs: spread of the per-head error across layers × heads
    error_min: float | None = None
    error_max: float | None = None
    samples: int | None = None  # real inputs: layer × head pairs the error is averaged over (MiniLM: 72)
    gaussian_error_rel: float | None = None  # real inputs: the same setting's error on Gaussian inputs

    @property
    def result(self) -> Outcome:
        if self.passed is True:
            return Outcome.PASS
        if self.passed is False:
            return Outcome.FAIL
        return Outcome.SKIP if self.applicable else Outcome.NA

    def as_row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row["result"] = self.result.value
        return row


LEGACY_COLUMNS = ("mechanism", "check", "knob", "knob_value", "n", "causal", "error_rel", "cosine", "max_abs_err",
                  "tolerance", "passed", "detail")  # the schema of earlier versions, first and in its order
COLUMNS = LEGACY_COLUMNS + tuple(f.name for f in fields(CheckResult) if f.name not in LEGACY_COLUMNS) + ("result",)
REQUIRED = ("mechanism", "check", "knob", "knob_value", "error_rel")


@dataclass
class VerifyReport:
    rows: list[CheckResult]
    mechanisms: list[str]
    n: int
    dtype: str
    device: str
    seed: int
    tolerance: float
    passed: bool = True
    inputs: str = "gaussian"  # what the fidelity layer ran on (--inputs)
    notes: list[str] = field(default_factory=list)  # said once above the table (e.g. N clamped to MiniLM's limit)

    def failing(self) -> dict[str, list[CheckResult]]:
        """Failing rows grouped by mechanism, in run order."""
        out: dict[str, list[CheckResult]] = {}
        for r in self.rows:
            if r.passed is False:
                out.setdefault(r.mechanism, []).append(r)
        return out

    @property
    def failing_mechanisms(self) -> list[str]:
        return list(self.failing())


def write_csv(report: VerifyReport, path: str | Path) -> Path:
    """Write every row (schema ``COLUMNS``) to ``path``, replacing it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in report.rows:
            row = r.as_row()
            writer.writerow({c: ("" if row[c] is None else row[c]) for c in COLUMNS})
    return path


def read_csv(path: str | Path | list | tuple) -> pd.DataFrame:
    """Read an ``effbench verify`` CSV (this version's or an older one with fewer columns), or several one after
    the other (a list: their rows concatenated, e.g. a Gaussian run and a MiniLM one); raise ResultsError when
    one is missing or not one."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise ResultsError("no verify file given")
        frames = [read_csv(p) for p in path]
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"verify file not found: {path}")
    try:
        # only an empty cell is missing: the outcome "n/a" (pandas' default NA strings include it) is a value
        df = pd.read_csv(path, dtype={"knob": str, "check": str, "mechanism": str}, keep_default_na=False,
                         na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} could not be parsed as an effbench verify CSV: {exc}") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ResultsError(f"{path} is not an effbench verify CSV (missing columns: {', '.join(missing)})")
    return df


COMPARISON_COLUMNS = ("mechanism", "mode", "knob", "knob_value", "default", "inputs", "gaussian", "real", "std",
                      "min", "max", "ratio", "samples")


def inputs_comparison(rows: pd.DataFrame) -> pd.DataFrame:
    """The real-input fidelity rows (``inputs`` not gaussian) with the Gaussian error of the same setting beside:
    one row per mechanism, mode and knob value, in run order. ``gaussian`` and ``real`` are ‖o − target‖/‖v‖
    (real: the mean over layers × heads; ``std``, ``min``, ``max`` across them), ``ratio`` = real / gaussian,
    ``default`` whether the knob value is the mechanism's default (the setting a sweep measures). Empty (with
    these columns) when there are no such rows, e.g. for a file from a Gaussian run or an older version."""
    if "inputs" not in rows or "gaussian_error_rel" not in rows:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    inputs = rows["inputs"].fillna("").astype(str)
    real = rows[rows["check"].eq("fidelity") & inputs.ne("") & inputs.ne("gaussian")]
    real = real[pd.to_numeric(real["error_rel"], errors="coerce").notna()]
    records = []
    for r in real.to_dict("records"):
        g = pd.to_numeric(r.get("gaussian_error_rel"), errors="coerce")
        e = float(r["error_rel"])
        knob = "" if pd.isna(r.get("knob")) else str(r.get("knob"))
        records.append({"mechanism": r["mechanism"], "mode": r.get("mode", ""), "knob": knob,
                        "knob_value": r.get("knob_value"), "default": _is_default(r["mechanism"], knob,
                                                                                  r.get("knob_value")),
                        "inputs": r["inputs"], "gaussian": float(g) if pd.notna(g) else None, "real": e,
                        "std": r.get("error_std"), "min": r.get("error_min"), "max": r.get("error_max"),
                        "ratio": e / float(g) if pd.notna(g) and g > 0 else None, "samples": r.get("samples")})
    out = pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS)
    if out.empty:
        return out
    # run order of mechanisms and modes; knob values ascending inside each (the default is run last)
    order = {m: i for i, m in enumerate(dict.fromkeys(out["mechanism"]))}
    value = pd.to_numeric(out["knob_value"], errors="coerce")
    out = out.assign(_m=out["mechanism"].map(order), _mode=out["mode"].ne("bidirectional"), _v=value)
    return out.sort_values(["_m", "_mode", "knob", "_v"], kind="stable").drop(columns=["_m", "_mode", "_v"]) \
        .reset_index(drop=True)


def _is_default(mechanism: str, knob: str, value: Any) -> bool:
    """Whether ``value`` is the registered default of ``mechanism``'s ``knob`` (False for an unknown one)."""
    import mechanisms

    spec = mechanisms.REGISTRY.get(str(mechanism))
    declared = next((k for k in spec.knobs if k.name == knob), None) if spec is not None and knob else None
    if declared is None or value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    try:
        return float(value) == float(declared.default)
    except (TypeError, ValueError):
        return str(value) == str(declared.default)
