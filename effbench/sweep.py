"""Run a list of cases, one child process each, appending one row per case as it finishes.

The sweep never stops on a failing case: every outcome is a row. After an ``oom`` (or
a ``killed`` child) at some N, larger N of the same configuration are recorded as
``predicted_oom`` without being run (the OOM frontier). With ``resume`` the cases
whose key is already in the file are not run again, and no finished row is rewritten.

Where the cases run is an executor's business (:mod:`effbench.executors`: this machine, or a Ray cluster); the
bookkeeping here is the same for every executor, and this process is the only writer of the file. The sweep hands the
executor one lane per configuration, its cases in order of N; pulling a lane skips resumed cases and writes the
frontier's ``predicted_oom`` rows, so an executor that runs one case per lane at a time keeps the frontier exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import results
from .cases import Case
from .executors import Executor, LocalExecutor
from .results import CaseResult, Row
from .runner import RunOptions, run_case
from .status import OUT_OF_MEMORY, Status


def make_row(case: Case, result: CaseResult) -> Row:
    """The row of ``case``: its case columns, the mechanism's own knob values (defaults filled in), ``result``."""
    spec = case.spec()
    return Row(case_key=case.key, mechanism=case.mechanism, family=spec.family, n=case.n, batch=case.batch,
               heads=case.heads, head_dim=case.head_dim, dtype=case.dtype, device=case.device, mode=case.mode,
               causal=case.causal, seed=case.seed, knobs=spec.effective_knobs(case.knob_dict, {"heads": case.heads}),
               result=result, phase=case.phase, decode_steps=case.decode_steps if case.phase == "decode" else None)


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


class _Books:
    """What every executor shares: resume, the OOM frontier and the rows (written here only, one fsynced line each)."""

    def __init__(self, out: str | Path, cases: list[Case], report: SweepReport, resume: bool,
                 on_start: Callable[[Case], None] | None, on_row: Callable[[Case, Row], None] | None):
        self.writer = results.ResultsWriter(out, extra_knobs={k for c in cases for k, _ in c.knobs})  # cuts a torn line
        self.done = results.done_statuses(out) if resume else {}
        self.report, self.on_start, self.on_row = report, on_start, on_row
        self.frontier: dict[tuple, tuple[int, Status]] = {}

    def lanes(self, cases: list[Case]) -> list[Iterator[Case]]:
        """One lane per configuration, in the order of ``cases`` (sorted by configuration, then N)."""
        return [self._lane(list(group)) for _, group in itertools.groupby(cases, key=lambda c: c.config)]

    def _lane(self, cases: list[Case]) -> Iterator[Case]:
        """The cases of one configuration that are to run; resumed ones are skipped and those past the frontier
        get their ``predicted_oom`` row here. Pulled one case at a time, after the previous case's row is written."""
        for case in cases:
            if case.key in self.done:
                self.report.resumed += 1
                _extend_frontier(self.frontier, case, self.done[case.key])  # the frontier survives resume
                continue
            if self.on_start:
                self.on_start(case)
            blocked = self.frontier.get(case.config)
            if blocked is not None and case.n > blocked[0]:
                self.record(case, CaseResult(status=Status.PREDICTED_OOM,
                                             error=f"not run: {blocked[1]} at n={blocked[0]} (OOM frontier)"))
                continue
            yield case

    def record(self, case: Case, result: CaseResult) -> None:
        _extend_frontier(self.frontier, case, result.status)
        row = make_row(case, dataclasses.replace(result, run_id=self.report.run_id))
        self.writer.append(row)
        self.report.rows.append(row)
        if self.on_row:
            self.on_row(case, row)


def run_sweep(cases: Iterable[Case], opts: RunOptions, out: str | Path, *, resume: bool = False,
              run_info: dict[str, Any] | None = None,
              on_start: Callable[[Case], None] | None = None,
              on_row: Callable[[Case, Row], None] | None = None,
              runner: Callable[[Case, RunOptions], CaseResult] = run_case,
              executor: Executor | None = None) -> SweepReport:
    """Run ``cases`` (sorted by configuration, then N) with ``executor`` (default: this machine, one case after
    another with ``runner``) and append a row per case to ``out`` as each finishes."""
    executor = executor if executor is not None else LocalExecutor(runner)
    cases = sorted(dict.fromkeys(cases), key=lambda c: (repr(c.config), c.n))
    report = SweepReport(run_id=uuid.uuid4().hex[:12])
    books = _Books(out, cases, report, resume, on_start, on_row)
    results.append_run(out, {"run_id": report.run_id, **(run_info or {}), "options": dict(opts.__dict__),
                             "executor": executor.describe()})
    with contextlib.closing(executor.run(books.lanes(cases), opts)) as finished:
        for case, result in finished:
            books.record(case, result)
    return report
