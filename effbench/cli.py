"""The `effbench` command line: thin commands that parse, validate, delegate and render.

Domain errors (unknown mechanism, malformed size, missing file, ...) become one red line on
stderr and exit code 2; no traceback. The knob-axis options (``--window``, ``--rounds``, ...) are
not written here: one option per sweep axis that a registered knob declares (``Knob.axis``).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import mechanisms

from . import render, results
from .cases import DTYPES, CaseError
from .plugins import PluginError, load_plugins
from .options import (  # noqa: F401  the validation every command shares
    check_at_least, check_choice, check_device, explicit_options, make_cases, memory_budget, parse_knob_options,
    select_mechanisms, with_axis_options,
)
from .units import UsageError, is_noisy, parse_bytes, parse_list

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark and profile efficient attention: time, peak memory, FLOPs, accuracy.")
out_console = render.console()
err_console = render.console(stderr=True)

DOMAIN_ERRORS = (UsageError, CaseError, mechanisms.RegistryError, results.ResultsError, PluginError)


@contextlib.contextmanager
def domain_errors() -> Iterator[None]:
    """Turn a domain error into one red line on stderr and exit code 2."""
    try:
        yield
    except DOMAIN_ERRORS as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # [real] is text
        raise typer.Exit(2) from None


# ------------------------------------------------------------------------ options

PluginOpt = Annotated[Optional[list[Path]], typer.Option("--plugin", help="Python file registering extra mechanisms (repeatable).")]
MechOpt = Annotated[str, typer.Option("--mech", "-m", help="Comma list of mechanisms, or 'all'.")]
NOpt = Annotated[str, typer.Option("--n", "-n", help="Comma list of sequence lengths, e.g. 512,4096,32768.")]
BatchOpt = Annotated[int, typer.Option(help="Batch size B.")]
HeadsOpt = Annotated[int, typer.Option(help="Heads H.")]
HeadDimOpt = Annotated[int, typer.Option("--head-dim", help="Head dimension D.")]
DtypeOpt = Annotated[str, typer.Option(help="float32, float64, float16 or bfloat16.")]
ModeOpt = Annotated[str, typer.Option(help="fwd (inference, no_grad) or fwd+bwd.")]
CausalOpt = Annotated[bool, typer.Option("--causal/--no-causal", help="Causal (top-left aligned) or bidirectional.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for inputs and the mechanisms' random state.")]
PhaseOpt = Annotated[str, typer.Option(help="prefill (one call over N tokens) or decode (single-token steps after a context of N: KV cache / state bytes, ms per token).")]
DecodeStepsOpt = Annotated[int, typer.Option("--decode-steps", help="--phase decode: timed single-token steps after the context (median and IQR over them).")]
KnobOpt = Annotated[Optional[list[str]], typer.Option("--knob", "-k", help="Any knob by name: NAME=V1,V2 (repeatable).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="A named case set (NAME or NAME@VERSION; see `effbench presets`); options given beside it narrow (--mech) or override (--n, --batch, --dtype, --mode, a knob axis, ...) it.")]

def progress_bar(transient: bool = False) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=transient)


def copy_bandwidth(device: str | None, threads: int | None) -> dict:
    """The device's copy bandwidth for the sidecar (decode rows' read_gbps is read against it), measured in a child;
    under Ray (device None) the workers' devices are not this machine's, so it is not measured."""
    from .measure.bandwidth import measure_in_child

    if device is None:
        return {"copy_error": "not measured under --executor ray (the workers' devices are not the driver's)"}
    with err_console.status("measuring copy bandwidth (one 256 MiB tensor copy)"):
        found = measure_in_child(device, threads)
    if "copy_gbps" in found:
        err_console.print(f"[dim]copy bandwidth on {device}: {found['copy_gbps']:.1f} GB/s read + written (decode "
                          "rows' read_gbps is read against it)[/]", highlight=False)
    else:
        err_console.print(f"[yellow]copy bandwidth not measured:[/] {found['copy_error']}", highlight=False)
    return found


def say_readings(device: str, env: dict) -> None:
    """Say plainly which readings this run will have."""
    if device == "cpu":
        err_console.print("[dim]readings: wall time, tracked tensor storage, RSS (CPU run: no CUDA allocator or NVML columns)[/]")
    elif not env.get("nvml"):
        err_console.print("[yellow]NVML is not available: nvml_peak_bytes stays empty; CUDA allocator and tensor-tracker readings are recorded.[/]")


# ------------------------------------------------------------------------ commands

@app.command("list")
def list_cmd(plugin: PluginOpt = None) -> None:
    """The registry: every mechanism with its family, cost, knobs and causal support."""
    with domain_errors():
        load_plugins(plugin)
    out_console.print(render.registry_table())


ExecutorOpt = Annotated[str, typer.Option(help="local (this machine, one case after another) or ray (each case a Ray task on a cluster).")]
AddressOpt = Annotated[Optional[str], typer.Option(help="--executor ray: the cluster, e.g. auto, head:6379 or ray://head:10001 (default: start a local Ray instance).")]
CpusPerCaseOpt = Annotated[Optional[float], typer.Option("--cpus-per-case", help="--executor ray: CPUs each case reserves (default: --threads, else a whole node on a CPU sweep, the node's CPUs shared among its GPUs on CUDA).")]
GpusPerCaseOpt = Annotated[Optional[float], typer.Option("--gpus-per-case", help="--executor ray: GPUs each case reserves (default: 1 on CUDA, else 0).")]


def check_run_options(*, timeout: float, min_time: float | None, threads: int | None, warmup: int, repeats: int) -> None:
    check_at_least("--timeout", timeout, 0, strict=True)
    check_at_least("--min-time", min_time, 0, strict=True)
    check_at_least("--threads", threads, 1)
    check_at_least("--warmup", warmup, 0)
    check_at_least("--repeats", repeats, 1)


def sweep_executor(executor: str, *, address: str | None, device: str, cpus_per_case: float | None,
                   gpus_per_case: float | None, threads: int | None, mem_budget: str | None):
    """The sweep's executor, a context manager (Ray: entering joins or starts the cluster); Ray's options are refused
    on a local sweep. Under Ray, without --mem-budget, each case's default budget is taken on the node that runs it."""
    from .executors import LocalExecutor
    from .ray_executor import RayExecutor

    check_choice(executor, ("local", "ray"), "--executor")
    check_at_least("--cpus-per-case", cpus_per_case, 0, strict=True)
    check_at_least("--gpus-per-case", gpus_per_case, 0)
    if executor == "local":
        given = [flag for flag, value in (("--address", address), ("--cpus-per-case", cpus_per_case),
                                          ("--gpus-per-case", gpus_per_case)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --executor ray")
        return LocalExecutor()
    return RayExecutor(address=address, device=device, cpus_per_case=cpus_per_case if cpus_per_case is not None else threads,
                       gpus_per_case=gpus_per_case, node_budget=mem_budget is None)


def check_out(out: Path, resume: bool) -> None:
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a CSV file path")
    if resume:
        results.done_keys(out)  # refuse a file that is not an effbench CSV before running anything


def run_with_progress(cases, opts, out: Path, *, resume: bool, run_info: dict, executor):
    """run_sweep under a progress bar; Ctrl-C cancels what is outstanding, keeps every finished row and says how to resume."""
    from .sweep import run_sweep

    with progress_bar() as progress:
        task = progress.add_task("sweep", total=len(cases))
        try:
            report = run_sweep(cases, opts, out, resume=resume, run_info=run_info, executor=executor,
                               on_start=lambda c: progress.update(task, description=f"{c.label()} n={c.n}"),
                               on_row=lambda c, r: progress.advance(task))
        except KeyboardInterrupt:
            progress.stop()
            written = int(progress.tasks[0].completed)
            err_console.print(f"[yellow]interrupted:[/] outstanding cases cancelled; {written} row(s) of this run are in "
                              f"{out}. Run the same command with --resume to run the rest.", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        progress.update(task, description="sweep done", completed=len(cases))
    return report


def print_sweep(report, out: Path) -> None:
    title = f"{len(report.rows)} case(s) written to {out}" + (f"; {report.resumed} already there (resume)" if report.resumed else "")
    out_console.print(render.sweep_table(report.rows, title))
    noisy = [r for r in report.rows if is_noisy(r.get("time_ms_median"), r.get("time_ms_iqr"))]
    if noisy:
        err_console.print(f"[yellow]warning:[/] {len(noisy)} case(s) have IQR above 10% of the median: "
                          "close other programs, add --warmup 3 or use --min-time 2 for steadier timings.")


@app.command()
@with_axis_options
def sweep(
    ctx: typer.Context,
    preset: PresetOpt = None,
    mech: MechOpt = "all",
    n: NOpt = "512,1024,2048,4096",
    batch: BatchOpt = 1,
    heads: HeadsOpt = 8,
    head_dim: HeadDimOpt = 64,
    dtype: DtypeOpt = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:i] (under Ray: auto, cpu or cuda).")] = "auto",
    mode: ModeOpt = "fwd",
    causal: CausalOpt = False,
    phase: PhaseOpt = "prefill",
    decode_steps: DecodeStepsOpt = 32,
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing (prefill; a decode case warms with one step).")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed calls (median and IQR over them).")] = 5,
    min_time: Annotated[Optional[float], typer.Option("--min-time", help="Instead of --repeats: time for at least this many seconds.")] = None,
    flush_l2: Annotated[bool, typer.Option("--flush-l2/--no-flush-l2", help="CUDA: flush the L2 cache before each timed sample (a write to a buffer larger than L2, outside the timed events, as triton.testing.do_bench does); --no-flush-l2 keeps it warm. The row's timer says which.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds per case before its child process is killed.")] = 300.0,
    mem_budget: Annotated[Optional[str], typer.Option("--mem-budget", help="Skip cases predicted above this (e.g. 20GiB; 'none' to disable). Default: 80% of free RAM / 90% of free GPU memory (under Ray: on the node that runs the case).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Results CSV (appended to).")] = Path("results.csv"),
    resume: Annotated[bool, typer.Option(help="Skip cases already in --out (by case key).")] = False,
    seed: SeedOpt = 0,
    threads: Annotated[Optional[int], typer.Option(help="torch threads in each case (default: torch's; under Ray: the case's CPUs).")] = None,
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    cpus_per_case: CpusPerCaseOpt = None,
    gpus_per_case: GpusPerCaseOpt = None,
    knob: KnobOpt = None,
    plugin: PluginOpt = None,
    axes: dict | None = None,
) -> None:
    """Measure time, peak memory and FLOPs of each case; append one row per case to --out."""
    from .measure.env import environment
    from .runner import RunOptions

    with domain_errors():
        check_run_options(timeout=timeout, min_time=min_time, threads=threads, warmup=warmup, repeats=repeats)
        with sweep_executor(executor, address=address, device=device, cpus_per_case=cpus_per_case,
                            gpus_per_case=gpus_per_case, threads=threads, mem_budget=mem_budget) as ex:
            dev = check_device(device) if executor == "local" else ex.device
            cases = make_cases(plugin=plugin, mech=mech, n=n, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                               device=dev, mode=mode, causal=causal, seed=seed, knob=knob, axes=axes, phase=phase,
                               decode_steps=decode_steps, preset=preset, explicit=explicit_options(ctx))
            check_out(out, resume)
            budget = memory_budget(mem_budget, dev) if executor == "local" or mem_budget is not None else None
            opts = RunOptions(warmup=warmup, repeats=repeats, min_time=min_time, timeout=timeout, mem_budget=budget,
                              plugins=tuple(str(p) for p in plugin or ()), threads=threads, flush_l2=flush_l2)
            env = environment()
            if phase == "decode":
                env.update(copy_bandwidth(dev if executor == "local" else None, threads))
            if executor == "local":
                say_readings(dev, env)
            else:
                err_console.print(f"[dim]{ex.summary()}[/]", highlight=False)
            report = run_with_progress(cases, opts, out, resume=resume, run_info=env, executor=ex)
    print_sweep(report, out)


