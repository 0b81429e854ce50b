"""Everything drawn on the terminal: one status-to-style map, the consoles, and the rich tables.

The commands in ``cli.py`` compute and delegate; this module only shows. A table printed to a log
file (not a terminal) is laid out at ``LOG_WIDTH`` columns instead of rich's default of 80, so
that it stays one row per line when the output is redirected.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table

import mechanisms

from .status import Status
from .verify.report import Outcome
from .units import fmt_bytes, fmt_flops, fmt_ms

LOG_WIDTH = 240

# One map from a row status (sweep rows) or a check result (verify rows) to its style.
STYLES: dict[str, str] = {
    Status.OK: "green", Status.SKIPPED: "dim", Status.PREDICTED_OOM: "yellow", Status.OOM: "red",
    Status.TIMEOUT: "red", Status.KILLED: "red", Status.ERROR: "red",
    Outcome.PASS: "green", Outcome.FAIL: "bold red", Outcome.SKIP: "dim", Outcome.NA: "dim",
}


def console(stderr: bool = False) -> Console:
    """A console that keeps tables one row per line when it writes to a file or pipe."""
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, width=None if tty else LOG_WIDTH)


def styled(text: Any, key: str | None = None) -> str:
    """``text`` in the style of ``key`` (a Status or Outcome; default: ``text`` itself)."""
    key = str(text) if key is None else key
    return f"[{STYLES.get(key, 'red')}]{text}[/]"


def _knobs_of(row) -> str:
    spec = mechanisms.REGISTRY.get(row.get("mechanism"))
    return ", ".join(f"{k.name}={row.get(k.name)}" for k in spec.knobs) if spec else ""


SWEEP_COLUMNS = [("mechanism", "left", None), ("knobs", "left", None), ("N", "right", None),
                 ("phase", "left", "decode_steps"), ("status", "left", None),
                 ("ms (median ± IQR)", "right", "time_ms_median"),
                 ("ms/token (median ± IQR)", "right", "time_ms_per_token"),
                 ("state", "right", "state_bytes"), ("state declared", "right", "state_bytes_analytic"),
                 ("read GB/s", "right", "read_gbps"),
                 ("peak tensors", "right", "peak_tensor_bytes"), ("peak RSS", "right", "rss_peak_bytes"),
                 ("CUDA alloc", "right", "peak_alloc_bytes"), ("NVML", "right", "nvml_peak_bytes"),
                 ("FLOPs", "right", "flops"), ("ops", "right", "ops")]


def sweep_table(rows: Iterable, title: str) -> Table:
    """Summary of sweep rows: times in ms (median ± IQR), memory in binary units; empty reading columns left out.
    ``rows`` are records with ``.get(column)`` (sweep Rows or dicts). Decode rows: ms per token, the state (measured
    and declared) and the bytes a step reads per second; "peak tensors" is then one step's peak above the state."""
    rows = list(rows)
    columns = [c for c in SWEEP_COLUMNS if c[2] is None or any(r.get(c[2]) is not None for r in rows)]
    table = Table(title=title)
    for name, just, _ in columns:
        table.add_column(name, justify=just, no_wrap=name in ("mechanism", "N"),
                         overflow="fold" if name in ("knobs", "status") else "ellipsis")
    for r in rows:
        status = str(r.get("status") or "")
        error = r.get("error")
        cells = {
            "mechanism": r.get("mechanism"), "knobs": _knobs_of(r), "N": f"{r.get('n'):,}",
            "status": styled(status) + (f" [dim]{error[:48]}…[/]" if status != Status.OK and error else ""),
            "phase": r.get("phase") if r.get("phase") != "decode" else f"decode ×{r.get('decode_steps')}",
            "ms (median ± IQR)": fmt_ms(r.get("time_ms_median"), r.get("time_ms_iqr")),
            "ms/token (median ± IQR)": fmt_ms(r.get("time_ms_per_token"), r.get("time_ms_iqr")),
            "state": fmt_bytes(r.get("state_bytes")), "state declared": fmt_bytes(r.get("state_bytes_analytic")),
            "read GB/s": "—" if r.get("read_gbps") is None else f"{r.get('read_gbps'):.2f}",
            "peak tensors": fmt_bytes(r.get("peak_tensor_bytes")), "peak RSS": fmt_bytes(r.get("rss_peak_bytes")),
            "CUDA alloc": fmt_bytes(r.get("peak_alloc_bytes")), "NVML": fmt_bytes(r.get("nvml_peak_bytes")),
            "FLOPs": fmt_flops(r.get("flops")), "ops": "—" if r.get("ops") is None else f"{r.get('ops'):,}",
        }
        table.add_row(*[cells[name] for name, _, _ in columns])
    return table


