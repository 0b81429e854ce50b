"""Run one case in an isolated child process and turn whatever happens into a row.

Everything that executes a mechanism's code — the support check, the build, the
memory prediction, timing, the memory passes and FLOP counting — runs in a child
started from a fork server (torch imported once, forked clean for each case). The
child reports each stage's readings as it finishes them, so a case that later times
out, runs out of memory or is killed still keeps what it measured. The parent only
waits, with a timeout, and classifies:

- ``ok``: every pass finished;
- ``skipped``: ``spec.unsupported(case)`` gave reasons (in ``error``);
- ``predicted_oom``: the fake-tensor prediction did not fit ``mem_budget``;
- ``oom``: ``torch.OutOfMemoryError`` caught by type in the child (CUDA), or the CPU allocator's
  "can't allocate memory" RuntimeError, recognised by its message (the CPU has no OOM exception type);
- ``timeout``: the child ran past ``timeout`` seconds and was killed;
- ``killed``: the child died from a signal (the OS OOM killer sends SIGKILL);
- ``error``: any other exception, as one line ``Type: message``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from .cases import Case

_CTX: Any = None
STARTUP_LIMIT_S = 120.0
# Imported once by the fork server, so each case's child starts with them loaded.
_PRELOAD = ["torch", "torch._subclasses.fake_tensor", "torch.utils.flop_counter", "torch.utils.benchmark",
            "mechanisms", "effbench.runner", "effbench.workload", "effbench.measure.memory",
            "effbench.measure.flops", "effbench.measure.timing", "effbench._forkserver_warm"]


@dataclass(frozen=True)
class RunOptions:
    warmup: int = 1
    repeats: int = 5
    min_time: float | None = None
    timeout: float = 300.0
    mem_budget: int | None = None
    plugins: tuple[str, ...] = ()
    threads: int | None = None
    measure_flops: bool = True
    predict: bool = True
    predict_only: bool = False
    time: bool = True
    memory: bool = True


def _context():
    global _CTX
    if _CTX is None:
        methods = mp.get_all_start_methods()
        if "forkserver" in methods:
            _CTX = mp.get_context("forkserver")
            _CTX.set_forkserver_preload(_PRELOAD)
        else:  # pragma: no cover - macOS/Windows
            _CTX = mp.get_context("spawn")
    return _CTX


# ------------------------------------------------------------------------ child side

def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda:<current>`` or ``cpu``; bare ``cuda`` -> ``cuda:<current>``, so one GPU has one name
    (and one case key) however it was asked for."""
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return device


