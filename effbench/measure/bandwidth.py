"""The device's copy bandwidth, measured once before a decode sweep and recorded in the sidecar.

Decode reads its whole cache or state for one token, so it is bound by memory bandwidth: a decode row's
``read_gbps`` (bytes a step reads over its time) is read against this number. One large tensor copy
(``dst.copy_(src)`` of 256 MiB, well past every cache), warmed once, then timed ``repeats`` times — with
``time.perf_counter`` on the CPU, with CUDA events on a GPU (``start.record(); copy; end.record();
end.synchronize()``, as the CUDA semantics notes describe). ``copy_gbps`` is the memory traffic per second,
bytes read plus bytes written (2·nbytes per copy, the STREAM convention), in 10⁹ B/s, at the median time: a step
that only reads streams at most about that fast, so ``read_bytes / copy_gbps`` is the floor of its time.
It runs in a child of the fork server, so the sweep's own process never creates a CUDA context.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

COPY_BYTES = 256 * 2**20


def time_copies(copy: Callable[[], Any], repeats: int, cuda: Any = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``copy``: CUDA events when ``cuda`` (torch.cuda or a fake) is given,
    else ``time.perf_counter``."""
    times = []
    for _ in range(repeats):
        if cuda is not None:
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            start.record()
            copy()
            end.record()
            end.synchronize()
            times.append(max(start.elapsed_time(end) / 1e3, 1e-9))  # elapsed_time is in ms
        else:
            t0 = time.perf_counter()
            copy()
            times.append(max(time.perf_counter() - t0, 1e-9))
    return times


def bandwidth_fields(nbytes: int, times_s: list[float], device: str, timer: str) -> dict[str, Any]:
    """The sidecar's fields: the copy's memory traffic (read + written) per second at its median time, and how."""
    median = statistics.median(times_s)
    return {"copy_gbps": round(2 * nbytes / median / 1e9, 3), "copy_bytes": nbytes, "copy_repeats": len(times_s),
            "copy_device": device, "copy_timer": timer,
            "copy_method": (f"dst.copy_(src) of {nbytes // 2**20} MiB, median of {len(times_s)}; "
                            "GB/s of bytes read + written (STREAM copy convention)")}


def copy_bandwidth(device: str = "cpu", nbytes: int = COPY_BYTES, repeats: int = 5) -> dict[str, Any]:
    """Median read bandwidth of one ``nbytes`` tensor copy on ``device``."""
    dev = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()  # (nbytes/4,)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm: pages faulted in, kernels loaded
    on_cuda = dev.type == "cuda"
    times = time_copies(lambda: dst.copy_(src), repeats, torch.cuda if on_cuda else None)
    return bandwidth_fields(nbytes, times, str(dev), "cuda-events" if on_cuda else "perf_counter")


class _Record:
    """What :func:`effbench.runner.run_in_child` fills: the child's fields and a status."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.status = None
        self.error = None
        self.wall_s = None

    def update(self, values: dict[str, Any] | None = None, /, **more: Any) -> None:
        given = {**(values or {}), **more}
        self.status = given.pop("status", self.status)
        self.error = given.pop("error", self.error)
        self.fields.update(given)


def _child(conn, device: str, threads: int | None) -> None:
    conn.send(("started", None))
    try:
        if threads:
            torch.set_num_threads(threads)
        conn.send(("part", {**copy_bandwidth(device), "status": "ok"}))
    except Exception as exc:  # recorded, never fatal: a sweep runs without this number
        from ..errors import one_line
        conn.send(("part", {"status": "error", "error": one_line(exc)}))
    finally:
        conn.send(("done", None))
        conn.close()


def measure_in_child(device: str, threads: int | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """:func:`copy_bandwidth` in a fresh child; on failure ``{"copy_error": ...}``."""
    from ..runner import run_in_child

    record = run_in_child(_child, (device, threads), timeout, _Record())
    if record.status == "ok":
        return record.fields
    return {"copy_error": str(record.error or record.status)}
