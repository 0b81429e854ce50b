"""The `effbench` command line: thin commands that parse, validate, delegate and render.

Domain errors (unknown mechanism, malformed size, missing file, ...) become one red
line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import mechanisms

from . import results
from .cases import DTYPES, MODES, CaseError, expand
from .plugins import PluginError, load_plugins
from .units import UsageError, fmt_bytes, fmt_flops, fmt_ms, parse_bytes, parse_int_list, parse_list

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark and profile efficient attention: time, peak memory, FLOPs, accuracy.")
out_console = Console()
err_console = Console(stderr=True)

DOMAIN_ERRORS = (UsageError, CaseError, mechanisms.RegistryError, results.ResultsError, PluginError)


class Exit2(Exception):
    pass


@contextlib.contextmanager
def domain_errors() -> Iterator[None]:
    """Turn a domain error into one red line on stderr and exit code 2."""
    try:
        yield
    except DOMAIN_ERRORS as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


# ------------------------------------------------------------------------ options

PluginOpt = Annotated[Optional[list[Path]], typer.Option("--plugin", help="Python file registering extra mechanisms (repeatable).")]
MechOpt = Annotated[str, typer.Option("--mech", "-m", help="Comma list of mechanisms, or 'all'.")]
NOpt = Annotated[str, typer.Option("--n", "-n", help="Comma list of sequence lengths, e.g. 512,4096,32768.")]
AXIS_HELP = "Comma list for the {axis} axis; fed only to mechanisms with a knob on it."
BatchOpt = Annotated[int, typer.Option(help="Batch size B.")]
HeadsOpt = Annotated[int, typer.Option(help="Heads H.")]
HeadDimOpt = Annotated[int, typer.Option("--head-dim", help="Head dimension D.")]
DtypeOpt = Annotated[str, typer.Option(help="float32, float64, float16 or bfloat16.")]
ModeOpt = Annotated[str, typer.Option(help="fwd (inference, no_grad) or fwd+bwd.")]
CausalOpt = Annotated[bool, typer.Option("--causal/--no-causal", help="Causal (top-left aligned) or bidirectional.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for inputs and the mechanisms' random state.")]
KnobOpt = Annotated[Optional[list[str]], typer.Option("--knob", "-k", help="Any knob by name: NAME=V1,V2 (repeatable).")]


def select_mechanisms(text: str) -> list[str]:
    names = parse_list(text)
    if not names:
        raise UsageError("--mech: no mechanism given; use 'all' or a comma list")
    if names == ["all"]:
        return list(mechanisms.REGISTRY)
    for name in names:
        mechanisms.get(name)  # raises with the valid choices
    return list(dict.fromkeys(names))


def check_device(device: str) -> str:
    import torch

    from .runner import resolve_device

    if device in ("auto", "cpu"):
        return resolve_device(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}); use --device cpu")
        return resolve_device(device)
    raise UsageError(f"--device {device!r}: choose auto, cpu or cuda[:index]")


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")


def check_choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise UsageError(f"{what} {value!r} is not one of: {', '.join(choices)}")
    return value


def parse_knob_options(items: list[str] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--knob {item!r}: write NAME=V1,V2 (e.g. --knob impl=eager,flex)")
        name, values = item.split("=", 1)
        vals = parse_list(values)
        if not name.strip() or not vals:
            raise UsageError(f"--knob {item!r}: write NAME=V1,V2")
        out[name.strip()] = vals
    return out


def make_cases(*, plugin, mech: str, n: str, batch: int, heads: int, head_dim: int, dtype: str, device: str,
               mode: str, causal: bool, seed: int, knob: list[str] | None, axes: dict[str, str | None] | None = None):
    """Load plugins, validate every sweep option and expand the cases (raises domain errors)."""
    load_plugins(plugin)
    names = select_mechanisms(mech)
    ns = parse_int_list(n, "--n")
    check_choice(dtype, DTYPES, "--dtype")
    check_choice(mode, MODES, "--mode")
    for name, value in (("--batch", batch), ("--heads", heads), ("--head-dim", head_dim)):
        if value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    parsed_axes = {a: parse_list(v) for a, v in (axes or {}).items() if v is not None}
    return expand(names, ns, axes=parsed_axes, knob_values=parse_knob_options(knob), batch=batch, heads=heads,
                  head_dim=head_dim, dtype=dtype, device=device, mode=mode, causal=causal, seed=seed)


def default_budget(device: str) -> int | None:
    """A safe share of what is free: 80% of available RAM, or 90% of free GPU memory."""
    if device.startswith("cuda"):
        import torch
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.9)
    from .measure.env import mem_available
    avail = mem_available()
    return int(avail * 0.8) if avail else None


# ------------------------------------------------------------------------ commands

@app.command("list")
def list_cmd(plugin: PluginOpt = None) -> None:
    """The registry: every mechanism with its family, cost, knobs and causal support."""
    with domain_errors():
        load_plugins(plugin)
    table = Table(title="effbench mechanisms", show_lines=False)
    for col in ("name", "family", "complexity", "memory", "knobs (default, sweep axis)", "causal", "bidir"):
        table.add_column(col)
    for spec in mechanisms.REGISTRY.values():
        table.add_row(spec.name, spec.family, spec.complexity, spec.memory_complexity or "—",
                      ", ".join(k.describe() for k in spec.knobs) or "—",
                      "yes" if spec.supports_causal else "no", "yes" if spec.supports_bidirectional else "no")
    out_console.print(table)


@app.command()
def sweep(
    mech: MechOpt = "all",
    n: NOpt = "512,1024,2048,4096",
    batch: BatchOpt = 1,
    heads: HeadsOpt = 8,
    head_dim: HeadDimOpt = 64,
    dtype: DtypeOpt = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:i].")] = "auto",
    mode: ModeOpt = "fwd",
    causal: CausalOpt = False,
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed calls (median and IQR over them).")] = 5,
    min_time: Annotated[Optional[float], typer.Option("--min-time", help="Instead of --repeats: time for at least this many seconds.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per case before its child process is killed.")] = 300.0,
    mem_budget: Annotated[Optional[str], typer.Option("--mem-budget", help="Skip cases predicted above this (e.g. 20GiB; 'none' to disable). Default: 80% of free RAM / 90% of free GPU memory.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Results CSV (appended to).")] = Path("results.csv"),
    resume: Annotated[bool, typer.Option(help="Skip cases already in --out (by case key).")] = False,
    seed: SeedOpt = 0,
    threads: Annotated[Optional[int], typer.Option(help="torch threads in each case (default: torch's).")] = None,
    window: Annotated[Optional[str], typer.Option(help=AXIS_HELP.format(axis="window"))] = None,
    dilation: Annotated[Optional[str], typer.Option(help=AXIS_HELP.format(axis="dilation"))] = None,
    globals_: Annotated[Optional[str], typer.Option("--globals", help=AXIS_HELP.format(axis="globals"))] = None,
    block: Annotated[Optional[str], typer.Option(help=AXIS_HELP.format(axis="block"))] = None,
    rounds: Annotated[Optional[str], typer.Option(help=AXIS_HELP.format(axis="rounds"))] = None,
    bucket: Annotated[Optional[str], typer.Option(help=AXIS_HELP.format(axis="bucket"))] = None,
    features: Annotated[Optional[str], typer.Option(help=AXIS_HELP.format(axis="features"))] = None,
    rank: Annotated[Optional[str], typer.Option(help=AXIS_HELP.format(axis="rank"))] = None,
    segment: Annotated[Optional[str], typer.Option(help=AXIS_HELP.format(axis="segment"))] = None,
    memory: Annotated[Optional[str], typer.Option(help=AXIS_HELP.format(axis="memory"))] = None,
    compress: Annotated[Optional[str], typer.Option(help=AXIS_HELP.format(axis="compress"))] = None,
    knob: KnobOpt = None,
    plugin: PluginOpt = None,
) -> None:
    """Measure time, peak memory and FLOPs of each case; append one row per case to --out."""
    from .measure.env import environment
    from .runner import RunOptions
    from .sweep import run_sweep

    with domain_errors():
        if timeout <= 0:
            raise UsageError(f"--timeout must be positive, got {timeout}")
        if min_time is not None and min_time <= 0:
            raise UsageError(f"--min-time must be positive, got {min_time}")
        check_threads(threads)
        if warmup < 0:
            raise UsageError(f"--warmup must be 0 or more, got {warmup}")
        if repeats < 1:
            raise UsageError(f"--repeats must be at least 1, got {repeats}")
        dev = check_device(device)
        axes = {"window": window, "dilation": dilation, "globals": globals_, "block": block, "rounds": rounds,
                "bucket": bucket, "features": features, "rank": rank, "segment": segment, "memory": memory,
                "compress": compress}
        cases = make_cases(plugin=plugin, mech=mech, n=n, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                           device=dev, mode=mode, causal=causal, seed=seed, knob=knob, axes=axes)
        if mem_budget is None:
            budget = default_budget(dev)
        elif mem_budget.strip().lower() == "none":
            budget = None
        else:
            budget = parse_bytes(mem_budget, "--mem-budget")
        if out.exists() and out.is_dir():
            raise UsageError(f"--out {out} is a directory; give a CSV file path")
        opts = RunOptions(warmup=warmup, repeats=repeats, min_time=min_time, timeout=timeout, mem_budget=budget,
                          plugins=tuple(str(p) for p in plugin or ()), threads=threads)
        if resume:
            results.done_keys(out)  # refuse a file that is not an effbench CSV before running anything

        env = environment()
        if dev == "cpu":
            err_console.print("[dim]readings: wall time, tracked tensor storage, RSS (CPU run: no CUDA allocator or NVML columns)[/]")
        elif not env.get("nvml"):
            err_console.print("[yellow]NVML is not available: nvml_peak_bytes stays empty; CUDA allocator and tensor-tracker readings are recorded.[/]")

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err_console, transient=False) as progress:
            task = progress.add_task("sweep", total=len(cases))

            def on_start(case):
                progress.update(task, description=f"{case.label()} n={case.n}")

            def on_row(case, row):
                progress.advance(task)

            report = run_sweep(cases, opts, out, resume=resume, run_info=env, on_start=on_start, on_row=on_row)
            progress.update(task, description="sweep done", completed=len(cases))

    render_rows(report.rows, title=f"{len(report.rows)} case(s) written to {out}"
                + (f"; {report.resumed} already there (resume)" if report.resumed else ""))
    noisy = [r for r in report.rows if r.get("time_ms_median") and r.get("time_ms_iqr") is not None
             and r["time_ms_iqr"] / r["time_ms_median"] > 0.10]
    if noisy:
        err_console.print(f"[yellow]warning:[/] {len(noisy)} case(s) have IQR above 10% of the median: "
                          "close other programs, add --warmup 3 or use --min-time 2 for steadier timings.")


def render_rows(rows: list[dict], title: str) -> None:
    """Summary table: times in ms (median ± IQR), memory in binary units; empty reading columns left out."""
    columns = [("mechanism", "left", None), ("knobs", "left", None), ("N", "right", None), ("status", "left", None),
               ("ms (median ± IQR)", "right", "time_ms_median"), ("peak tensors", "right", "peak_tensor_bytes"),
               ("peak RSS", "right", "rss_peak_bytes"), ("CUDA alloc", "right", "peak_alloc_bytes"),
               ("NVML", "right", "nvml_peak_bytes"), ("FLOPs", "right", "flops")]
    columns = [c for c in columns if c[2] is None or any(r.get(c[2]) is not None for r in rows)]
    table = Table(title=title)
    for name, just, _ in columns:
        table.add_column(name, justify=just, no_wrap=name in ("mechanism", "N"),
                         overflow="fold" if name in ("knobs", "status") else "ellipsis")
    for r in rows:
        spec = mechanisms.REGISTRY.get(r["mechanism"])
        status = r.get("status", "")
        style = {"ok": "green", "skipped": "dim", "predicted_oom": "yellow"}.get(status, "red")
        cells = {
            "mechanism": r["mechanism"],
            "knobs": ", ".join(f"{k.name}={r.get(k.name)}" for k in spec.knobs) if spec else "",
            "N": f"{r['n']:,}",
            "status": f"[{style}]{status}[/]" + (f" [dim]{r['error'][:48]}…[/]" if status != "ok" and r.get("error") else ""),
            "ms (median ± IQR)": fmt_ms(r.get("time_ms_median"), r.get("time_ms_iqr")),
            "peak tensors": fmt_bytes(r.get("peak_tensor_bytes")), "peak RSS": fmt_bytes(r.get("rss_peak_bytes")),
            "CUDA alloc": fmt_bytes(r.get("peak_alloc_bytes")), "NVML": fmt_bytes(r.get("nvml_peak_bytes")),
            "FLOPs": fmt_flops(r.get("flops")),
        }
        table.add_row(*[cells[name] for name, _, _ in columns])
    out_console.print(table)


@app.command()
def estimate(
    mech: MechOpt = "all",
    n: NOpt = "4096,32768,131072",
    batch: BatchOpt = 1,
    heads: HeadsOpt = 8,
    head_dim: HeadDimOpt = 64,
    dtype: DtypeOpt = "float32",
    mode: ModeOpt = "fwd",
    causal: CausalOpt = False,
    seed: SeedOpt = 0,
    timeout: Annotated[float, typer.Option(help="Seconds per case.")] = 120.0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also append rows (predicted_bytes) to this CSV.")] = None,
    knob: KnobOpt = None,
    plugin: PluginOpt = None,
) -> None:
    """Predict each case's peak memory on fake tensors: nothing of size N is allocated."""
    from .runner import RunOptions
    from .sweep import run_sweep

    with domain_errors():
        if timeout <= 0:
            raise UsageError(f"--timeout must be positive, got {timeout}")
        cases = make_cases(plugin=plugin, mech=mech, n=n, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                           device="cpu", mode=mode, causal=causal, seed=seed, knob=knob)
        opts = RunOptions(timeout=timeout, predict_only=True, plugins=tuple(str(p) for p in plugin or ()))
        rows: list[dict] = []
        target = out
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path = target if target is not None else Path(tmp) / "estimate.csv"
            from .measure.env import environment
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          console=err_console, transient=True) as progress:
                task = progress.add_task("estimate", total=len(cases))
                report = run_sweep(cases, opts, path, run_info=environment(),
                                   on_row=lambda c, r: progress.advance(task))
            rows = report.rows
    table = Table(title="predicted peak memory of one call (fake tensors; inputs not included)")
    for col, just in (("mechanism", "left"), ("knobs", "left"), ("N", "right"), ("predicted peak", "right"),
                      ("params", "right"), ("FLOPs", "right"), ("status", "left")):
        table.add_column(col, justify=just)
    for r in rows:
        spec = mechanisms.REGISTRY.get(r["mechanism"])
        knobs = ", ".join(f"{k.name}={r.get(k.name)}" for k in spec.knobs) if spec else ""
        status = r.get("status", "")
        table.add_row(r["mechanism"], knobs, f"{r['n']:,}", fmt_bytes(r.get("predicted_bytes")),
                      fmt_bytes(r.get("param_bytes")), fmt_flops(r.get("flops")),
                      status + (f" {r['error'][:60]}" if r.get("error") else ""))
    out_console.print(table)


