"""The verify report: one typed record per check, the report, and the CSV writer and reader side by side.

Every fact a reader needs is a field of :class:`CheckResult` (mode, result, reason, trend, ...);
``detail`` is prose for people and is never parsed back.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields
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


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read an ``effbench verify`` CSV (this version's or an older one with fewer columns); raise
    ResultsError when it is missing or not one."""
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