@app.command()
@with_axis_options
def estimate(
    ctx: typer.Context,
    preset: PresetOpt = None,
    mech: MechOpt = "all",
    n: NOpt = "4096,32768,131072",
    batch: BatchOpt = 1,
    heads: HeadsOpt = 8,
    head_dim: HeadDimOpt = 64,
    dtype: DtypeOpt = "float32",
    mode: ModeOpt = "fwd",
    causal: CausalOpt = False,
    phase: PhaseOpt = "prefill",
    decode_steps: DecodeStepsOpt = 32,
    seed: SeedOpt = 0,
    timeout: Annotated[float, typer.Option(help="Seconds per case.")] = 120.0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also append rows (predicted_bytes) to this CSV.")] = None,
    knob: KnobOpt = None,
    plugin: PluginOpt = None,
    axes: dict | None = None,
) -> None:
    """Predict each case's peak memory on fake tensors (decode: the state after the context and one step's peak):
    nothing of size N is allocated."""
    from .measure.env import environment
    from .runner import RunOptions
    from .sweep import run_sweep

    with domain_errors():
        check_at_least("--timeout", timeout, 0, strict=True)
        cases = make_cases(plugin=plugin, mech=mech, n=n, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                           device="cpu", mode=mode, causal=causal, seed=seed, knob=knob, axes=axes, phase=phase,
                           decode_steps=decode_steps, preset=preset, explicit=explicit_options(ctx))
        opts = RunOptions(timeout=timeout, predict_only=True, plugins=tuple(str(p) for p in plugin or ()))
        with tempfile.TemporaryDirectory() as tmp, progress_bar(transient=True) as progress:
            task = progress.add_task("estimate", total=len(cases))
            report = run_sweep(cases, opts, out if out is not None else Path(tmp) / "estimate.csv",
                               run_info=environment(), on_row=lambda c, r: progress.advance(task))
    out_console.print(render.estimate_table(report.rows))