def predict(case: Case) -> dict[str, Any]:
    """Predicted peak bytes (and FLOPs) of one call, on fake tensors: nothing of size N is allocated.

    The module is built for real (its parameters are small), the inputs are fake
    tensors; the storage tracker and FlopCounterMode both work on fake tensors, so the
    prediction reads the same quantities as the real passes. ``input_bytes`` (inputs
    and parameters) is reported beside it for the budget check.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .measure.flops import count_flops
    from .measure.memory import tracked_peak
    from .workload import build_module, make_call, param_bytes

    out: dict[str, Any] = {}
    module, _ = build_module(case)
    out["param_bytes"] = param_bytes(module)
    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs, call = make_call(case, module)
        peak, _ = tracked_peak(call)
        out["predicted_bytes"] = int(peak)
        out["input_bytes"] = int(sum(t.untyped_storage().nbytes() for t in inputs)) + out["param_bytes"]
        try:
            out["fake_flops"] = count_flops(call)
        except Exception:  # FLOPs are counted for real later
            pass
    return out


def _measure(case: Case, opts: RunOptions, report) -> None:
    import torch

    from .measure.flops import count_flops
    from .measure.memory import NvmlSampler, cuda_pass, cuda_uuid, load_nvml, rss_pass, tracked_peak
    from .measure.timing import time_cpu, time_cuda
    from .plugins import load_plugins
    from .workload import prepare

    load_plugins(opts.plugins)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    spec = case.spec()
    reasons = spec.unsupported(case)
    if reasons:
        report({"status": "skipped", "error": "; ".join(reasons)})
        return
    on_cuda = case.device.startswith("cuda")
    if on_cuda and torch.device(case.device).index is not None:
        # CUDA events record on the current device's stream and empty_cache acts on the current device:
        # make the case's device current (this child runs nothing else).
        torch.cuda.set_device(torch.device(case.device))
    fake_flops = None
    readings: list[str] = []

    def took(*names: str) -> None:  # which readings this row has, said plainly in the row
        readings.extend(names)
        report({"readings": "+".join(readings)})

    if opts.predict or opts.predict_only:
        try:
            pred = predict(case)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # a mechanism whose ops have no fake/meta kernel: measure it for real
            pred = {"predict_error": _one_line(exc)}
        fake_flops = pred.pop("fake_flops", None)
        report({k: v for k, v in pred.items() if k in ("predicted_bytes", "param_bytes")})
        if "predicted_bytes" in pred:
            took("predicted")
        if opts.predict_only:
            report({"status": "ok" if "predicted_bytes" in pred else "error",
                    "error": pred.get("predict_error")})
            if fake_flops is not None:
                report(_flops_fields(spec, case, *fake_flops))
            return
        need = pred.get("predicted_bytes")
        if need is not None and opts.mem_budget is not None and need + pred["input_bytes"] > opts.mem_budget:
            report({"status": "predicted_oom",
                    "error": f"predicted {need + pred['input_bytes']} bytes (call {need} + inputs/params "
                             f"{pred['input_bytes']}) > budget {opts.mem_budget}"})
            return

    w = prepare(case)
    report({"build_ms": round(w.build_ms, 3), "param_bytes": w.param_bytes,
            "build_info": "; ".join(f"{k}={v}" for k, v in w.info.items()) or None})

    if opts.time:
        if on_cuda:
            t = time_cuda(w.call, warmup=opts.warmup, repeats=opts.repeats, min_time=opts.min_time,
                          device=torch.device(case.device))
        else:
            t = time_cpu(w.call, warmup=opts.warmup, repeats=opts.repeats, min_time=opts.min_time)
        report({"time_ms_median": t.median_ms, "time_ms_iqr": t.iqr_ms, "repeats": t.repeats, "timer": t.timer})
        took("time")
    elif opts.memory:
        w.call()  # warm: lazily built state is not part of the peak

    if opts.memory:
        peak, _ = tracked_peak(w.call)
        report({"peak_tensor_bytes": int(peak)})
        took("tracker")
        if on_cuda:
            dev = torch.device(case.device)
            nvml = load_nvml()
            sampler = (NvmlSampler(nvml, index=torch.cuda.current_device() if dev.index is None else dev.index,
                                   uuid=cuda_uuid(dev)) if nvml is not None else None)
            try:
                reading, _ = cuda_pass(w.call, dev, sampler=sampler)  # the sampler starts after empty_cache
            finally:
                if nvml is not None:
                    with contextlib.suppress(Exception):
                        nvml.nvmlShutdown()
            # an NVML failure mid-pass leaves a partial reading: it is not reported as a peak
            nvml_ok = sampler is not None and sampler.peak_bytes is not None and sampler.error is None
            report({"peak_alloc_bytes": reading.peak_alloc_bytes, "peak_reserved_bytes": reading.peak_reserved_bytes,
                    "nvml_peak_bytes": sampler.peak_bytes if nvml_ok else None,
                    "nvml_process_peak_bytes": sampler.process_peak if nvml_ok else None})
            took("cuda-allocator", *(["nvml"] if nvml_ok else []))
        else:
            rss, _ = rss_pass(w.call)
            report({"rss_peak_bytes": rss})
            if rss is not None:
                took("rss")

    if opts.measure_flops:
        # FlopCounterMode counts from shapes, so the count made on fake tensors is the count; else count for real.
        flops, missing = fake_flops if fake_flops is not None else count_flops(w.call)
        report(_flops_fields(spec, case, flops, missing))
        took("flops")
    report({"status": "ok"})


def _flops_fields(spec, case: Case, flops: int, missing: list[str]) -> dict[str, Any]:
    if not missing:
        return {"flops": flops, "flops_source": "FlopCounterMode"}
    analytic = spec.analytic_flops(batch=case.batch, heads=case.heads, n=case.n, head_dim=case.head_dim,
                                   causal=case.causal, **case.knob_dict)
    mult = 3 if case.mode == "fwd+bwd" else 1
    if analytic is not None:
        return {"flops": analytic * mult, "flops_source": "analytic"}
    return {"flops": flops, "flops_source": f"FlopCounterMode (partial: uncounted {', '.join(missing)})"}


# PyTorch's CPU allocator reports ENOMEM as a plain RuntimeError (c10::Error), not torch.OutOfMemoryError:
# "[enforce fail at alloc_cpu.cpp:…] … DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes".
CPU_ALLOC_FAILURE = "DefaultCPUAllocator: can't allocate memory"


def is_cpu_alloc_failure(exc: BaseException) -> bool:
    """True when ``exc`` is the CPU allocator failing to allocate (an out-of-memory, by its own message)."""
    return isinstance(exc, RuntimeError) and CPU_ALLOC_FAILURE in str(exc)


def _child(conn, case: Case, opts: RunOptions) -> None:
    import torch

    def report(fields: dict[str, Any]) -> None:
        conn.send(("part", fields))

    conn.send(("started", None))
    try:
        _measure(case, opts, report)
    except torch.OutOfMemoryError as exc:
        report({"status": "oom", "error": _one_line(exc)})
    except MemoryError as exc:
        report({"status": "oom", "error": _one_line(exc) or "MemoryError"})
    except Exception as exc:
        report({"status": "oom" if is_cpu_alloc_failure(exc) else "error", "error": _one_line(exc)})
    finally:
        conn.send(("done", None))
        conn.close()


# ----------------------------------------------------------------------- parent side

def run_case(case: Case, opts: RunOptions) -> dict[str, Any]:
    """Run ``case`` in a child process; always returns a result dict with a ``status``."""
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, case, opts), daemon=True)
    started = time.monotonic()
    proc.start()
    child.close()
    # The clock starts when the child says it is running, so the fork server's one-time
    # start-up (importing torch) is never charged to a case; start-up itself is capped.
    limit = max(STARTUP_LIMIT_S, opts.timeout)
    result: dict[str, Any] = {}
    finished = timed_out = False
    while not finished:
        left = limit - (time.monotonic() - started)
        if left <= 0:
            timed_out = True
            break
        try:
            if not parent.poll(min(left, 0.25)):
                if not proc.is_alive() and not parent.poll(0):
                    break  # died without saying more
                continue
            kind, fields = parent.recv()
        except (EOFError, OSError):
            break
        if kind == "started":
            started, limit = time.monotonic(), opts.timeout
        elif kind == "done":
            finished = True
        else:
            result.update(fields)
    if timed_out:
        proc.kill()
        proc.join(5)
        result["status"] = "timeout"
        result["error"] = f"no result after the {opts.timeout:g} s timeout; child killed"
    else:
        proc.join(5)
        code = proc.exitcode
        if not finished or result.get("status") is None:
            if code is not None and code < 0:
                try:
                    name = signal.Signals(-code).name
                except ValueError:
                    name = f"signal {-code}"
                result["status"] = "killed"
                result["error"] = f"child killed by {name}" + (" (the OS OOM killer sends SIGKILL)" if -code == signal.SIGKILL else "")
            else:
                result["status"] = "error"
                result["error"] = f"child exited with code {code} without a result"
    parent.close()
    result["wall_s"] = time.monotonic() - started
    return result
