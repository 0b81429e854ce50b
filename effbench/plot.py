"""`effbench plot`: read a results CSV, analyse it, draw the figures and write them with the tables.

Reads files only; never runs a mechanism. The numbers come from ``effbench.analysis`` (fits,
crossovers, budget: ``effbench.fits``; position encodings: ``effbench.positions``), the tables and
``summary.md`` from ``effbench.summary``, the figures from ``effbench.figures``.

Output directory (default: ``<csv dir>/<csv stem>_plots/``, e.g. ``results/reference.csv``
-> ``results/reference_plots/``): one file per figure and format (``memory_vs_n``, ``time_vs_n``,
``cuda_memory_vs_n``, ``positions_vs_n``, ``error_vs_knob``; see ``effbench.figures``; with ``--verify`` also
``pareto``, accuracy against cost at one N, and ``pareto.md``: ``effbench.pareto``), then
``slopes.csv``, ``crossovers.csv`` (``budget.csv`` with a budget) and ``summary.md``.

Decode rows (``phase = decode``) are analysed on their own (``effbench.decode_analysis``; the prefill figures
and tables use prefill rows only): with ok decode rows, ``decode_state_vs_n`` and ``decode_time_vs_n``,
``decode_fits.csv`` (``decode_budget.csv`` with a budget) and a decode section in ``summary.md``; the copy
bandwidth comes from the JSON sidecar beside the CSV.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg

from . import analysis, decode_analysis, figures, pareto, results, summary
from .analysis import Analysis
from .decode_analysis import DecodeAnalysis
from .figure_base import PlotResult, save_figure
from .status import Status
from .summary import DecodeSummary, Summary
from .units import UsageError, fmt_bytes, parse_bytes
from .verify.report import read_csv as read_verify_csv


@dataclass
class Report:
    """What `effbench plot` produced: the analysis, its display tables, figures, files written, Markdown, notes."""

    csv_path: Path
    out_dir: Path
    analysis: Analysis | None  # the prefill rows (None when none is ok: a decode-only file)
    tables: Summary | None
    figures: dict[str, PlotResult]
    files: list[Path]
    markdown: str
    notes: list[str]
    budget_bytes: int | None = None
    verify: pd.DataFrame | None = None
    decode: DecodeAnalysis | None = None  # the decode rows (None without ok decode rows)
    decode_tables: DecodeSummary | None = None
    against: Any = None  # effbench.against.AgainstReport with --against
    pareto: Any = None  # effbench.pareto.Frontier with --verify (accuracy vs cost at one N)

    @property
    def summary(self) -> dict[str, pd.DataFrame]:
        """Textbook tables (display strings): ``"memory"`` and ``"time"``, rows = N."""
        return self.tables.textbook if self.tables is not None else {}

    @property
    def highlights(self) -> list[str]:
        """Each attention representative against dense, one line each (then the decode comparison)."""
        return ((self.tables.highlights if self.tables is not None else [])
                + (self.decode_tables.highlights if self.decode_tables is not None else []))

    @property
    def points(self) -> pd.DataFrame | None:
        """Numeric summary: one row per configuration and N (status, memory_bytes, time_ms, ...)."""
        return self.analysis.points if self.analysis is not None else None

    @property
    def slopes(self) -> pd.DataFrame | None:
        return self.analysis.slopes if self.analysis is not None else None

    @property
    def crossovers(self) -> pd.DataFrame | None:
        return self.analysis.crossovers if self.analysis is not None else None

    @property
    def budget(self) -> pd.DataFrame | None:
        return self.analysis.budget if self.analysis is not None else None


def default_out_dir(csv_path: str | Path) -> Path:
    """``results/reference.csv`` -> ``results/reference_plots``."""
    p = Path(csv_path)
    return p.with_name(f"{p.stem}_plots")


def parse_formats(formats: str | Sequence[str]) -> list[str]:
    """``"png,svg"`` or ``("png", "svg")`` -> ["png", "svg"], checked against what matplotlib can write."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = list(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f and f.strip()))
    supported = FigureCanvasAgg.get_supported_filetypes()
    bad = [f for f in out if f not in supported]
    if bad or not out:
        raise UsageError(f"--format {','.join(bad) or '(none)'}: choose from {', '.join(sorted(supported))}")
    return out