@app.command()
def plot(
    csv: Annotated[Path, typer.Argument(help="A results CSV written by `effbench sweep` (or `estimate --out`).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for figures and tables (default: <csv stem>_plots beside the CSV).")] = None,
    format_: Annotated[str, typer.Option("--format", help="Comma list of figure formats, e.g. png,svg.")] = "png",
    budget: Annotated[Optional[str], typer.Option(help="Memory budget for 'largest N that fits', e.g. 80GiB.")] = None,
    verify_csv: Annotated[Optional[Path], typer.Option("--verify", help="verify.csv from `effbench verify`: adds error-vs-knob figures.")] = None,
) -> None:
    """Figures, fitted slopes, crossover N*, largest N under a budget and a Markdown summary, from files only."""
    from .plot import make_report, render_report

    with domain_errors():
        budget_bytes = parse_bytes(budget, "--budget") if budget is not None else None
        report = make_report(csv, out_dir=out, formats=parse_list(format_) or ["png"], budget_bytes=budget_bytes,
                             verify_csv=verify_csv)
    render_report(report, out_console)


@app.command()
def verify(
    mech: MechOpt = "all",
    n: Annotated[Optional[int], typer.Option("--n", "-n", help="Sequence length of the checks (default 777: a multiple of no window, block, bucket or segment).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:i].")] = "cpu",
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = 0,
    tolerance: Annotated[Optional[float], typer.Option(help="Max abs error allowed against the float64 reference (default 1e-5 for float32, looser for fp16/bf16).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV of every check (read by `effbench plot --verify`).")] = Path("verify.csv"),
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's).")] = None,
    plugin: PluginOpt = None,
) -> None:
    """Check every mechanism against its own O(N²) reference and against dense attention; exit 1 on any failure."""
    import torch

    from .verify import render, run_verify, write_csv

    with domain_errors():
        load_plugins(plugin)
        names = select_mechanisms(mech)
        check_choice(dtype, DTYPES, "--dtype")
        dev = check_device(device)
        if n is not None and n < 2:
            raise UsageError(f"--n must be at least 2, got {n}")
        check_threads(threads)
        if threads:
            torch.set_num_threads(threads)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err_console, transient=True) as progress:
            task = progress.add_task("verify", total=len(names))

            def on_progress(done: int, total: int, label: str) -> None:
                progress.update(task, completed=done, total=total, description=f"verify {label}")

            report = run_verify(names, n, device=dev, dtype=dtype, seed=seed, tolerance=tolerance, progress=on_progress)
        write_csv(report, out)
    render(report, out_console)
    err_console.print(f"[dim]checks written to {out}[/]")
    if not report.passed:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
