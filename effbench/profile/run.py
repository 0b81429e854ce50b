"""Profile one case in the runner's isolated child process and write what it finds into a directory.

The child is started from the runner's fork server and talks to the parent over the same Pipe protocol as
a sweep's child (``started``, then ``part`` dicts, then ``done``); the parent reads it with the runner's own
collector and timeout, so a case that is unsupported, runs out of memory, times out or dies comes back as a
:class:`ProfileReport` with its :class:`Status` and error, never a traceback. Stages, each reported as it ends:

1. the mechanism's support check (``skipped``), the fake-tensor prediction against ``mem_budget`` if one is given;
2. build, ``warmup`` untimed calls;
3. the memory timeline of one call (the recording storage tracker, a ``TorchDispatchMode``, so its records are
   also the call's aten op count): ``memory_timeline.csv``, ``.png``, ``.svg``;
4. ``repeats`` calls under ``torch.profiler``: ``trace.json``, the op tables, ``ops.md``;
5. on CUDA, one call between ``_record_memory_history`` and ``_dump_snapshot``: ``memory_snapshot.pickle``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import plugins, runner, workload
from ..cases import Case
from ..devices import is_cuda
from ..errors import one_line
from ..figure_base import save_figure
from ..status import Status
from ..units import fmt_bytes
from . import opstats, timeline
from .report import OPS_MD, SNAPSHOT, TIMELINE_CSV, TRACE, ProfileOptions, ProfileReport, check_fields, fmt_shapes

Report = Callable[[dict[str, Any]], None]
SNAPSHOT_MAX_ENTRIES = 100_000


def memory_snapshot(call: Callable[[], Any], path: Path, cuda: Any = None) -> Path:
    """One call with the CUDA caching allocator's history recorded, dumped to ``path`` as PyTorch's
    "Understanding CUDA Memory Usage" notes say (load it at pytorch.org/memory_viz): enable history, run,
    ``_dump_snapshot``, then stop recording (``enabled=None``; also when the call fails).
    ``cuda`` defaults to ``torch.cuda``; tests pass a fake."""
    cuda = torch.cuda if cuda is None else cuda
    cuda.memory._record_memory_history(max_entries=SNAPSHOT_MAX_ENTRIES)
    try:
        call()
        cuda.memory._dump_snapshot(str(path))
    finally:
        cuda.memory._record_memory_history(enabled=None)
    return path


# ------------------------------------------------------------------------ child side

class _Files:
    """The files written so far, reported again (as a whole list) each time one is added."""

    def __init__(self, report: Report):
        self.report = report
        self.paths: list[Path] = []

    def wrote(self, *paths: Path) -> None:
        self.paths.extend(Path(p) for p in paths)
        self.report({"files": list(self.paths)})


def _profile(case: Case, out_dir: Path, opts: ProfileOptions, report: Report) -> None:
    """The child's stages, in order (see the module docstring); each reports its fields as it finishes."""
    plugins.load_plugins(opts.plugins)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    spec = case.spec()
    if not runner._supported(spec, case, report):
        return
    cuda = is_cuda(case.device)
    if cuda and torch.device(case.device).index is not None:
        torch.cuda.set_device(torch.device(case.device))
    if opts.mem_budget is not None:
        over = runner._over_budget(runner.predict(case), opts.mem_budget)
        if over:
            report({"status": Status.PREDICTED_OOM, "error": over})
            return
    files = _Files(report)
    nn = timeline.nn_bytes(case)
    report({"nn_bytes": nn, "warmup": opts.warmup, "repeats": opts.repeats})
    w = workload.prepare(case)
    report({"build_info": "; ".join(f"{k}={v}" for k, v in w.info.items()) or None})
    for _ in range(opts.warmup):
        w.call()
    tl = _timeline_stage(case, w, nn, out_dir, files, report)
    _profiler_stage(case, w, opts, tl, nn, out_dir, files, report)
    if cuda:
        files.wrote(memory_snapshot(w.call, out_dir / SNAPSHOT))
    report({"status": Status.OK})


def _timeline_stage(case: Case, w: workload.Workload, nn: int, out_dir: Path, files: _Files,
                    report: Report) -> timeline.Timeline:
    tl = timeline.record_timeline(w.call)
    files.wrote(timeline.write_csv(tl.ops, out_dir / TIMELINE_CSV))
    # the recording tracker is a TorchDispatchMode that sees every aten op of the call: its records are the op
    # count (what opstats.count_ops counts, without running the call once more)
    report({"peak": tl.peak, "nn_alive_at_peak": tl.alive_at_peak(nn), "ops_count": len(tl.ops)})
    fig = timeline.draw(case, tl, nn)
    files.wrote(*save_figure(fig, out_dir, ["png", "svg"]))
    return tl


