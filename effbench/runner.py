"""Run one case in an isolated child process and turn whatever happens into a :class:`CaseResult`.

Everything that executes a mechanism's code — the support check, the build, the
memory prediction, timing, the memory passes and FLOP counting — runs in a child
started from a fork server (torch imported once, forked clean for each case). The
child reports each stage's readings (result columns only) as it finishes them, so a
case that later times out, runs out of memory or is killed still keeps what it measured.
The parent only waits, with a timeout, and classifies (a :class:`Status`):

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
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from . import decoding, plugins, workers, workload
from .cases import Case
from .devices import is_cuda
from .errors import one_line
from .measure import flops as flop_counter
from .measure import memory, timing
from .results import CaseResult, check_result_fields
from .status import Status

Report = Callable[[dict[str, Any]], None]  # the child's way to send fields to the parent as it measures them

STARTUP_LIMIT_S = 120.0


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
    flush_l2: bool = True  # CUDA: write a buffer larger than L2 before each timed sample (do_bench's convention)


# ------------------------------------------------------------------------ child side

@dataclass
class Prediction:
    """A case's fake-tensor prediction. ``input_bytes`` (inputs and parameters, for the budget check) and ``flops``
    ((count, uncounted ops), reused as the real count) stay inside the child; only the result columns are reported."""

    predicted_bytes: int | None = None
    param_bytes: int | None = None
    input_bytes: int = 0
    flops: tuple[int, list[str]] | None = None
    error: str | None = None  # why there is no prediction (the case is then measured for real)
    state_bytes: int | None = None  # decode: the state after the context, on fake tensors
    ops: int | None = None  # aten ops the tracked fake call dispatched (what the real call dispatches)


def _tracked_and_counted(call: Callable[[], Any], backward: bool) -> tuple[memory.StorageTracker,
                                                                          tuple[int, list[str]] | None]:
    """The tracked fake call and its FLOPs (None if counting fails: FLOPs are then counted for real later).

    Forward only, one call under both the tracker and FlopCounterMode (at N = 1M a prediction's time is its op
    count). With a backward they are two calls: FlopCounterMode's module tracker hooks the autograd graph, which
    keeps saved tensors alive longer and would change the tracked peak."""
    if not backward:
        try:
            with flop_counter.counting() as found:
                tracker, _ = memory.track(call)
            return tracker, (found.total, found.missing)
        except Exception:
            return memory.track(call)[0], None
    tracker, _ = memory.track(call)
    try:
        return tracker, flop_counter.count_flops(call)
    except Exception:
        return tracker, None


def _module_state(module: torch.nn.Module) -> tuple:
    """What a module that builds state on its first call changes: over the module tree, each attribute's name,
    the object bound to it and, for a dict, list or set, its length (a cache that gained an entry)."""
    return tuple((id(m), name, id(value), len(value) if isinstance(value, (dict, list, set)) else -1)
                 for m in module.modules() for name, value in vars(m).items())


def predict(case: Case) -> Prediction:
    """Predicted peak bytes (and FLOPs) of one call, on fake tensors: nothing of size N is allocated.

    The module is built for real (its parameters are small), the inputs are fake
    tensors; the storage tracker and FlopCounterMode both work on fake tensors, so the
    prediction reads the same quantities as the real passes, which measure a warm call. A forward call that
    leaves nothing behind (no tensor it made outlives it, the module is unchanged) is its own warm call, so the
    first call is tracked, and tracked again only when it did leave something: at N = 1M a call on fake tensors
    takes seconds (~10⁴ ops), and a second one is as long. With a backward, an untracked warm call comes first.
    """
    module, _ = workload.build_module(case)
    params = workload.param_bytes(module)
    # FakeTensorMode's dispatch cache (on by default) answers an op it has seen with the same metadata without
    # running its meta kernel again: a blocked kernel repeats the same few ops on same-shaped blocks, so at N = 1M
    # it halves a prediction. The tracker sees the same storages either way (test_runner checks a prediction with
    # and without it, twice in one process, on many blocks).
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        twins = memory.hold_fake_twins(module, mode)  # noqa: F841 - held: each real buffer converted once
        inputs, call = workload.make_call(case, module)
        input_bytes = int(sum(t.untyped_storage().nbytes() for t in inputs)) + params
        backward = case.mode == "fwd+bwd"
        if backward:
            call()  # warm: a backward leaves gradients behind, so its first call always holds something after it
        before = _module_state(module)
        tracker, counted = _tracked_and_counted(call, backward)
        if not backward and (tracker.current or _module_state(module) != before):
            # The call left something behind (a tensor it made outlived it, or the module changed): it built state
            # lazily, so it was the warm-up; the real passes measure a warm call, and so does the next one.
            tracker, counted = _tracked_and_counted(call, backward)
    return Prediction(predicted_bytes=int(tracker.peak), param_bytes=params, input_bytes=input_bytes, flops=counted,
                      ops=tracker.dispatched)


def predict_decode(case: Case) -> Prediction:
    """A decode case on fake tensors: the state ``decode_init`` holds after the context (``state_bytes``) and the
    peak of one warm step on top of it (``predicted_bytes``); nothing of size N is allocated. The state counts
    with the inputs for the budget: it is held for the whole case."""
    module, _ = decoding.build_decode_module(case)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        twins = memory.hold_fake_twins(module, mode)  # noqa: F841 - as in predict()
        w = decoding.decode_workload(case, module)
        held, _ = w.fill()
        w.step()  # warm
        tracker, counted = _tracked_and_counted(w.step, backward=False)  # decode is inference
    return Prediction(predicted_bytes=int(tracker.peak), param_bytes=w.param_bytes, input_bytes=w.input_bytes() + held,
                      flops=counted, state_bytes=held, ops=tracker.dispatched)


class _Readings:
    """Which readings the row has (``predicted+time+tracker+...``), reported again as each one is taken."""

    def __init__(self, report: Report):
        self.report = report
        self.names: list[str] = []

    def took(self, *names: str) -> None:
        self.names.extend(names)
        self.report({"readings": "+".join(self.names)})


def _measure(case: Case, opts: RunOptions, report: Report) -> None:
    """The child's stages, in order; each reports its fields as it finishes (a later failure keeps them)."""
    plugins.load_plugins(opts.plugins)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    spec = case.spec()
    if not _supported(spec, case, report):
        return
    if is_cuda(case.device) and torch.device(case.device).index is not None:
        # CUDA events record on the current device's stream and empty_cache acts on the current device:
        # make the case's device current (this child runs nothing else).
        torch.cuda.set_device(torch.device(case.device))
    readings = _Readings(report)
    if case.phase == "decode":
        _measure_decode(spec, case, opts, report, readings)
        return
    done, fake_flops = _prediction_gate(spec, case, opts, report, readings, predict)
    if done:
        return
    w = workload.prepare(case)
    _report_build(w, report)
    if opts.time:
        t = _time_stage(case, w.call, opts.warmup, opts.repeats, opts.min_time, opts.flush_l2)
        report({"time_ms_median": t.median_ms, "time_ms_iqr": t.iqr_ms, "repeats": t.repeats, "timer": t.timer})
        readings.took("time")
    elif opts.memory:
        w.call()  # warm: lazily built state is not part of the peak
    if opts.memory:
        _memory_stage(case, w.call, report, readings)
    if opts.measure_flops:
        _flops_stage(spec, case, w.call, fake_flops, report, readings)
    report({"status": Status.OK})