def estimate_table(rows: Iterable) -> Table:
    """Predicted peaks; for decode rows the state after the context (fake tensors, and the declared formula) and
    the peak of one step above it."""
    rows = list(rows)
    decode = any(r.get("phase") == "decode" for r in rows)
    title = ("decode: predicted state after the context and peak of one step (fake tensors; inputs not included)"
             if decode else "predicted peak memory of one call (fake tensors; inputs not included)")
    table = Table(title=title)
    cols = [("mechanism", "left"), ("knobs", "left"), ("N", "right")]
    cols += [("state", "right"), ("state declared", "right"), ("step peak", "right")] if decode else [("predicted peak", "right")]
    cols += [("params", "right"), ("FLOPs", "right"), ("ops", "right"), ("status", "left")]
    for col, just in cols:
        table.add_column(col, justify=just)
    for r in rows:
        status = str(r.get("status") or "")
        memory = ([fmt_bytes(r.get("predicted_state_bytes")), fmt_bytes(r.get("state_bytes_analytic"))] if decode else [])
        table.add_row(r.get("mechanism"), _knobs_of(r), f"{r.get('n'):,}", *memory, fmt_bytes(r.get("predicted_bytes")),
                      fmt_bytes(r.get("param_bytes")), fmt_flops(r.get("flops")),
                      "—" if r.get("ops") is None else f"{r.get('ops'):,}", styled(status) + (f" {r.get('error')[:60]}" if r.get("error") else ""))
    return table


def registry_table() -> Table:
    table = Table(title="effbench mechanisms")
    for col in ("name", "family", "complexity", "memory", "knobs (default, sweep axis)", "causal", "bidir",
                "decode state"):
        table.add_column(col, overflow="fold")
    for spec in mechanisms.REGISTRY.values():
        table.add_row(spec.name, spec.family, spec.complexity, spec.memory_complexity or "—",
                      ", ".join(k.describe() for k in spec.knobs) or "—",
                      "yes" if spec.supports_causal else "no", "yes" if spec.supports_bidirectional else "no",
                      spec.decode_form if spec.decodes else "[dim]none[/]")
    return table


# ------------------------------------------------------------------------------ verify

