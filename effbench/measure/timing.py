"""Wall time: warm up, then repeat; median and IQR over the repeats, never a single number.

The statistics come from torch.utils.benchmark's ``Measurement`` (it keeps the raw
samples and derives median and IQR). On the CPU a fixed number of repeats is one
``time.perf_counter`` interval per call (the clock ``torch.utils.benchmark.Timer`` uses on
the CPU); not ``Timer.timeit(number=1)`` per sample, because each ``timeit`` call first runs
``max(number // 100, 2)`` hidden warm-up calls, which would triple the cost of a slow case
against its timeout. A minimum run time (``--min-time``) uses ``Timer.blocked_autorange``.
On CUDA each sample is bracketed by
CUDA events: ``start.record(); fn(); end.record(); end.synchronize();
start.elapsed_time(end)``, as the CUDA semantics notes describe, so asynchronous
launches are timed to completion. Before each CUDA sample the L2 cache is flushed by zeroing a buffer
larger than L2 (twice the device's ``L2_cache_size``, at least 256 MiB), outside the events, as
``triton.testing.do_bench`` does: a call is then timed with its inputs in device memory, not left in
L2 by the previous call. ``flush_l2=False`` (``--no-flush-l2``) keeps L2 warm; the timer label says which.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import benchmark
from torch.utils.benchmark.utils.common import Measurement, TaskSpec


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    repeats: int
    samples_ms: list[float]
    timer: str


def _from_measurement(m: Measurement, timer: str) -> Timing:
    samples = [t * 1e3 for t in m.times]
    return Timing(median_ms=m.median * 1e3, iqr_ms=m.iqr * 1e3, repeats=len(samples), samples_ms=samples, timer=timer)


def _from_samples(times_s: list[float], label: str, timer: str) -> Timing:
    """One call per sample (seconds) -> Timing, the statistics from torch.utils.benchmark's Measurement."""
    m = Measurement(number_per_run=1, raw_times=times_s, task_spec=TaskSpec(stmt="fn()", setup="", label=label))
    return _from_measurement(m, timer)


def time_cpu(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, min_time: float | None = None,
             label: str = "attention") -> Timing:
    """Median/IQR of ``fn`` on the CPU: exactly ``warmup`` + ``repeats`` calls (or blocked_autorange for ``min_time``)."""
    for _ in range(warmup):
        fn()
    if min_time is not None:
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label, num_threads=torch.get_num_threads())
        m = timer.blocked_autorange(min_run_time=min_time)
        return _from_measurement(m, "torch.utils.benchmark.blocked_autorange")
    times_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times_s.append(max(time.perf_counter() - start, 1e-9))
    return _from_samples(times_s, label, "perf_counter")


L2_FLUSH_MIN_BYTES = 256 << 20  # triton.testing.do_bench's cache buffer


def l2_flush_bytes(device: Any = None, cuda: Any = None) -> int:
    """Bytes of a buffer that evicts the whole L2: twice ``get_device_properties(device).L2_cache_size``, at least
    256 MiB (when the property is missing or 0)."""
    cuda = torch.cuda if cuda is None else cuda
    l2 = int(getattr(cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
    return max(L2_FLUSH_MIN_BYTES, 2 * l2)


def l2_flush(device: Any = None, cuda: Any = None) -> Callable[[], Any]:
    """A call that overwrites all of L2: ``zero_`` of an int32 buffer of :func:`l2_flush_bytes` on ``device``."""
    buffer = torch.empty(l2_flush_bytes(device, cuda) // 4, dtype=torch.int32, device=device)
    return buffer.zero_


def time_cuda(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, min_time: float | None = None,
              device: Any = None, cuda: Any = None, label: str = "attention", flush_l2: bool = True,
              flush: Callable[[], Any] | None = None) -> Timing:
    """Median/IQR of ``fn`` on a GPU with CUDA events (``cuda`` defaults to ``torch.cuda``; tests pass a fake).

    With ``flush_l2`` each sample is preceded by ``flush`` (default :func:`l2_flush` on ``device``), issued before
    the start event so its time is not measured; the label is then ``cuda-events+l2-flush``, else
    ``cuda-events+l2-warm``."""
    cuda = torch.cuda if cuda is None else cuda
    if flush_l2 and flush is None:
        flush = l2_flush(device, cuda)
    for _ in range(warmup):
        fn()
    cuda.synchronize(device)
    times_s: list[float] = []
    spent = 0.0
    while len(times_s) < repeats or (min_time is not None and spent < min_time):
        if flush_l2:
            flush()  # on the stream before the start event: evicts L2, outside the timed interval
        start = cuda.Event(enable_timing=True)
        end = cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        elapsed = max(start.elapsed_time(end) / 1e3, 1e-9)  # ms -> s; > 0, as torch's Timer (median 0 divides by 0)
        times_s.append(elapsed)
        spent += elapsed
    return _from_samples(times_s, label, "cuda-events+l2-flush" if flush_l2 else "cuda-events+l2-warm")
