"""The row schema and the results file: one CSV row per case, appended and flushed one by one.

A row is typed: :class:`CaseResult` holds exactly the result columns (what the runner measured) and
:class:`Row` the case columns, the mechanism's knob values and that result; neither takes an unknown field.

Bytes are stored raw (MiB/GiB only for display). A JSON sidecar beside the CSV
(``results.csv`` -> ``results.json``) records, for every sweep that wrote to it, the
environment and the command line; rows point to it through ``run_id``.

Crash safety: each row is one ``write`` of a whole line followed by flush + fsync;
a torn last line (the process was killed mid-write) is cut off before the next
append and ignored when reading, so a results file is never left broken.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from .status import Status

INT_COLUMNS = ["n", "batch", "heads", "head_dim", "seed", "decode_steps", "repeats", "state_bytes",
               "state_bytes_analytic", "predicted_state_bytes", "read_bytes", "peak_alloc_bytes", "peak_reserved_bytes",
               "nvml_peak_bytes", "nvml_process_peak_bytes", "peak_tensor_bytes", "rss_peak_bytes",
               "predicted_bytes", "param_bytes", "flops", "ops"]


class ResultsError(ValueError):
    """A results file that is missing, unreadable or not an effbench CSV."""


# ------------------------------------------------------------------------ records

@dataclass(slots=True)
class CaseResult:
    """What one case produced: exactly the result columns of a row. Setting an unknown attribute raises
    (slots) and so does ``update`` with an unknown name, so no reading silently disappears on its way to the file."""

    status: Status | None = None
    time_ms_median: float | None = None
    time_ms_iqr: float | None = None
    time_ms_per_token: float | None = None  # decode: median over the steps of one step's time (IQR in time_ms_iqr)
    repeats: int | None = None
    timer: str | None = None
    peak_alloc_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    nvml_peak_bytes: int | None = None
    nvml_process_peak_bytes: int | None = None
    peak_tensor_bytes: int | None = None
    rss_peak_bytes: int | None = None
    predicted_bytes: int | None = None
    state_bytes: int | None = None  # decode: the cache/state after the context, measured by the storage tracker
    state_bytes_analytic: int | None = None  # decode: the mechanism's declared state formula, beside the measurement
    predicted_state_bytes: int | None = None  # decode: the state measured on fake tensors (effbench estimate)
    read_bytes: int | None = None  # decode: bytes one step reads from its state (declared, else the whole state)
    read_gbps: float | None = None  # decode: read_bytes / time_ms_per_token, GB/s (10⁹ bytes per second)
    param_bytes: int | None = None
    flops: int | None = None
    ops: int | None = None  # aten ops one call (decode: one step) dispatches, a kernel launch each on a GPU (tracked pass)
    flops_source: str | None = None
    build_ms: float | None = None
    wall_s: float | None = None  # the case's wall time in its child, seconds (the fork server's start-up excluded)
    build_info: str | None = None
    readings: str | None = None
    host: str | None = None  # the machine that ran the case (socket.gethostname() there)
    device_name: str | None = None  # what ran it: the GPU's name, or the CPU model
    device_uuid: str | None = None  # the GPU's NVML UUID ("GPU-..."); empty on a CPU
    error: str | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None:
            self.status = Status.parse(self.status)

    def update(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        """Set result fields by name; an unknown name raises ResultsError and nothing is set."""
        given = {**(values or {}), **more}
        check_result_fields(given)
        for name, value in given.items():
            setattr(self, name, Status.parse(value) if name == "status" and value is not None else value)


RESULT_COLUMNS = [f.name for f in fields(CaseResult)]


def check_result_fields(names: Iterable[str]) -> None:
    """Raise ResultsError naming those of ``names`` that are not result columns."""
    unknown = sorted(set(names) - set(RESULT_COLUMNS))
    if unknown:
        raise ResultsError(f"not result columns: {', '.join(unknown)}")


@dataclass(frozen=True, slots=True)
class Row:
    """One row: the case columns (as attributes), the mechanism's knob values and its :class:`CaseResult`.

    ``get(column)`` reads any column (a knob this mechanism lacks is ``default``); ``row[column]`` the same but
    raises KeyError for a column the row lacks; ``as_csv()`` is what the writer appends. A knob named like a
    case or result column is refused.
    """

    case_key: str
    mechanism: str
    family: str
    n: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    device: str
    mode: str
    causal: bool
    seed: int
    knobs: Mapping[str, Any]
    result: CaseResult
    phase: str = "prefill"
    decode_steps: int | None = None  # decode rows only

    def __post_init__(self) -> None:
        clash = sorted(set(self.knobs) & (_CASE_SET | _RESULT_SET))
        if clash:
            raise ResultsError(f"knob names clash with row columns: {', '.join(clash)}")

    @property
    def status(self) -> Status | None:
        return self.result.status

    def get(self, column: str, default: Any = None) -> Any:
        if column in _CASE_SET:
            return getattr(self, column)
        if column in _RESULT_SET:
            return getattr(self.result, column)
        return self.knobs.get(column, default)

    def __getitem__(self, column: str) -> Any:
        if column in _CASE_SET or column in _RESULT_SET or column in self.knobs:
            return self.get(column)
        raise KeyError(column)

    def as_csv(self) -> dict[str, Any]:
        """Column -> value: the case columns, the knobs, the result columns."""
        return {**{c: getattr(self, c) for c in CASE_COLUMNS}, **self.knobs,
                **{c: getattr(self.result, c) for c in RESULT_COLUMNS}}


CASE_COLUMNS = [f.name for f in fields(Row) if f.name not in ("knobs", "result")]
CASE_DEFAULTS = {"phase": "prefill"}  # the value of a case column in rows written before it existed
_CASE_SET, _RESULT_SET = frozenset(CASE_COLUMNS), frozenset(RESULT_COLUMNS)


# ---------------------------------------------------------------------- the file


def knob_columns(extra: Iterable[str] = ()) -> list[str]:
    """One column per knob name in the registry (plus ``extra``), sorted."""
    import mechanisms  # lazily: reading results (effbench plot) must not pay for importing torch
    names = {k.name for spec in mechanisms.REGISTRY.values() for k in spec.knobs}
    return sorted(names | set(extra))


def columns(extra_knobs: Iterable[str] = ()) -> list[str]:
    return CASE_COLUMNS + knob_columns(extra_knobs) + RESULT_COLUMNS


def sidecar_path(csv_path: str | Path) -> Path:
    p = Path(csv_path)
    return p.with_suffix(".json") if p.suffix else p.with_name(p.name + ".json")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if value != value else repr(value)
    return str(value)


def _line(values: list[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_fmt(v) for v in values])
    return buf.getvalue()


def _read_header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, newline="") as fh:
        first = fh.readline()
    if not first.endswith("\n"):
        return None  # a torn header: nothing was ever written after it
    return next(csv.reader([first]))


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line that was cut off mid-write (no trailing newline)."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        keep = data.rfind(b"\n") + 1
        fh.truncate(keep)


class ResultsWriter:
    """Appends rows to a results CSV, one flushed and fsynced line per row.

    Opening an existing file keeps its rows untouched; if the new rows need a column
    the file lacks (a plugin's knob), the header is widened by an atomic rewrite that
    leaves every existing value as it was.
    """

    def __init__(self, path: str | Path, extra_knobs: Iterable[str] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        wanted = columns(extra_knobs)
        header = _read_header(self.path)
        if header is None:
            self.columns = wanted
            _atomic_write(self.path, _line(wanted))
        else:
            check_header(header, self.path)
            _cut_torn_tail(self.path)
            missing = [c for c in wanted if c not in header]
            self.columns = header + missing
            if missing:
                self._widen()

    def _widen(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(self.path, newline="") as src, open(tmp, "w", newline="") as dst:
            reader = csv.reader(src)
            next(reader)
            dst.write(_line(self.columns))
            for row in reader:
                dst.write(_line(row + [""] * (len(self.columns) - len(row))))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)

    def append(self, row: Row | Mapping[str, Any]) -> None:
        """Append one row (a :class:`Row`, or a mapping column -> value for rows made by hand)."""
        values = row.as_csv() if isinstance(row, Row) else dict(row)
        unknown = set(values) - set(self.columns)
        if unknown:
            raise ResultsError(f"row has columns the file lacks: {', '.join(sorted(unknown))}")
        line = _line([values.get(c) for c in self.columns])
        with open(self.path, "a", newline="") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def check_header(header: list[str], path: Path | str) -> None:
    needed = {"case_key", "mechanism", "n", "status"}
    if not needed <= set(header):
        raise ResultsError(f"{path} is not an effbench results CSV (missing columns: "
                           f"{', '.join(sorted(needed - set(header)))})")


def read_results(path: str | Path) -> pd.DataFrame:
    """Read a results CSV into a DataFrame (torn last line ignored; bool/int columns typed)."""
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"results file not found: {path}")
    if path.is_dir():
        raise ResultsError(f"{path} is a directory, not a results CSV")
    header = _read_header(path)
    if header is None:
        raise ResultsError(f"{path} is empty, not an effbench results CSV")
    check_header(header, path)
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    try:
        df = pd.read_csv(io.StringIO(text), dtype={"case_key": str, "error": str, "build_info": str, "host": str,
                                                     "device_name": str, "device_uuid": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} could not be parsed as CSV: {exc}") from None
    _check_statuses(df, path)
    for col, default in CASE_DEFAULTS.items():
        if col not in df or df[col].isna().all():  # absent, or all-empty (read as float) in a widened old file
            df[col] = default
        else:
            df[col] = df[col].fillna(default)
    if "causal" in df:
        df["causal"] = df["causal"].map(lambda v: str(v).lower() == "true")
    for col in INT_COLUMNS:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    _type_knob_columns(df)
    return df


def _check_statuses(df: pd.DataFrame, path: Path) -> None:
    """Every status is a :class:`Status` value (kept as its text, which compares equal to the member)."""
    try:
        for value in df["status"].dropna().unique():
            Status.parse(value)
    except ValueError as exc:
        raise ResultsError(f"{path}: {exc}") from None


def _type_knob_columns(df: pd.DataFrame) -> None:
    """Knob columns back with their knob's type: an int knob is Int64 (not float because other mechanisms
    leave it empty), a bool knob is pandas' nullable boolean, a float knob float; others stay text."""
    import mechanisms

    types: dict[str, type] = {}
    for spec in mechanisms.REGISTRY.values():
        for knob in spec.knobs:
            types.setdefault(knob.name, knob.type)
    for col, kind in types.items():
        if col not in df or col in INT_COLUMNS:
            continue
        if kind is bool:
            df[col] = df[col].map(lambda v: pd.NA if pd.isna(v) else str(v).strip().lower() in ("true", "1", "yes"))
            df[col] = df[col].astype("boolean")
        elif kind is int:
            num = pd.to_numeric(df[col], errors="coerce")
            if (num.dropna() % 1 == 0).all():
                df[col] = num.astype("Int64")
        elif kind is float:
            df[col] = pd.to_numeric(df[col], errors="coerce")
        else:  # text knobs: one dtype whether or not any row of the file has the knob (all-empty reads as float)
            df[col] = df[col].astype(object).where(df[col].notna(), None)


