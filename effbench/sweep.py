"""Run a list of cases, one child process each, appending one row per case as it finishes.

The sweep never stops on a failing case: every outcome is a row. After an ``oom`` (or
a ``killed`` child) at some N, larger N of the same configuration are recorded as
``predicted_oom`` without being run (the OOM frontier). With ``resume`` the cases
whose key is already in the file are not run again, and no finished row is rewritten.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import results
from .cases import Case
from .runner import RunOptions, run_case



def case_row(case: Case) -> dict[str, Any]:
    """The case columns of a row (knob columns filled only for the mechanism's own knobs)."""
    spec = case.spec()
    row: dict[str, Any] = {
        "case_key": case.key, "mechanism": case.mechanism, "family": spec.family, "n": case.n,
        "batch": case.batch, "heads": case.heads, "head_dim": case.head_dim, "dtype": case.dtype,
        "device": case.device, "mode": case.mode, "causal": case.causal, "seed": case.seed,
    }
    row.update(spec.resolve_knobs(case.knob_dict))
    return row


@dataclass
class SweepReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0
    run_id: str = ""


def _extend_frontier(frontier: dict[tuple, tuple[int, str]], case: Case, status: str | None) -> None:
    """Remember the first (smallest) N of a configuration that ran out of memory; larger N are not run."""
    if status in ("oom", "killed"):
        frontier.setdefault(case.config, (case.n, status))


def run_sweep(cases: Iterable[Case], opts: RunOptions, out: str | Path, *, resume: bool = False,
              run_info: dict[str, Any] | None = None,
              on_start: Callable[[Case], None] | None = None,
              on_row: Callable[[Case, dict[str, Any]], None] | None = None,
              runner: Callable[[Case, RunOptions], dict[str, Any]] = run_case) -> SweepReport:
    """Run ``cases`` (sorted by configuration, then N) and append a row per case to ``out``."""
    cases = sorted(dict.fromkeys(cases), key=lambda c: (repr(c.config), c.n))
    extra_knobs = {k for c in cases for k, _ in c.knobs}
    writer = results.ResultsWriter(out, extra_knobs=extra_knobs)
    report = SweepReport(run_id=uuid.uuid4().hex[:12])
    done = results.done_statuses(out) if resume else {}
    results.append_run(out, {"run_id": report.run_id, **(run_info or {}),
                             "options": {k: v for k, v in opts.__dict__.items()}})
    frontier: dict[tuple, tuple[int, str]] = {}
    for case in cases:
        if case.key in done:
            report.resumed += 1
            _extend_frontier(frontier, case, done[case.key])  # the frontier survives resume
            continue
        if on_start:
            on_start(case)
        blocked = frontier.get(case.config)
        if blocked is not None and case.n > blocked[0]:
            result = {"status": "predicted_oom",
                      "error": f"not run: {blocked[1]} at n={blocked[0]} (OOM frontier)"}
        else:
            result = runner(case, opts)
        _extend_frontier(frontier, case, result.get("status"))
        row = case_row(case)
        row.update({k: v for k, v in result.items() if k in writer.columns})
        row["run_id"] = report.run_id
        writer.append(row)
        report.rows.append(row)
        if on_row:
            on_row(case, row)
    return report