def _measure_decode(spec, case: Case, opts: RunOptions, report: Report, readings: _Readings) -> None:
    """A decode case's stages: predict, build, fill the state from the context (untimed, outside every peak, its
    bytes tracked), one warm-up step, one tracked step (and its RSS or CUDA-allocator pass), ``decode_steps`` timed
    single-token steps, and the FLOPs of one step (counted on fake tensors by the prediction, else of the next
    step). Each step consumes a token; the case has room for all of them (``Case.capacity``)."""
    done, fake_flops = _prediction_gate(spec, case, opts, report, readings, predict_decode)
    if done:
        return
    w = decoding.prepare_decode(case)
    _report_build(w, report)
    held, _ = w.fill()
    fields = decoding.analytic_fields(case, held)
    report({"state_bytes": held, **fields})
    readings.took("state")
    w.step()  # warm: the first step after the context, untimed and untracked
    if opts.memory:  # the step right after the warm one, as the prediction tracks it: a step's peak grows with its position
        _memory_stage(case, w.step, report, readings)
    if opts.time:
        t = _time_stage(case, w.step, 0, case.decode_steps, None, opts.flush_l2)
        report({"time_ms_per_token": t.median_ms, "time_ms_iqr": t.iqr_ms, "repeats": t.repeats, "timer": t.timer,
                "read_gbps": decoding.read_gbps(fields["read_bytes"], t.median_ms)})
        readings.took("time")
    if opts.measure_flops:
        _flops_stage(spec, case, w.step, fake_flops, report, readings)
    report({"status": Status.OK})


def _supported(spec, case: Case, report: Report) -> bool:
    """The mechanism's own check; a case it cannot run ends here as ``skipped``, its reasons in ``error``."""
    reasons = spec.unsupported(case)
    if reasons:
        report({"status": Status.SKIPPED, "error": "; ".join(reasons)})
    return not reasons


