"""Run a list of cases, one child process each, appending one row per case as it finishes.

The sweep never stops on a failing case: every outcome is a row. After an ``oom`` (or
a ``killed`` child) at some N, larger N of the same configuration are recorded as
``predicted_oom`` without being run (the OOM frontier). With ``resume`` the cases
whose key is already in the file are not run again, and no finished row is rewritten.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import results
from .cases import Case
from .results import CaseResult, Row
from .runner import RunOptions, run_case
from .status import OUT_OF_MEMORY, Status


def make_row(case: Case, result: CaseResult) -> Row:
    """The row of ``case``: its case columns, the mechanism's own knob values (defaults filled in), ``result``."""
    spec = case.spec()
    return Row(case_key=case.key, mechanism=case.mechanism, family=spec.family, n=case.n, batch=case.batch,
               heads=case.heads, head_dim=case.head_dim, dtype=case.dtype, device=case.device, mode=case.mode,
               causal=case.causal, seed=case.seed, knobs=spec.resolve_knobs(case.knob_dict), result=result)


def case_row(case: Case) -> dict[str, Any]:
    """The case and knob columns of ``case``'s row as a plain mapping, for rows written by hand (synthetic data)."""
    row = make_row(case, CaseResult())
    return {**{c: row.get(c) for c in results.CASE_COLUMNS}, **row.knobs}


@dataclass
class SweepReport:
    rows: list[Row] = field(default_factory=list)
    resumed: int = 0
    run_id: str = ""


def _extend_frontier(frontier: dict[tuple, tuple[int, Status]], case: Case, status: Status | None) -> None:
    """Remember the first (smallest) N of a configuration that ran out of memory; larger N are not run."""
    if status in OUT_OF_MEMORY:
        frontier.setdefault(case.config, (case.n, status))


def run_sweep(cases: Iterable[Case], opts: RunOptions, out: str | Path, *, resume: bool = False,
              run_info: dict[str, Any] | None = None,
              on_start: Callable[[Case], None] | None = None,
              on_row: Callable[[Case, Row], None] | None = None,
              runner: Callable[[Case, RunOptions], CaseResult] = run_case) -> SweepReport:
    """Run ``cases`` (sorted by configuration, then N) and append a row per case to ``out``."""
    cases = sorted(dict.fromkeys(cases), key=lambda c: (repr(c.config), c.n))
    writer = results.ResultsWriter(out, extra_knobs={k for c in cases for k, _ in c.knobs})
    report = SweepReport(run_id=uuid.uuid4().hex[:12])
    done = results.done_statuses(out) if resume else {}
    results.append_run(out, {"run_id": report.run_id, **(run_info or {}), "options": dict(opts.__dict__)})
    frontier: dict[tuple, tuple[int, Status]] = {}
    for case in cases:
        if case.key in done:
            report.resumed += 1
            _extend_frontier(frontier, case, done[case.key])  # the frontier survives resume
            continue
        if on_start:
            on_start(case)
        blocked = frontier.get(case.config)
        if blocked is not None and case.n > blocked[0]:
            result = CaseResult(status=Status.PREDICTED_OOM,
                                error=f"not run: {blocked[1]} at n={blocked[0]} (OOM frontier)")
        else:
            result = runner(case, opts)
        _extend_frontier(frontier, case, result.status)
        row = make_row(case, dataclasses.replace(result, run_id=report.run_id))
        writer.append(row)
        report.rows.append(row)
        if on_row:
            on_row(case, row)
    return report
