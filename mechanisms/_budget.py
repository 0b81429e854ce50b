"""One byte budget for the live temporaries of a blocked kernel, so that blocks are sized by bytes, not rows.

A kernel that goes over the sequence in row blocks (features of a block, chunk scores, band scores, hash
rotations) keeps at most :func:`temp_budget` bytes of such temporaries alive at once. The number of rows per block
is the budget divided by what one row costs (:func:`rows_within`), so the number of dispatched ops per call is a
constant plus N / rows, with rows in the thousands at the default sizes, and peak memory is the inputs and output
(linear in N) plus at most the budget.

Why bytes and why these sizes: every op is a kernel launch on a GPU (several µs each), so a GPU wants few, large
blocks; its memory is large and fast, so 1 GiB of temporaries costs little. On a CPU a block's temporaries should
stay near the last-level cache and far below RAM, and Python's per-op overhead is smaller than a launch, so 64 MiB;
a *streaming* pass (kernel features: a small product then a few elementwise passes over each row's features, the
bidirectional passes of linear, performer and cosformer) is bound by memory traffic, and runs a third faster from
16 MiB blocks than from 64 MiB ones (measured side by side, ``benchmarks/bench_kernel.py``), so 16 MiB for those.
Score kernels (bands, LSH windows) do more arithmetic per byte and gain little from smaller blocks, which would only
multiply the ops an ``effbench estimate`` runs on fake tensors (~0.2 ms each).
Fake tensors carry their device, so a prediction uses the budget of the device it predicts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

MiB = 1 << 20
CPU_TEMP_BYTES = 64 * MiB
CPU_STREAM_TEMP_BYTES = 16 * MiB  # streaming passes on the CPU (see the module docstring)
CUDA_TEMP_BYTES = 1024 * MiB


_SIZED_FOR: str | None = None  # set by sized_for(): blocks sized as on that device type, whatever the tensors'


def temp_budget(device: torch.device | str, *, streaming: bool = False) -> int:
    """Bytes of live temporaries a blocked kernel may hold on ``device``: 1 GiB on CUDA, 64 MiB elsewhere (16 MiB for
    a ``streaming`` pass, memory-bound on a CPU; the same 1 GiB on CUDA)."""
    kind = _SIZED_FOR or torch.device(device).type
    if kind == "cuda":
        return CUDA_TEMP_BYTES
    return CPU_STREAM_TEMP_BYTES if streaming else CPU_TEMP_BYTES


@contextlib.contextmanager
def sized_for(device_type: str) -> Iterator[None]:
    """Inside, blocks are sized with ``device_type``'s budget whatever device the tensors are on: how the ops a GPU
    call dispatches are counted on a machine without one (fake CPU tensors, the CUDA blocking)."""
    global _SIZED_FOR
    before, _SIZED_FOR = _SIZED_FOR, device_type
    try:
        yield
    finally:
        _SIZED_FOR = before


def rows_within(budget: int, row_bytes: int, n: int, multiple: int = 1) -> int:
    """Rows per block so that ``rows · row_bytes ≤ budget``: a multiple of ``multiple`` (at least one multiple),
    and no more than ``n`` rounded up to that multiple."""
    rows = max(1, budget // max(1, row_bytes))
    rows = max(multiple, (rows // multiple) * multiple)
    return min(rows, multiple * math.ceil(n / multiple))