@app.command()
def plot(
    csv: Annotated[Path, typer.Argument(help="A results CSV written by `effbench sweep` (or `estimate --out`).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for figures and tables (default: <csv stem>_plots beside the CSV).")] = None,
    format_: Annotated[str, typer.Option("--format", help="Comma list of figure formats, e.g. png,svg.")] = "png",
    budget: Annotated[Optional[str], typer.Option(help="Memory budget for 'largest N that fits' (prefill: peak memory of a call; decode: the cache/state bytes), e.g. 80GiB.")] = None,
    verify_csv: Annotated[Optional[list[Path]], typer.Option("--verify", help="verify.csv from `effbench verify` (repeatable): adds error-vs-knob figures (Gaussian inputs) and the accuracy-vs-cost figure pareto.png with pareto.md (error on real inputs when a file has them, e.g. from `verify --inputs minilm`).")] = None,
    pareto_n: Annotated[Optional[int], typer.Option("--n", "-n", help="With --verify: the N whose time and memory the accuracy-vs-cost figure uses (default: the N at which the most mechanism/knob points have both, the largest on a tie).")] = None,
    against: Annotated[Optional[str], typer.Option("--against", help="A preset with published numbers (see `effbench presets`): measured beside published, their ratio and fitted exponents; writes against_<preset>.png/.md/.csv.")] = None,
) -> None:
    """Figures, fitted slopes, crossover N*, largest N under a budget and a Markdown summary, from files only."""
    from .plot import make_report, render_report

    with domain_errors():
        budget_bytes = parse_bytes(budget, "--budget") if budget is not None else None
        report = make_report(csv, out_dir=out, formats=parse_list(format_) or ["png"], budget_bytes=budget_bytes,
                             verify_csv=verify_csv or None, against=against, pareto_n=pareto_n)
    render_report(report, out_console)


