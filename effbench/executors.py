"""Executors: where a sweep's cases run. The sweep (:mod:`effbench.sweep`) keeps the books — ``--resume``, the OOM
frontier, one fsynced row per case — and an executor runs the cases it is handed and yields ``(case, result)`` as each
one finishes. Every case still runs in its own child process (:func:`effbench.runner.run_case`), so each status means
the same thing whichever executor ran it.

- :class:`LocalExecutor`: one case after another on this machine (the serial runner).
- :class:`RayExecutor`: each case is one Ray task (``max_retries=0``) that runs ``run_case`` on the node Ray picks for
  it, by the CPUs and GPUs a case declares; the driver collects results as they finish (``ray.wait``) and remains the
  only writer of the CSV.

**Lanes.** The sweep hands an executor one lane per configuration (every case field but N); a lane yields its cases in
order of N and consults the OOM frontier as it is pulled. An executor pulls a lane's next case only after it has
yielded the lane's previous one (so the sweep has written its row): one case of a configuration runs at a time, and a
larger N never starts before a smaller one has finished without running out of memory. Different configurations run
side by side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from .cases import Case
from .devices import is_cuda
from .results import CaseResult
from .runner import RunOptions, run_case
from .units import UsageError

Lane = Iterator[Case]  # one configuration's cases, in order of N
Finished = tuple[Case, CaseResult]

RAM_SHARE, GPU_SHARE = 0.8, 0.9  # the default --mem-budget: this share of free RAM, or of the GPU's free memory
# (no square brackets: the CLI prints this as rich markup, where "[ray]" would be taken for a style)
INSTALL_HINT = "--executor ray needs Ray, which is not installed here: pip install 'ray>=2.9' (effbench's optional extra 'ray')"


class ExecutorError(UsageError):
    """An executor that cannot run as asked (no Ray, an unreachable cluster, a case no node can hold): one line, exit 2."""


class Executor(Protocol):
    def describe(self) -> dict[str, Any]:
        """What the sidecar records about this executor."""

    def run(self, lanes: list[Lane], opts: RunOptions) -> Iterator[Finished]:
        """Run the lanes' cases, yielding each with its result as it finishes (see the module docstring)."""


def default_budget(device: str, gpu_free_bytes: int | None) -> int | None:
    """The default ``--mem-budget`` where the case runs: 80% of available RAM, or 90% of the GPU's free memory."""
    if is_cuda(device):
        return int(gpu_free_bytes * GPU_SHARE) if gpu_free_bytes is not None else None
    from .measure.env import mem_available
    avail = mem_available()
    return int(avail * RAM_SHARE) if avail else None


# ------------------------------------------------------------------------ provenance

@dataclass(frozen=True)
class Placement:
    """Where a case ran: the row's provenance columns (``host``, ``device_name``, ``device_uuid``) and, under Ray,
    the worker and node (to name what died) and what Ray gave the task."""

    host: str
    device_name: str | None = None
    device_uuid: str | None = None
    pid: int | None = None
    node_id: str | None = None
    cuda_visible_devices: str | None = None
    gpu_ids: tuple[str, ...] = ()
    cpus: float | None = None
    gpu_free_bytes: int | None = None

    def stamp(self, result: CaseResult) -> CaseResult:
        return dataclasses.replace(result, host=self.host, device_name=self.device_name, device_uuid=self.device_uuid)

    def where(self) -> str:
        """``host H, pid P, node N`` (as far as known), to name what ran, or died running, a case."""
        parts = [f"host {self.host}"]
        if self.pid:
            parts.append(f"pid {self.pid}")
        if self.node_id:
            parts.append(f"node {self.node_id[:12]}")
        return ", ".join(parts)


@functools.cache
def local_placement(device: str) -> Placement:
    """This machine and the device a local case runs on (the CPU model, or the GPU's name and UUID)."""
    from .measure.env import cpu_name

    if not is_cuda(device):
        return Placement(host=socket.gethostname(), device_name=cpu_name())
    import torch

    from .measure.memory import cuda_uuid
    return Placement(host=socket.gethostname(), device_name=torch.cuda.get_device_properties(torch.device(device)).name,
                     device_uuid=cuda_uuid(device))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_gpu(visible: str | None) -> tuple[str | None, str | None, int | None]:
    """Name, UUID and free bytes of the first GPU in ``visible`` (a ``CUDA_VISIBLE_DEVICES`` value: the GPU the case's
    child sees as cuda:0), read through NVML so that this process never holds a CUDA context on the case's GPU. An
    index is in PCI bus order, NVML's, which the child also uses (the task sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID``)."""
    from .measure.memory import load_nvml

    first = (visible or "").split(",")[0].strip()
    nvml = load_nvml() if first else None
    if nvml is None:
        return None, None, None
    try:
        handle = (nvml.nvmlDeviceGetHandleByIndex(int(first)) if first.isdigit()
                  else nvml.nvmlDeviceGetHandleByUUID(first))
        return (_text(nvml.nvmlDeviceGetName(handle)), _text(nvml.nvmlDeviceGetUUID(handle)),
                int(nvml.nvmlDeviceGetMemoryInfo(handle).free))
    except Exception:  # an NVML failure leaves the provenance empty; it never fails the case
        return None, None, None
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def node_placement(device: str) -> Placement:
    """Where this Ray task runs: host, worker pid, node, the GPUs and CPUs Ray gave it and the device's identity."""
    import ray

    from .measure.env import cpu_name

    ctx = ray.get_runtime_context()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    base = {"host": socket.gethostname(), "pid": os.getpid(), "node_id": ctx.get_node_id(),
            "cuda_visible_devices": visible, "gpu_ids": tuple(str(g) for g in ray.get_gpu_ids()),
            "cpus": ctx.get_assigned_resources().get("CPU")}
    if not is_cuda(device):
        return Placement(device_name=cpu_name(), **base)
    name, uuid, free = nvml_gpu(visible)
    return Placement(device_name=name, device_uuid=uuid, gpu_free_bytes=free, **base)


# ------------------------------------------------------------------------ local

@dataclass
class LocalExecutor:
    """The serial runner: lane after lane, each case in a child process on this machine."""

    runner: Callable[[Case, RunOptions], CaseResult] = run_case

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": "local", "host": socket.gethostname()}

    def run(self, lanes: list[Lane], opts: RunOptions) -> Iterator[Finished]:
        for lane in lanes:
            for case in lane:
                yield case, local_placement(case.device).stamp(self.runner(case, opts))


# ------------------------------------------------------------------------ Ray