def _prediction_gate(spec, case: Case, opts: RunOptions, report: Report, readings: _Readings,
                     how: Callable[[Case], Prediction]) -> tuple[bool, tuple[int, list[str]] | None]:
    """The prediction stage (``how``: :func:`predict` or :func:`predict_decode`) and what it decides: (the case
    ends here — prediction only, or over the budget —, the FLOPs counted on fake tensors)."""
    if not (opts.predict or opts.predict_only):
        return False, None
    pred = _predict_stage(case, report, readings, how)
    if pred.state_bytes is not None:
        report({"predicted_state_bytes": pred.state_bytes})
    if opts.predict_only:
        if case.phase == "decode":
            report(decoding.analytic_fields(case, pred.state_bytes))
        _report_prediction(spec, case, pred, report)
        return True, None
    over = _over_budget(pred, opts.mem_budget)
    if over:
        report({"status": Status.PREDICTED_OOM, "error": over})
        return True, None
    return False, pred.flops


def _predict_stage(case: Case, report: Report, readings: _Readings,
                   how: Callable[[Case], Prediction]) -> Prediction:
    """Predict on fake tensors and report it; a mechanism whose ops have no fake/meta kernel is measured for real."""
    try:
        pred = how(case)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        pred = Prediction(error=one_line(exc))
    report({k: v for k, v in (("predicted_bytes", pred.predicted_bytes), ("param_bytes", pred.param_bytes))
            if v is not None})
    if pred.predicted_bytes is not None:
        readings.took("predicted")
    return pred


def _report_prediction(spec, case: Case, pred: Prediction, report: Report) -> None:
    """The end of a prediction-only case (``effbench estimate``): its status and the FLOPs counted on fake tensors."""
    report({"status": Status.OK if pred.predicted_bytes is not None else Status.ERROR, "error": pred.error,
            "ops": pred.ops})
    if pred.flops is not None:
        report(_flops_fields(spec, case, *pred.flops))


def _over_budget(pred: Prediction, budget: int | None) -> str | None:
    """Why the predicted call plus its inputs and parameters do not fit ``budget``; None when they do (or unknown)."""
    need = pred.predicted_bytes
    if need is None or budget is None or need + pred.input_bytes <= budget:
        return None
    return (f"predicted {need + pred.input_bytes} bytes (call {need} + inputs/params {pred.input_bytes}) "
            f"> budget {budget}")


def _report_build(w: workload.Workload | decoding.DecodeWorkload, report: Report) -> None:
    report({"build_ms": round(w.build_ms, 3), "param_bytes": w.param_bytes,
            "build_info": "; ".join(f"{k}={v}" for k, v in w.info.items()) or None})


def _time_stage(case: Case, call: Callable[[], Any], warmup: int, repeats: int,
                min_time: float | None, flush_l2: bool = True) -> timing.Timing:
    """Median/IQR of ``call``: CUDA events on a GPU (L2 flushed before each sample unless ``flush_l2`` is off),
    perf_counter on the CPU."""
    if is_cuda(case.device):
        return timing.time_cuda(call, warmup=warmup, repeats=repeats, min_time=min_time,
                                device=torch.device(case.device), flush_l2=flush_l2)
    return timing.time_cpu(call, warmup=warmup, repeats=repeats, min_time=min_time)


def _memory_stage(case: Case, call: Callable[[], Any], report: Report, readings: _Readings) -> None:
    """The tracker pass (peak tensor bytes and the ops dispatched), then the CUDA allocator + NVML pass on a GPU, or
    the RSS pass on the CPU."""
    tracker, _ = memory.track(call)
    report({"peak_tensor_bytes": int(tracker.peak), "ops": tracker.dispatched})
    readings.took("tracker")
    if is_cuda(case.device):
        _cuda_memory_stage(torch.device(case.device), call, report, readings)
    else:
        rss, _ = memory.rss_pass(call)
        report({"rss_peak_bytes": rss})
        if rss is not None:
            readings.took("rss")


def _cuda_memory_stage(dev: torch.device, call: Callable[[], Any], report: Report, readings: _Readings) -> None:
    nvml = memory.load_nvml()
    sampler = (memory.NvmlSampler(nvml, index=torch.cuda.current_device() if dev.index is None else dev.index,
                                  uuid=memory.cuda_uuid(dev)) if nvml is not None else None)
    try:
        reading, _ = memory.cuda_pass(call, dev, sampler=sampler)  # the sampler starts after empty_cache
    finally:
        if nvml is not None:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()
    # an NVML failure mid-pass leaves a partial reading: it is not reported as a peak
    nvml_ok = sampler is not None and sampler.peak_bytes is not None and sampler.error is None
    report({"peak_alloc_bytes": reading.peak_alloc_bytes, "peak_reserved_bytes": reading.peak_reserved_bytes,
            "nvml_peak_bytes": sampler.peak_bytes if nvml_ok else None,
            "nvml_process_peak_bytes": sampler.process_peak if nvml_ok else None})
    readings.took("cuda-allocator", *(["nvml"] if nvml_ok else []))