@app.command("presets")
def presets_cmd(plugin: PluginOpt = None) -> None:
    """Named, versioned case sets (`sweep --preset NAME`, `estimate --preset NAME`) and the published numbers they
    are compared with (`plot results.csv --against NAME`)."""
    from .presets import available

    with domain_errors():
        load_plugins(plugin)
        found = available()
    out_console.print(render.presets_table(found))


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
    inputs: Annotated[str, typer.Option(help="What the fidelity layer runs on: gaussian (random q, k, v; trends checked) or minilm (q, k, v of every layer and head of the pretrained all-MiniLM-L6-v2 on a shipped text, N ≤ 512, at the default knobs, beside the Gaussian error of the same setting; needs the extra [real]).")] = "gaussian",
    plugin: PluginOpt = None,
) -> None:
    """Check every mechanism against its own O(N²) reference and against dense attention; exit 1 on any failure."""
    import torch

    from .verify import run_verify, write_csv

    with domain_errors():
        load_plugins(plugin)
        names = select_mechanisms(mech)
        check_choice(dtype, DTYPES, "--dtype")
        dev = check_device(device)
        check_at_least("--n", n, 2)
        check_at_least("--tolerance", tolerance, 0, strict=True)
        check_at_least("--threads", threads, 1)
        if threads:
            torch.set_num_threads(threads)
        with progress_bar(transient=True) as progress:
            task = progress.add_task("verify", total=len(names))

            def on_progress(done: int, total: int, label: str) -> None:
                progress.update(task, completed=done, total=total, description=f"verify {label}")

            report = run_verify(names, n, device=dev, dtype=dtype, seed=seed, tolerance=tolerance, progress=on_progress,
                                inputs=inputs)
        write_csv(report, out)
    render.print_verify(report, out_console)
    err_console.print(f"[dim]checks written to {out}[/]")
    if not report.passed:
        raise typer.Exit(1)


