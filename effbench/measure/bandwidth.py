"""The device's copy bandwidth, measured once before a decode sweep and recorded in the sidecar.

Decode reads its whole cache or state for one token, so it is bound by memory bandwidth: a decode row's
``read_gbps`` (bytes a step reads over its time) is read against this number. One large tensor copy
(``dst.copy_(src)`` of 256 MiB, well past every cache), warmed once, then timed ``repeats`` times by
:mod:`.timing`, as a sweep times a call — ``time.perf_counter`` on the CPU, CUDA events on a GPU. ``copy_gbps`` is the memory traffic per second,
bytes read plus bytes written (2·nbytes per copy, the STREAM convention), in 10⁹ B/s, at the median time: a step
that only reads streams at most about that fast, so ``read_bytes / copy_gbps`` is the floor of its time.
It runs in a child of the fork server, so the sweep's own process never creates a CUDA context.
"""

from __future__ import annotations

from typing import Any

import torch

from . import timing

COPY_BYTES = 256 * 2**20


def bandwidth_fields(nbytes: int, t: timing.Timing, device: str) -> dict[str, Any]:
    """The sidecar's fields: the copy's memory traffic (read + written) per second at its median time, and how."""
    return {"copy_gbps": round(2 * nbytes / (t.median_ms * 1e-3) / 1e9, 3), "copy_bytes": nbytes,
            "copy_repeats": t.repeats, "copy_device": device, "copy_timer": t.timer,
            "copy_method": (f"dst.copy_(src) of {nbytes // 2**20} MiB, median of {t.repeats}; "
                            "GB/s of bytes read + written (STREAM copy convention)")}


def copy_bandwidth(device: str = "cpu", nbytes: int = COPY_BYTES, repeats: int = 5) -> dict[str, Any]:
    """Memory traffic of one ``nbytes`` tensor copy on ``device``, at the median of ``repeats`` copies after one
    warm-up copy (pages faulted in, kernels loaded), timed as the sweep times a call (:mod:`.timing`)."""
    dev = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()  # (nbytes/4,)
    dst = torch.empty_like(src)
    if dev.type == "cuda":
        t = timing.time_cuda(lambda: dst.copy_(src), warmup=1, repeats=repeats, device=dev,
                              flush_l2=False)  # 2 × 256 MiB already far exceed any L2
    else:
        t = timing.time_cpu(lambda: dst.copy_(src), warmup=1, repeats=repeats)
    return bandwidth_fields(nbytes, t, str(dev))


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