def done_keys(path: str | Path) -> set[str]:
    """Case keys already in a results file (for ``--resume``)."""
    return set(done_statuses(path))


def done_statuses(path: str | Path) -> dict[str, Status | None]:
    """Case key -> status of the rows already in a results file (``--resume`` skips them and rebuilds the
    OOM frontier from their ``oom``/``killed`` rows)."""
    path = Path(path)
    if not path.exists() or _read_header(path) is None:
        return {}
    df = read_results(path).dropna(subset=["case_key"])
    return {str(key): Status.parse(status) if pd.notna(status) else None
            for key, status in zip(df["case_key"], df["status"])}


def append_run(path: str | Path, run: Mapping[str, Any]) -> None:
    """Add one sweep's environment record to the JSON sidecar (atomic rewrite)."""
    side = sidecar_path(path)
    data = {"format": "effbench-results/1", "runs": []}
    if side.exists():
        try:
            data = json.loads(side.read_text())
        except json.JSONDecodeError:  # keep the damaged file for the user; start a new history beside it
            bad = side.with_name(side.name + ".bad")
            os.replace(side, bad)
            data = {"format": "effbench-results/1", "runs": [],
                    "note": f"the previous sidecar did not parse; it was moved to {bad.name}"}
    data.setdefault("runs", []).append(dict(run))
    _atomic_write(side, json.dumps(data, indent=2, default=str) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, fsync it, then rename it over ``path``: a crash leaves the old
    file or the new one, never an empty or half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