def _timeline_lines(tl: timeline.Timeline, nn: int) -> list[str]:
    ops_count = len(tl.ops)
    if tl.peak is None:
        return [f"Memory timeline: no tracked allocation in {ops_count} ops (`memory_timeline.csv`)."]
    p = tl.peak
    alive = tl.alive_at_peak(nn)
    return [(f"Memory timeline (`memory_timeline.csv`, one call, {ops_count:,} aten ops, exact storage tracker): "
             f"peak **{fmt_bytes(p.bytes)}** ({p.bytes:,} bytes) after op {p.index} `{p.op}` → "
             f"{fmt_shapes(p.output_shapes) or 'no tensor'}; one N×N score tensor is {fmt_bytes(nn)} "
             f"({nn:,} bytes), {alive} of them alive at the peak ({p.bytes / nn:.2f}× one).")]


def _profiler_stage(case: Case, w: workload.Workload, opts: ProfileOptions, tl: timeline.Timeline, nn: int,
                    out_dir: Path, files: _Files, report: Report) -> None:
    cuda = is_cuda(case.device)
    sync = (lambda: torch.cuda.synchronize()) if cuda else None
    prof = opstats.profile_calls(w.call, opts.repeats, cuda, sync)
    prof.export_chrome_trace(str(out_dir / TRACE))
    files.wrote(out_dir / TRACE)
    rows = opstats.op_rows(prof.key_averages(), opts.repeats, cuda)
    by_time, by_mem = opstats.top_tables(rows, cuda, opts.top)
    time_key, memory_key = opstats.sort_keys(cuda)
    report({"ops_by_time": by_time, "ops_by_memory": by_mem, "time_key": time_key, "memory_key": memory_key})
    text = opstats.markdown(timeline.case_title(case), by_time, by_mem, cuda, warmup=opts.warmup,
                            repeats=opts.repeats, summary_lines=_timeline_lines(tl, nn))
    (out_dir / OPS_MD).write_text(text)
    files.wrote(out_dir / OPS_MD)


def _run_stages(case: Case, out_dir: Path, opts: ProfileOptions, report: Report) -> None:
    """:func:`_profile`, with any exception classified as the runner classifies a sweep case's."""
    try:
        _profile(case, out_dir, opts, report)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        report({"status": Status.OOM, "error": one_line(exc)})
    except Exception as exc:
        report({"status": Status.OOM if runner.is_cpu_alloc_failure(exc) else Status.ERROR, "error": one_line(exc)})


def _child(conn, case: Case, out_dir: Path, opts: ProfileOptions) -> None:
    def report(fields: dict[str, Any]) -> None:
        check_fields(fields)
        conn.send(("part", fields))

    conn.send(("started", None))
    try:
        _run_stages(case, out_dir, opts, report)
    finally:
        conn.send(("done", None))
        conn.close()


def profile_in_process(case: Case, out_dir: str | Path, opts: ProfileOptions | None = None) -> ProfileReport:
    """The child's stages in this process (no isolation, no timeout): for tests and debugging."""
    opts = ProfileOptions() if opts is None else opts
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = ProfileReport(case=case, out_dir=out_dir)
    started = time.monotonic()
    _run_stages(case, out_dir, opts, rep.update)
    rep.wall_s = round(time.monotonic() - started, 3)
    return rep


# ----------------------------------------------------------------------- parent side

def run_profile(case: Case, out_dir: str | Path, *, warmup: int = 1, repeats: int = 3, plugins: tuple[str, ...] = (),
                threads: int | None = None, timeout: float = 300.0, mem_budget: int | None = None,
                top: int = 20) -> ProfileReport:
    """Profile ``case`` in a child process from the runner's fork server; write its files into ``out_dir``
    (created if needed) and return the report, which always has a ``status``."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    out_dir = Path(out_dir).absolute()  # the child writes there whatever its working directory
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = ProfileOptions(warmup=warmup, repeats=repeats, plugins=tuple(plugins), threads=threads, timeout=timeout,
                          mem_budget=mem_budget, top=top)
    return runner.run_in_child(_child, (case, out_dir, opts), timeout, ProfileReport(case=case, out_dir=out_dir))