@app.command()
@with_axis_options
def profile(
    mech: Annotated[str, typer.Option("--mech", "-m", help="The one mechanism to profile.")] = "dense",
    n: Annotated[str, typer.Option("--n", "-n", help="The one sequence length.")] = "2048",
    batch: BatchOpt = 1,
    heads: HeadsOpt = 8,
    head_dim: HeadDimOpt = 64,
    dtype: DtypeOpt = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:i].")] = "auto",
    mode: ModeOpt = "fwd",
    causal: CausalOpt = False,
    warmup: Annotated[int, typer.Option(help="Untimed calls before profiling.")] = 1,
    repeats: Annotated[int, typer.Option(help="Profiled calls.")] = 3,
    timeout: Annotated[float, typer.Option(help="Seconds before the case's child process is killed.")] = 300.0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for trace.json, ops.md and the memory timeline.")] = Path("profile"),
    seed: SeedOpt = 0,
    threads: Annotated[Optional[int], typer.Option(help="torch threads in the case (default: torch's).")] = None,
    knob: KnobOpt = None,
    plugin: PluginOpt = None,
    axes: dict | None = None,
) -> None:
    """Where one case's time and memory go: a torch.profiler trace, the top ops, and the tracked memory after every op."""
    from .profile import run_profile

    with domain_errors():
        check_at_least("--timeout", timeout, 0, strict=True)
        check_at_least("--warmup", warmup, 0)
        check_at_least("--repeats", repeats, 1)
        check_at_least("--threads", threads, 1)
        cases = make_cases(plugin=plugin, mech=mech, n=n, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                           device=check_device(device), mode=mode, causal=causal, seed=seed, knob=knob, axes=axes)
        if len(cases) != 1:
            raise UsageError(f"profile runs one case; these options give {len(cases)} (one --mech, one --n, one value per knob)")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; give a directory")
        with progress_bar(transient=True) as progress:
            progress.add_task(f"profile {cases[0].label()} n={cases[0].n}", total=None)
            report = run_profile(cases[0], out, warmup=warmup, repeats=repeats,
                                 plugins=tuple(str(p) for p in plugin or ()), threads=threads, timeout=timeout)
    render.print_profile(report, out_console)
    if report.status != "ok":
        raise typer.Exit(1)


@app.command()
def doctor(
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:i].")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's).")] = None,
) -> None:
    """The environment, which readings a sweep will have here, and a self-test of each against a known answer; exit 1 on a disagreement."""
    from .doctor import render_doctor, run_doctor

    with domain_errors():
        dev = check_device(device)
        check_at_least("--threads", threads, 1)
        with progress_bar(transient=True) as progress:
            progress.add_task("doctor: self-test", total=None)
            report = run_doctor(dev, threads=threads)
    render_doctor(report, out_console)
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    """The console script: a malformed option (``--batch abc``) is one line and exit 2, like every other bad input."""
    try:  # Typer ≥ 0.20 vendors Click; older Typer depends on it
        from typer._click.exceptions import UsageError as ClickUsageError
    except ImportError:  # pragma: no cover
        from click.exceptions import UsageError as ClickUsageError
    try:
        code = app(standalone_mode=False)
    except ClickUsageError as exc:
        err_console.print(f"[bold red]error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except typer.Abort:
        err_console.print("[yellow]interrupted[/]")
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