def _e(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or x != x else f"{x:.{digits}e}"


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def summary_line(report) -> str:
    """One line naming each failing mechanism with its worst error and tolerance."""
    failing = report.failing()
    if not failing:
        return (f"all {len(report.mechanisms)} mechanism(s) pass (n={report.n}, {report.dtype}, "
                f"{report.device}, seed {report.seed})")
    parts = []
    for name, bad in failing.items():
        r = next((b for b in bad if b.check.startswith("impl")), bad[0])
        what = r.check + (f" {r.mode}" if r.mode else "")
        if r.check == "trend":
            parts.append(f"{name} ({what}: {r.trend} in {r.knob}, got {_g(r.error_rel)}, expected {r.expected})")
        elif r.max_abs_err is not None and r.tolerance is not None:
            parts.append(f"{name} ({what}: max abs error {r.max_abs_err:.2e} > tolerance {r.tolerance:.1e})")
        else:
            parts.append(f"{name} ({what}: {r.reason}" + (f"; tolerance {r.tolerance:.1e})" if r.tolerance else ")"))
    return f"verify failed for {len(failing)} of {len(report.mechanisms)} mechanism(s): " + "; ".join(parts)


def _sweep_cells(group) -> tuple[str, str, str]:
    """(detail, error, result) of one fidelity sweep folded into one table line."""
    r = group[0]
    ran = [g for g in group if g.error_rel is not None]
    skipped = [g for g in group if g.passed is None]
    failed = [g for g in group if g.passed is False]
    real = r.inputs not in ("", "gaussian")
    what = (f"on {r.inputs}: mean ± std of ‖o−dense‖/‖v‖ over {ran[0].samples} heads (reported)" if real and ran
            else "rel err ‖o−dense‖/‖v‖ (cos)")
    detail = f"{r.mode}; {r.knob} = {', '.join(str(g.knob_value) for g in ran) or '—'}; {what}"
    if skipped:
        detail += f"; {len(skipped)} skipped: {skipped[0].reason[:80]}"
    if failed:
        detail += f"; {failed[0].reason}"
    if real:
        err = " → ".join(f"{g.error_rel:.3g}±{g.error_std:.2g}" for g in ran) or "—"
    else:
        err = " → ".join(f"{g.error_rel:.3g} ({g.cosine:.3f})" for g in ran) or "—"
    result = Outcome.FAIL if failed else (Outcome.PASS if ran else Outcome.SKIP)
    return detail, err, result


def _check_error(r) -> str:
    if r.check == "fidelity":
        err = f"{r.error_rel:.3g} (cos {r.cosine:.3f})" if r.error_rel is not None else "—"
        return err + (f"; max abs {_e(r.max_abs_err)}" if r.max_abs_err is not None and r.tolerance is not None else "")
    if r.check == "trend":
        if r.trend == "equals_dense_at" and r.max_abs_err is not None:
            return f"max abs {_e(r.max_abs_err)}"
        if r.trend == "ratio_per_4x" and r.error_rel is not None:
            return f"×{r.error_rel:.2f}"
        return f"last/first {_g(r.error_rel)}" if r.error_rel is not None else "—"
    return f"{_e(r.max_abs_err)} (rel {_e(r.error_rel)})" if r.max_abs_err is not None else "—"


def _outcome(result: Outcome) -> str:
    return styled(result.value.upper() if result is Outcome.FAIL else result.value, result)


def verify_table(report) -> Table:
    """A rich table, fidelity sweeps folded into one line each."""
    inputs = "" if report.inputs == "gaussian" else f", fidelity on {report.inputs} inputs"
    table = Table(title=f"effbench verify: n={report.n}, {report.dtype}, {report.device}, seed {report.seed}{inputs}")
    for col, just in (("mechanism", "left"), ("check", "left"), ("detail (causal / knobs)", "left"),
                      ("error", "right"), ("tolerance", "right"), ("result", "left")):
        table.add_column(col, justify=just, overflow="fold")
    rows, i, last = report.rows, 0, None
    while i < len(rows):
        r = rows[i]
        if last is not None and r.mechanism != last:
            table.add_section()
        mech = r.mechanism if r.mechanism != last else ""
        last = r.mechanism
        if r.check == "fidelity" and r.knob:
            j = i
            while j < len(rows) and rows[j].check == "fidelity" and rows[j].mechanism == r.mechanism \
                    and rows[j].causal == r.causal and rows[j].knob == r.knob and rows[j].inputs == r.inputs:
                j += 1
            detail, err, result = _sweep_cells(rows[i:j])
            table.add_row(mech, "fidelity", detail, err, _e(r.tolerance), _outcome(result))
            i = j
            continue
        table.add_row(mech, r.check, r.detail, _check_error(r), _e(r.tolerance), _outcome(r.result))
        i += 1
    return table


def _times(ratio: float) -> str:
    return f"×{ratio:,.0f}" if ratio >= 10 else f"×{ratio:.2g}"


def inputs_table(comparison) -> Table:
    """Real-input errors beside the Gaussian ones of the same setting (``verify.report.inputs_comparison``)."""
    inputs = str(comparison["inputs"].iloc[0])
    table = Table(title=f"Fidelity ‖o−dense‖/‖v‖ on Gaussian and on {inputs} inputs, same N and knobs "
                        "(* = the default, the setting a sweep measures)",
                  caption="real: mean over layers × heads, ± std, min–max across them; ratio = real / Gaussian. "
                          "Trends are checked on Gaussian inputs only; on real inputs the errors are reported, "
                          "not checked.", title_justify="left")
    for col, just in (("mechanism", "left"), ("mode", "left"), ("setting", "left"), ("Gaussian", "right"),
                      (inputs, "right"), ("min–max across heads", "right"), ("ratio", "right")):
        table.add_column(col, justify=just)
    last = None
    for r in comparison.itertuples(index=False):
        if last is not None and r.mechanism != last:
            table.add_section()
        value = "" if r.knob == "" else f"{r.knob}={r.knob_value:g}" if isinstance(r.knob_value, float) \
            else f"{r.knob}={r.knob_value}"
        table.add_row(r.mechanism if r.mechanism != last else "", r.mode, value + ("*" if r.default else ""),
                      _g(r.gaussian), f"{r.real:.3g} ± {r.std:.2g}", f"{r.min:.2g}–{r.max:.2g}",
                      _times(r.ratio) if r.ratio == r.ratio and r.gaussian > 1e-6 else "—")
        last = r.mechanism
    return table


def print_verify(report, out: Console) -> None:
    import pandas as pd

    from .verify.report import inputs_comparison

    for note in report.notes:
        out.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    out.print(verify_table(report))
    comparison = inputs_comparison(pd.DataFrame([r.as_row() for r in report.rows]))
    if not comparison.empty:
        out.print(inputs_table(comparison))
    style = "green" if report.passed else "bold red"
    out.print(f"[{style}]{summary_line(report)}[/]", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------ profile

def _ops_table(rows: list[dict], title: str, key: str | None) -> Table:
    table = Table(title=title)
    cols = [c for c in ("op", "calls", "self_cpu_ms", "self_cpu_pct", "cpu_total_ms", "self_cuda_ms",
                        "cuda_total_ms", "self_cpu_bytes", "self_cuda_bytes") if any(c in r for r in rows)]
    for c in cols:
        table.add_column(c + (" ▼" if c == key else ""), justify="left" if c == "op" else "right")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("—" if v is None else fmt_bytes(v) if c.endswith("_bytes") else
                         f"{v:,.3f}" if isinstance(v, float) else str(v))
        table.add_row(*cells)
    return table


def print_profile(report, out: Console, top: int = 10) -> None:
    """The top ops by time and by memory, the memory peak against one N×N tensor, and the files written."""
    case = report.case
    status = str(report.status or "")
    out.print(f"[bold]profile[/] {case.label()} n={case.n:,} B={case.batch} H={case.heads} D={case.head_dim} "
              f"{case.dtype} {case.device} {case.mode} {'causal' if case.causal else 'bidirectional'}: "
              + styled(status) + (f" [dim]{report.error}[/]" if report.error else ""), highlight=False)
    if report.ops_by_time:
        out.print(_ops_table(report.ops_by_time[:top], f"top ops by {report.time_key} (per call)", report.time_key))
    if report.ops_by_memory:
        out.print(_ops_table(report.ops_by_memory[:top], f"top ops by {report.memory_key} (per call)",
                             report.memory_key))
    if report.peak is not None and report.nn_bytes:
        shapes = ", ".join("×".join(map(str, s)) for s in report.peak.output_shapes) or "—"
        ratio = report.peak.bytes / report.nn_bytes
        out.print(f"tracked peak {fmt_bytes(report.peak.bytes)} after op {report.peak.index} {report.peak.op} "
                  f"(output {shapes}) = {ratio:.2f}× one N×N score tensor ({fmt_bytes(report.nn_bytes)}); "
                  f"N×N-sized tensors alive at the peak: {report.nn_alive_at_peak}; "
                  f"{report.ops_count} ops dispatched per call", highlight=False, soft_wrap=True)
    for path in report.files:
        out.print(f"[dim]wrote {path}[/]", highlight=False)


# ------------------------------------------------------------------------------ presets and --against

def presets_table(presets: Iterable) -> Table:
    """``effbench presets``: each preset's name, version, description, case count, published numbers and source."""
    from .presets import case_count, published_summary

    table = Table(title="effbench presets (sweep --preset NAME, estimate --preset NAME, plot --against NAME)")
    for col, just in (("name", "left"), ("version", "right"), ("description", "left"), ("cases", "right"),
                      ("published", "left"), ("source", "left")):
        table.add_column(col, justify=just, overflow="fold", no_wrap=col == "name")
    for p in presets:
        source = "; ".join(x for x in (p.source.get("paper"), f"arXiv {p.source['arxiv']}" if p.source.get("arxiv")
                                       else "", p.source.get("tables"), p.source.get("hardware")) if x)
        table.add_row(f"[bold]{p.name}[/]", f"@{p.version}", p.description, f"{case_count(p):,}",
                      published_summary(p), source or "—")
    return table


def frame_table(df, title: str, caption: str | None = None) -> Table:
    """A DataFrame of display strings as a rich Table (markup escaped; numbers right-aligned)."""
    from rich.markup import escape

    table = Table(title=escape(title), caption=escape(caption) if caption else None, title_justify="left")
    for col in df.columns:
        values = [str(v) for v in df[col]]
        numeric = all(v[:1].isdigit() or v[:1] == "−" or v in ("", "—") for v in values)
        table.add_column(escape(str(col)), justify="right" if numeric else "left", overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*[escape(str(v)) for v in row])
    return table


def print_against(report, out: Console) -> None:
    """``plot --against``: the exponents measured and published, the values side by side, the notes."""
    from rich.markup import escape

    out.print(frame_table(report.exponent_display, f"Measured here vs published — {report.title}",
                          "exponent: least-squares slope of log value on log N over the N both have (± s.e. with "
                          "≥ 3 points); ratio: measured / published"))
    out.print(frame_table(report.points_display, "Per N: measured, published, ratio; each against "
                          f"{report.preset.baseline or 'the baseline'} (measured and published)"))
    for note in report.notes:
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