def _budget(value: int | str | None) -> int | None:
    """The budget in bytes from a number or a text such as ``80GiB``; UsageError when not positive."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_bytes(value, "--budget")
    if value <= 0:
        raise UsageError(f"--budget must be positive, got {value}")
    return int(value)


def draw_figures(an: Analysis | None, verify: pd.DataFrame | None,
                 decode: DecodeAnalysis | None = None) -> tuple[dict[str, PlotResult], list[str]]:
    """Every figure this file supports, and notes on the ones left out."""
    drawn: dict[str, PlotResult] = {}
    notes = []
    if an is not None:
        drawn["memory"] = figures.scaling_figure(an, "memory")
        if (an.points["time_ms"] > 0).any():
            drawn["time"] = figures.scaling_figure(an, "time")
        else:
            notes.append("no timings in this file (predictions only?): time_vs_n not drawn")
        cuda = figures.cuda_figure(an)
        if cuda is not None:
            drawn["cuda"] = cuda
        else:
            notes.append("no CUDA allocator or NVML readings in this file: cuda_memory_vs_n not drawn")
        positions = figures.positions_figure(an)
        if positions is not None:
            drawn["positions"] = positions
    if decode is not None:
        for key, draw in (("decode_state", figures.decode_state_figure), ("decode_time", figures.decode_time_figure)):
            result = draw(decode)
            if result is not None:
                drawn[key] = result
            else:
                notes.append(f"no decode {'state' if key == 'decode_state' else 'timing'} readings "
                             f"(predictions only?): {figures.FIGURE_NAMES[key]} not drawn")
    if verify is not None:
        err = figures.error_figure(verify)
        if err is not None:
            drawn["error"] = err
        else:
            notes.append("the verify file has no fidelity rows with a swept knob: error_vs_knob not drawn")
    return drawn, notes


def make_report(csv_path: str | Path, out_dir: str | Path | None = None, formats: str | Sequence[str] = ("png",),
                budget_bytes: int | str | None = None, verify_csv: str | Path | Sequence[str | Path] | None = None,
                against: str | None = None, pareto_n: int | None = None) -> Report:
    """Read a results CSV (and optionally an ``effbench verify`` CSV), analyse it, write the figures,
    ``slopes.csv``, ``crossovers.csv`` (``budget.csv``) and ``summary.md`` to ``out_dir``
    (default ``<csv dir>/<csv stem>_plots``), and return the Report.

    Raises ResultsError for a file that is not an effbench CSV or has no ok rows, and UsageError
    for an unknown format or a bad budget; nothing is written in either case.
    """
    csv_path = Path(csv_path)
    fmts = parse_formats(formats)
    budget = _budget(budget_bytes)
    from . import against as against_mod

    preset = against_mod.load(against) if against is not None else None  # refused before anything is written
    an, dec, notes = analyse_phases(csv_path, budget)
    verify = read_verify_csv(verify_csv) if verify_csv is not None else None
    frontier, pareto_notes = pareto.build(an, verify, pareto_n)  # accuracy vs cost; a bad --n is refused here
    out = Path(out_dir) if out_dir is not None else default_out_dir(csv_path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    drawn, figure_notes = draw_figures(an, pareto.error_rows(verify), dec)
    if frontier is not None:
        drawn["pareto"] = pareto.figure(frontier)
    figure_notes = figure_notes + pareto_notes
    notes = (summary.data_notes(an) if an is not None else []) + notes + (dec.notes if dec is not None else []) \
        + figure_notes
    files: list[Path] = []
    for result in drawn.values():
        files += save_figure(result, out, fmts)
    csvs = {}
    if an is not None:
        csvs = {"slopes.csv": an.slopes, "crossovers.csv": an.crossovers}
        if an.budget is not None:
            csvs["budget.csv"] = an.budget
    if dec is not None:
        csvs["decode_fits.csv"] = decode_analysis.fits_table(dec)
        if dec.budget is not None:
            csvs["decode_budget.csv"] = dec.budget
    for name, table in csvs.items():
        table.to_csv(out / name, index=False)
        files.append(out / name)
    tables = summary.summarise(an) if an is not None else None
    dec_tables = summary.summarise_decode(dec) if dec is not None else None
    text = summary.markdown(an, tables, csv_path, files, out, budget, notes, dec, dec_tables,
                            decode_rows=len(dec.rows) if dec is not None else 0)
    if frontier is not None:
        files.append(pareto.write_markdown(frontier, out))
        text += "\n" + pareto.markdown(frontier, image=False)
    (out / "summary.md").write_text(text)
    files.append(out / "summary.md")
    compared = against_mod.make_against(csv_path, preset, out, fmts) if preset is not None else None
    files += compared.files if compared is not None else []
    return Report(csv_path=csv_path, out_dir=out, analysis=an, tables=tables, figures=drawn, files=files,
                  markdown=text, notes=notes, budget_bytes=budget, verify=verify, decode=dec, decode_tables=dec_tables,
                  against=compared, pareto=frontier)


def analyse_phases(csv_path: Path, budget: int | None) -> tuple[Analysis | None, DecodeAnalysis | None, list[str]]:
    """The prefill analysis (prefill rows only), the decode analysis (decode rows only, with the sidecar's copy
    bandwidth) and notes on a phase whose rows are all failures. ResultsError when neither phase has an ok row."""
    df = results.read_results(csv_path)
    prefill, decode = decode_analysis.split_phases(df)
    if not decode_analysis.has_ok(prefill) and not decode_analysis.has_ok(decode):
        analysis.analyse(df, budget, source=str(csv_path))  # raises: no ok rows
    notes = []
    an = analysis.analyse(prefill, budget, source=str(csv_path)) if decode_analysis.has_ok(prefill) else None
    dec = None
    if decode_analysis.has_ok(decode):
        copy, copy_note = decode_analysis.read_copy_bandwidth(csv_path, decode["run_id"] if "run_id" in decode else ())
        dec = decode_analysis.analyse_decode(decode, budget, copy, copy_note)
    for rows, phase in ((prefill, "prefill"), (decode, "decode")):
        if len(rows) and not decode_analysis.has_ok(rows):
            notes.append(f"{len(rows)} {phase} row(s), none ok: no {phase} figures or tables")
    return an, dec, notes


# --------------------------------------------------------------------------- rendering in the terminal

def _styled(text: str) -> str:
    """A cell, markup escaped; coloured by the shared status style map when it starts with a failure status."""
    from rich.markup import escape

    from .render import STYLES

    first = text.split(" ")[0]
    statuses = {s.value for s in Status} - {Status.OK.value}
    return f"[{STYLES[first]}]{escape(text)}[/]" if first in statuses else escape(text)


def _rich_table(df: pd.DataFrame, title: str, caption: str | None = None):
    """A DataFrame of display strings as a rich Table (status words coloured, markup escaped)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), caption=escape(caption) if caption else None, title_justify="left")
    for col in df.columns:
        values = [str(v) for v in df[col]]
        numeric = all(v[:1].isdigit() or v in ("", "—") for v in values)
        table.add_column(escape(str(col)), justify="right" if numeric else "left", overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*[_styled(str(v)) for v in row])
    return table


