"""The doctor's report on the terminal: environment and readings, the self-test, and a one-line verdict."""

from __future__ import annotations

from typing import Any

from ..units import fmt_bytes
from .checks import SELF_TEST_SIZES, Verdict
from .run import DoctorReport

VERDICT_STYLES = {Verdict.PASS: "green", Verdict.FAIL: "bold red", Verdict.MISSING: "yellow"}


def _value(value: Any, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "bytes" and isinstance(value, int):
        return f"{value:,} B ({fmt_bytes(value)})"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _env_rows(report: DoctorReport) -> list[tuple[str, str, str]]:
    e = report.environment
    cudnn = f", cuDNN {e['cudnn']}" if e.get("cudnn") else ""
    rows = [("effbench", e["effbench"], f"Python {e['python']}, {e['platform']}"),
            ("torch", e["torch"], f"{e['torch_build']}{cudnn}"),
            ("CUDA", f"{e['cuda_devices']} device(s)" if e["cuda_available"] else "not available",
             f"torch.version.cuda = {e['cuda_version']}"),
            ("driver", e["driver"] or "—", "via NVML" if e["nvml"] else f"NVML: {e['nvml_error']}")]
    for g in report.gpus:
        rows.append((f"GPU {g.index} (NVML)", g.name, f"{g.uuid}, {fmt_bytes(g.memory_total)}"
                     + ("  ← the sweep's device" if g.sweep_device else "")))
    cpus = f"{e['cpu_count']} logical CPUs, {e['cpu_usable']} usable, torch threads {e['torch_threads']}"
    rows.append(("CPU", e["cpu"], cpus))
    rows.append(("RAM", fmt_bytes(e["memory_total_bytes"]), f"{fmt_bytes(e['memory_available_bytes'])} available"))
    have = {k: v for k, v in report.extras.items() if v}
    rows.append(("extras (peers)", f"{len(have)} of {len(report.extras)} installed",
                 ", ".join(f"{k} {v}" if v else f"{k} not installed" for k, v in report.extras.items())))
    return rows


def verdict_line(report: DoctorReport) -> str:
    """The last line: every check passes (and what is missing), or which checks fail."""
    missing = sorted({c.name for c in report.checks if c.verdict is Verdict.MISSING})
    if report.ok:
        passed = sum(c.verdict is Verdict.PASS for c in report.checks)
        tail = f"; missing on {report.device}: {', '.join(missing)}" if missing else ""
        return f"[green]doctor: all {passed} checks pass on {report.device}{tail}[/]"
    failed = ", ".join(f"{c.name}" + (f" (N={c.n})" if c.n else "") for c in report.failures)
    return f"[bold red]doctor: {len(report.failures)} check(s) fail on {report.device}: {failed} — see 'what to do'[/]"


def render_doctor(report: DoctorReport, console: Any) -> None:
    """Two tables (environment and readings; self-test) and the one-line verdict, on a rich ``console``."""
    from rich.table import Table

    env = Table(title=f"effbench doctor: environment and readings on {report.device}")
    for name in ("item", "value", "detail"):
        env.add_column(name, overflow="fold")
    for row in _env_rows(report):
        env.add_row(*map(str, row))
    env.add_section()
    for r in report.readings:
        value = "[green]yes[/]" if r.available else "[yellow]missing[/]"
        env.add_row(f"reading: {r.name}", value, r.source + (f" ({r.reason})" if r.available and r.reason else "")
                    if r.available else (r.reason or ""))
    console.print(env)

    s = SELF_TEST_SIZES
    test = Table(title=f"self-test: dense attention, B={s['batch']}, H={s['heads']}, D={s['head_dim']}, "
                       f"{s['dtype']}, {s['mode']}, N = {', '.join(f'{n:,}' for n in report.rows) or '—'}")
    for name, just in (("check", "left"), ("N", "right"), ("expected", "right"), ("measured", "right"),
                       ("tolerance", "left"), ("verdict", "left"), ("reason / what to do", "left")):
        test.add_column(name, justify=just, overflow="fold")
    for c in report.checks:
        test.add_row(c.name, f"{c.n:,}" if c.n else "—", _value(c.expected, c.unit), _value(c.measured, c.unit),
                     c.tolerance, f"[{VERDICT_STYLES[c.verdict]}]{c.verdict}[/]", c.fix or c.reason or "")
    console.print(test)
    console.print(verdict_line(report))