def _flops_stage(spec, case: Case, call: Callable[[], Any], fake_flops: tuple[int, list[str]] | None, report: Report,
                 readings: _Readings) -> None:
    # FlopCounterMode counts from shapes, so the count made on fake tensors is the count; else count for real.
    flops, missing = fake_flops if fake_flops is not None else flop_counter.count_flops(call)
    report(_flops_fields(spec, case, flops, missing))
    readings.took("flops")


def _flops_fields(spec, case: Case, flops: int, missing: list[str]) -> dict[str, Any]:
    if not missing:
        return {"flops": flops, "flops_source": "FlopCounterMode"}
    if case.phase == "decode":  # the declared analytic count is a prefill's
        return {"flops": flops, "flops_source": f"FlopCounterMode (partial: uncounted {', '.join(missing)})"}
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


def _run_stages(case: Case, opts: RunOptions, report: Report) -> None:
    """:func:`_measure`, with any exception it raises reported as the case's status and one-line error."""
    try:
        _measure(case, opts, report)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        report({"status": Status.OOM, "error": one_line(exc)})
    except Exception as exc:
        report({"status": Status.OOM if is_cpu_alloc_failure(exc) else Status.ERROR, "error": one_line(exc)})


def _child(conn, case: Case, opts: RunOptions) -> None:
    def report(fields: dict[str, Any]) -> None:
        check_result_fields(fields)  # an unknown field fails the case here, by name, rather than vanishing later
        conn.send(("part", fields))

    conn.send(("started", None))
    try:
        _run_stages(case, opts, report)
    finally:
        conn.send(("done", None))
        conn.close()


def measure_in_process(case: Case, opts: RunOptions) -> CaseResult:
    """The child's stages run in this process, exceptions classified as in the child: no isolation, no timeout
    (a case that hangs or is killed takes the caller with it). For tests and debugging; sweeps use :func:`run_case`."""
    result = CaseResult()
    _run_stages(case, opts, result.update)  # every stage path ends with a status
    return result


# ----------------------------------------------------------------------- parent side

def run_in_child(target, args: tuple, timeout: float, record):
    """Run ``target(conn, *args)`` in a child of the fork server and collect what it reports into ``record``
    (anything with ``update`` and ``status``): a timeout kills the child, a child that dies says how; the
    record's ``wall_s`` is set. Shared by sweeps (``run_case``) and ``effbench profile``."""
    ctx = workers.context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    try:
        outcome, started = _collect(parent, proc, timeout, record)
        if outcome == "timeout":
            proc.kill()
            proc.join(5)
            record.update(status=Status.TIMEOUT, error=f"no result after the {timeout:g} s timeout; child killed")
        else:
            proc.join(5)
            if outcome != "done" or record.status is None:
                record.update(_exit_fields(proc.exitcode))
    finally:
        parent.close()
    record.wall_s = round(time.monotonic() - started, 3)
    return record


def run_case(case: Case, opts: RunOptions) -> CaseResult:
    """Run ``case`` in a child process; always returns a result with a ``status``."""
    return run_in_child(_child, (case, opts), opts.timeout, CaseResult())


def _collect(parent, proc, timeout: float, result) -> tuple[str, float]:
    """Read the child's reports into ``result`` until it is ``done``, hits the ``timeout`` or is ``gone``;
    returns that outcome and when the child started.

    The clock starts when the child says it is running, so the fork server's one-time start-up (importing
    torch) is never charged to a case; start-up itself is capped at ``STARTUP_LIMIT_S``."""
    started = time.monotonic()
    limit = max(STARTUP_LIMIT_S, timeout)
    while True:
        left = limit - (time.monotonic() - started)
        if left <= 0:
            return "timeout", started
        try:
            if not parent.poll(min(left, 0.25)):
                if not proc.is_alive() and not parent.poll(0):
                    return "gone", started  # died without saying more
                continue
            kind, fields = parent.recv()
        except (EOFError, OSError):
            return "gone", started
        if kind == "started":
            started, limit = time.monotonic(), timeout
        elif kind == "done":
            return "done", started
        else:
            result.update(fields)


def _exit_fields(code: int | None) -> dict[str, Any]:
    """Status and error of a child that ended without a status: killed by a signal, or exited."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        oom_hint = " (the OS OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return {"status": Status.KILLED, "error": f"child killed by {name}{oom_hint}"}
    return {"status": Status.ERROR, "error": f"child exited with code {code} without a result"}
