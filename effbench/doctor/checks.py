"""The self-test's checks: closed forms of dense attention, tolerances, verdicts and what to do on a failure.

The self-test runs dense attention (B=1, H=2, D=32, fp32, forward, not causal) at N = 2048 and 4096 through the
sweep's own code, :func:`effbench.runner.run_case` (a child from the fork server, timing off), so it proves the
readings a sweep records, not a copy of them. Dense attention's sizes are known in closed form:

- **tracker**, exactly :func:`dense_peak_bytes`: in ``DenseAttention.forward`` under ``no_grad`` the scaled query
  ``q * scale`` (B·H·N·D) dies once the first matmul returns; then the scores ``s`` (B·H·N²) stay alive while
  ``p = softmax(s)`` (B·H·N²) and the output ``p @ v`` (B·H·N·D) are made, so the peak is B·H·(2N² + N·D) elements
  (the inputs exist before the call and are not counted). **predicted** (FakeTensorMode) must equal it too.
- **flops**, exactly 4·B·H·N²·D (two N×N×D products, 2 FLOPs per multiply-add), from FlopCounterMode.
- **rss** against the tracker: at least 0.9× the tracker and at most the tracker + 64 MiB. RSS counts resident
  pages, not tensor bytes, so it is only comparable where each N×N tensor must be new resident memory; that is why
  the lengths are 2048 and 4096 and not smaller. Each N×N tensor (32 and 128 MiB) is at or above glibc's largest
  mmap threshold (32 MiB on 64-bit), so it is a fresh mapping whose pages RSS counts when they are written; only the
  small B·H·N·D tensors (≤ 2% of the peak) may reuse heap pages that are already resident. Below that size glibc
  raises its mmap threshold after the warm call and serves the N×N tensors from heap pages the previous pass left
  resident: at N = 512 and 1024, RSS read 0.49× the tracker in one process and 0.94–0.99× in another (one N×N tensor
  seen or not, by what the process had allocated before), so a comparison there proves nothing. 0.9× fails when an
  N×N tensor goes unseen (RSS ≈ 0.5×: an allocator that keeps freed pages, such as a preloaded jemalloc). Above, a
  fixed amount that does not grow with N: the intra-op thread pool's stacks, library pages touched for the first time,
  transparent huge pages rounding up: 64 MiB covers them (measured here: +1 MiB).
- **cuda-allocator** (``max_memory_allocated`` minus what was held before) against the tracker: within 10% + 2 MiB
  (block rounding to 512 B and small workspaces the tracker does not see).
- **nvml** against the tracker: within 20% + 64 MiB. NVML sees device memory, i.e. the caching allocator's
  reserved segments (rounded up to 2 or 20 MiB) and anything the driver maps, not the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..cases import DTYPES
from ..results import CaseResult
from ..status import Status
from .probe import Reading

MIB = 2**20
SELF_TEST_SIZES = {"batch": 1, "heads": 2, "head_dim": 32, "dtype": "float32", "mode": "fwd"}
SELF_TEST_NS = (2048, 4096)


class Verdict(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    MISSING = "missing"  # the reading is not there (the reason says why); not a failure

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Tolerance:
    """Accepted readings: ``ref·lo_frac - lo_slack <= measured <= ref·hi_frac + hi_slack``."""

    text: str = "exact"
    lo_frac: float = 1.0
    lo_slack: int = 0
    hi_frac: float = 1.0
    hi_slack: int = 0

    def accepts(self, measured: int, ref: int) -> bool:
        return ref * self.lo_frac - self.lo_slack <= measured <= ref * self.hi_frac + self.hi_slack


EXACT = Tolerance()
TOLERANCES = {
    "rss": Tolerance("≥ 0.9× tracker, ≤ tracker + 64 MiB", 0.9, 0, 1.0, 64 * MIB),
    "cuda-allocator": Tolerance("tracker ± (10% + 2 MiB)", 0.9, 2 * MIB, 1.1, 2 * MIB),
    "nvml": Tolerance("tracker ± (20% + 64 MiB)", 0.8, 64 * MIB, 1.2, 64 * MIB),
}

# One sentence per reading: what to do when its check fails.
FIXES = {
    "tracker": "The storage tracker does not see dense attention's tensors as its closed form says: check that no "
               "other TorchDispatchMode is active and that torch is a supported version (>=2.4), then report this output.",
    "predicted": "FakeTensorMode's prediction differs from the closed form, so `effbench estimate` and --mem-budget "
                 "are unreliable here: sweep with --mem-budget none and report this output with the torch version.",
    "rss": "RSS disagrees with the tracker (an allocator that keeps freed pages, such as a preloaded jemalloc, another "
           "thread allocating, or a kernel that ignores /proc/self/clear_refs): trust peak_tensor_bytes, not rss_peak_bytes, here.",
    "cuda-allocator": "The CUDA allocator's peak disagrees with the tracker: unset PYTORCH_CUDA_ALLOC_CONF and stop "
                      "anything else allocating on this GPU from the same process, then rerun.",
    "nvml": "NVML disagrees with the tracker: check with nvidia-smi that no other process uses this GPU and that "
            "CUDA_VISIBLE_DEVICES names the GPU NVML found by UUID, then rerun.",
    "flops": "FlopCounterMode does not count dense attention's two matmuls as 4·B·H·N²·D in this torch version: "
             "trust only rows whose flops_source is analytic, or install a torch version known to work (2.13.0).",
}
CHECKED = ("tracker", "predicted", "rss", "cuda-allocator", "nvml", "flops")  # in the order they are shown


@dataclass
class Check:
    """One row of the self-test: ``measured`` against ``expected`` (the closed form, or the tracker's reading for
    rss, cuda-allocator and nvml) within ``tolerance``; ``n`` None for a reading this device does not have."""

    name: str  # the reading checked (tracker, rss, cuda-allocator, ...), or "device"/"case"
    n: int | None
    expected: Any
    measured: Any
    tolerance: str
    verdict: Verdict
    unit: str = "bytes"  # bytes | flops | text
    reason: str | None = None  # why a reading is missing
    fix: str | None = None  # for a failure: what to do, one sentence


# --------------------------------------------------------------------- closed forms

def dense_peak_bytes(*, batch: int, heads: int, n: int, head_dim: int, itemsize: int) -> int:
    """Peak tracked bytes of one ``fwd`` call of non-causal dense attention: B·H·(2N² + N·D) elements (see the module doc)."""
    return batch * heads * (2 * n * n + n * head_dim) * itemsize


def dense_flops(*, batch: int, heads: int, n: int, head_dim: int) -> int:
    """FLOPs of one ``fwd`` call of dense attention: Q·Kᵀ and P·V, 2·N²·D each per head."""
    return 4 * batch * heads * n * n * head_dim


# ------------------------------------------------------------------------ self-test

def compare(name: str, n: int, expected: int | None, measured: int | None, tol: Tolerance, unit: str = "bytes",
             why_missing: str | None = None) -> Check:
    if expected is None or measured is None:
        reason = why_missing or ("no tracker reading to compare with" if expected is None
                                 else "the self-test row has no such reading")
        return Check(name, n, expected, measured, tol.text, Verdict.MISSING, unit, reason=reason)
    ok = tol.accepts(measured, expected)
    return Check(name, n, expected, measured, tol.text, Verdict.PASS if ok else Verdict.FAIL, unit,
                 fix=None if ok else FIXES[name])


def row_checks(n: int, row: CaseResult, available: dict[str, Reading], device: str) -> list[Check]:
    """The checks of one self-test row (dense attention at length ``n`` on ``device``), for the readings ``available``."""
    s = SELF_TEST_SIZES
    itemsize = DTYPES[s["dtype"]].itemsize
    closed = dense_peak_bytes(batch=s["batch"], heads=s["heads"], n=n, head_dim=s["head_dim"], itemsize=itemsize)
    checks = []
    if row.status != Status.OK:
        checks.append(Check("case", n, "ok", str(row.status), "—", Verdict.FAIL, "text",
                            fix=f"The self-test case itself ended {row.status} ({row.error}): run "
                                f"`effbench sweep --mech dense --n {n} --heads 2 --head-dim 32 --device {device}` to see it alone."))
    ended = None if row.status == Status.OK else f"the case ended {row.status} before this reading"
    tracker = row.peak_tensor_bytes
    measured = {"tracker": (closed, tracker, EXACT), "predicted": (closed, row.predicted_bytes, EXACT),
                "rss": (tracker, row.rss_peak_bytes, TOLERANCES["rss"]),
                "cuda-allocator": (tracker, row.peak_alloc_bytes, TOLERANCES["cuda-allocator"]),
                "nvml": (tracker, row.nvml_peak_bytes, TOLERANCES["nvml"])}
    for name, (expected, got, tol) in measured.items():
        if available[name].available:
            checks.append(compare(name, n, expected, got, tol, why_missing=ended if got is None else None))
    flops = dense_flops(batch=s["batch"], heads=s["heads"], n=n, head_dim=s["head_dim"])
    check = compare("flops", n, flops, row.flops, EXACT, "flops", why_missing=ended if row.flops is None else None)
    if check.verdict is Verdict.PASS and row.flops_source != "FlopCounterMode":
        check.verdict = Verdict.FAIL
        check.fix = (f"FlopCounterMode did not count the call (flops_source: {row.flops_source}): trust only rows whose "
                     "flops_source is analytic, or install a torch version known to work (2.13.0).")
    checks.append(check)
    return checks