def _fits_width(df: pd.DataFrame, width: int) -> bool:
    """Whether the table's widest cells, with padding, fit in ``width`` columns."""
    need = sum(max([len(str(c))] + [len(str(v)) for v in df[c]]) + 3 for c in df.columns)
    return need <= width


def _textbook_for(df: pd.DataFrame, width: int) -> tuple[pd.DataFrame, str | None]:
    """The textbook table as is, or transposed (mechanisms as rows) when it is too wide for the terminal."""
    if _fits_width(df, width):
        return df, None
    t = df.drop(columns=["N² (scores)"]).set_index("N").T
    t.index.name = "mechanism"
    return t.reset_index(), "transposed to fit the terminal (rows = mechanisms, columns = N); see summary.md"


def render_report(report: Report, console) -> None:
    """Print the textbook tables, slopes, crossovers, budget, position encodings, highlights, notes and
    the files written."""
    from rich.markup import escape

    an, s = report.analysis, report.tables
    if an is not None and s is not None:
        for metric, title in (("memory", "Peak memory per call"), ("time", "Time per call (ms, median)")):
            if metric in s.textbook:
                df, caption = _textbook_for(s.textbook[metric], console.width)
                console.print(_rich_table(df, f"{title} — {an.setting}", caption))
        console.print(_rich_table(s.slopes, "Fitted log-log slopes",
                                  "≈N below 1.25, ≈N² above 1.75; ± standard error with ≥ 3 points"))
        if not s.crossovers.empty:
            console.print(_rich_table(s.crossovers, "Crossover N* (cheaper than dense / sdpa)"))
        if s.budget is not None and report.budget_bytes:
            console.print(_rich_table(s.budget, f"Largest N under {fmt_bytes(report.budget_bytes)}"))
        if s.positions is not None:
            console.print(_rich_table(s.positions, "Position encodings: parameters and peak memory per call"))
            console.print(_rich_table(s.position_slopes, "Position encodings: log-log slopes"))
    d = report.decode_tables
    if d is not None:
        console.print(_rich_table(d.slopes, "Decode: log-log slopes and time per token at the largest N",
                                  summary.copy_text(report.decode)))
        console.print(_rich_table(d.state_at, "Decode: cache / state bytes by context N",
                                  f"{d.state_caption} {d.state_footnote}"))
        if d.budget is not None and report.budget_bytes:
            console.print(_rich_table(d.budget, f"Decode: largest context that fits in {fmt_bytes(report.budget_bytes)}"
                                      " (state bytes only)", d.state_caption))
    if report.against is not None:
        from .render import print_against
        print_against(report.against, console)
    if report.pareto is not None:
        fr = report.pareto
        console.print(_rich_table(pareto.front_table(fr), f"Pareto front at N={fr.n:,}: error vs time and vs peak memory",
                                  f"error on {pareto.inputs_text(fr)}; {fr.n_choice}"))
    for line in report.highlights:
        console.print(f"[bold]{escape(line)}[/]", highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(f"[green]wrote[/] {len(report.files)} file(s) to {escape(str(report.out_dir))}: "
                  + escape(", ".join(p.name for p in report.files)), highlight=False, soft_wrap=True)
