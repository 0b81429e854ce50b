"""Where one case's time goes, op by op: a ``torch.profiler`` trace of warm calls, its key averages as two
tables (top ops by self time, top ops by memory allocated) and the number of aten ops one call dispatches."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from ..measure.memory import METADATA_OPS

CALL_LABEL = "effbench::call"  # a record_function range around each profiled call, so the trace shows the calls


# --------------------------------------------------------------------------- op count

class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (``total``) and by name (``by_op``, e.g. ``aten::bmm``)."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in METADATA_OPS:  # a fake tensor's ``.device`` dispatches; a real one's launches nothing
            self.by_op[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> OpCounter:
    """Run ``fn`` once under an :class:`OpCounter` and return the counter."""
    with OpCounter() as counter:
        fn()
    return counter


def count_case_ops(case, sized_for: str | None = None) -> int:
    """The aten ops one call of ``case`` dispatches (one kernel launch each on a GPU), as the prediction counts them
    on fake tensors (:func:`effbench.runner.predict`, equal to the real call's count): nothing of size N is
    allocated, so N = 1M costs no memory. ``sized_for="cuda"``: with blocks sized as on a GPU
    (``mechanisms._budget``), the count a GPU call dispatches."""
    import contextlib

    from mechanisms._budget import sized_for as blocks_sized_for

    from ..runner import predict

    with blocks_sized_for(sized_for) if sized_for else contextlib.nullcontext():
        return predict(case).ops


# --------------------------------------------------------------------------- profiler

def activities(cuda: bool) -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])


def profile_calls(call: Callable[[], Any], repeats: int, cuda: bool, sync: Callable[[], None] | None = None):
    """``repeats`` calls under ``torch.profiler.profile`` (shapes and memory recorded, no stacks); the profiler."""
    from torch.profiler import profile, record_function

    with profile(activities=activities(cuda), record_shapes=True, profile_memory=True, with_stack=False) as prof:
        for _ in range(repeats):
            with record_function(CALL_LABEL):
                call()
        if sync is not None:
            sync()  # CUDA work launched by the last call finishes inside the profiled window
    return prof


def _first(evt: Any, *names: str) -> float:
    """The first of ``names`` that ``evt`` has (torch renamed cuda_* to device_*), else 0."""
    for name in names:
        value = getattr(evt, name, None)
        if value is not None:
            return value
    return 0


def op_rows(key_averages, repeats: int, cuda: bool) -> list[dict[str, Any]]:
    """One dict per op of the profiler's key averages, values per profiled call (ms, bytes); the
    ``effbench::call`` ranges and the profiler's own ``[memory]`` bucket are left out."""
    events = [e for e in key_averages if e.key != CALL_LABEL and not e.key.startswith("[")]
    self_cpu_all = sum(e.self_cpu_time_total for e in events) or 1.0
    self_dev_all = sum(_first(e, "self_device_time_total", "self_cuda_time_total") for e in events) or 1.0
    rows = []
    for e in events:
        calls = e.count / repeats
        row = {"op": e.key, "calls": int(calls) if float(calls).is_integer() else round(calls, 2),
               "self_cpu_ms": e.self_cpu_time_total / 1e3 / repeats,
               "self_cpu_pct": 100.0 * e.self_cpu_time_total / self_cpu_all,
               "cpu_total_ms": e.cpu_time_total / 1e3 / repeats,
               "self_cpu_bytes": int(e.self_cpu_memory_usage // repeats),
               "cpu_total_bytes": int(e.cpu_memory_usage // repeats)}
        if cuda:
            dev = _first(e, "self_device_time_total", "self_cuda_time_total")
            row.update({"self_cuda_ms": dev / 1e3 / repeats, "self_cuda_pct": 100.0 * dev / self_dev_all,
                        "cuda_total_ms": _first(e, "device_time_total", "cuda_time_total") / 1e3 / repeats,
                        "self_cuda_bytes": int(_first(e, "self_device_memory_usage", "self_cuda_memory_usage")
                                               // repeats),
                        "cuda_total_bytes": int(_first(e, "device_memory_usage", "cuda_memory_usage") // repeats)})
        rows.append(row)
    return rows


def sort_keys(cuda: bool) -> tuple[str, str]:
    """The columns the time and memory tables are sorted by."""
    return ("self_cuda_ms", "self_cuda_bytes") if cuda else ("self_cpu_ms", "self_cpu_bytes")


def top_tables(rows: list[dict[str, Any]], cuda: bool, top: int = 20) -> tuple[list[dict], list[dict]]:
    """(top ``top`` by self time, top ``top`` by self memory allocated), ties broken by name: deterministic order."""
    t_key, m_key = sort_keys(cuda)
    by_time = sorted((r for r in rows if r[t_key] > 0), key=lambda r: (-r[t_key], r["op"]))[:top]
    by_mem = sorted((r for r in rows if r[m_key] > 0), key=lambda r: (-r[m_key], r["op"]))[:top]
    return by_time, by_mem


# --------------------------------------------------------------------------- ops.md

def _ms(v: float) -> str:
    return f"{v:,.3f}"


def markdown(title: str, by_time: list[dict], by_mem: list[dict], cuda: bool, *, warmup: int, repeats: int,
             summary_lines: list[str]) -> str:
    """``ops.md``: what was profiled, the memory timeline's summary, then the two tables."""
    import pandas as pd

    from ..summary import md_table
    from ..units import fmt_bytes

    dev = "CUDA" if cuda else "CPU"
    d = dev.lower()
    time_cols = {"op": "op", "calls": "calls", f"self_{d}_ms": f"self {dev} ms", f"self_{d}_pct": "% self",
                 f"{d}_total_ms": f"{dev} total ms", f"self_{d}_bytes": f"self {dev} memory"}
    mem_cols = {"op": "op", "calls": "calls", f"self_{d}_bytes": f"self {dev} memory",
                f"{d}_total_bytes": f"{dev} total memory", f"self_{d}_ms": f"self {dev} ms"}

    def table(rows: list[dict], cols: dict[str, str]) -> str:
        df = pd.DataFrame([{label: _cell(key, r[key]) for key, label in cols.items()} for r in rows],
                          columns=list(cols.values()))
        return md_table(df)

    def _cell(key: str, v: Any) -> str:
        if key.endswith("_bytes"):
            return fmt_bytes(v)
        if key.endswith("_ms"):
            return _ms(v)
        if key.endswith("_pct"):
            return f"{v:.1f}"
        return str(v)

    lines = [f"# Profile: {title}", "",
             (f"torch.profiler over {repeats} warm call{'s' if repeats != 1 else ''} (after {warmup} untimed); "
              f"times and memory are per call, from `key_averages()`; the trace is `trace.json` "
              f"(open it in Perfetto or chrome://tracing)."), ""]
    lines += summary_lines + [""]
    lines += [f"## Top ops by self {dev} time", "", table(by_time, time_cols),
              f"## Top ops by memory allocated (self {dev} memory)", "", table(by_mem, mem_cols)]
    return "\n".join(lines)

