"""The Ray executor: each case one Ray task (``max_retries=0``) running the isolated child-process runner on
its node; the driver collects results with ``ray.wait`` and the sweep (the only writer) records them.
Imported only by ``--executor ray`` (Ray is the optional extra ``ray``)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .cases import Case
from .devices import is_cuda
from .errors import one_line
from .results import CaseResult
from .runner import STARTUP_LIMIT_S, RunOptions, run_case
from .status import Status
from .executors import (  # noqa: F401
    INSTALL_HINT, ExecutorError, Finished, Lane, Placement, default_budget, local_placement, node_placement, nvml_gpu,
)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError(INSTALL_HINT) from None
    return ray


def ray_case_task(case: Case, opts: RunOptions, board: Any, node_budget: bool) -> tuple[Placement, CaseResult]:
    """One case as a Ray task, on the node Ray placed it: tell the board where it runs, then :func:`run_case` as locally.

    Threads: ``--threads``, else as many as the CPUs the task holds (a case never spreads beyond its reservation).
    With ``node_budget`` the default memory budget is taken here, from this node's free RAM or this GPU's free memory."""
    import ray

    if is_cuda(case.device):  # before the fork server starts (a GPU task has a fresh worker): the child then numbers
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # GPUs as NVML does, so cuda:0 is the GPU named in the row
    placement = node_placement(case.device)
    with contextlib.suppress(Exception):  # the board only times the case and names its worker: never lose the case to it
        ray.get(board.started.remote(case.key, placement), timeout=30)
    changes: dict[str, Any] = {}
    if opts.threads is None and placement.cpus:
        changes["threads"] = max(1, math.floor(placement.cpus))
    if node_budget:
        changes["mem_budget"] = default_budget(case.device, placement.gpu_free_bytes)
    return placement, run_case(case, dataclasses.replace(opts, **changes))


class StartBoard:
    """A Ray actor that each task tells when and where it starts: the driver times a case from its start, not its
    submission (a case may wait for a free GPU), and can name the worker or node when one dies mid-case."""

    def __init__(self) -> None:
        self._news: list[tuple[str, Placement]] = []

    def started(self, key: str, placement: Placement) -> None:
        self._news.append((key, placement))

    def take(self) -> list[tuple[str, Placement]]:
        news, self._news = self._news, []
        return news


@dataclass
class _Slot:
    case: Case
    lane: Lane
    placement: Placement | None = None
    started: float | None = None  # time.monotonic() when the driver learnt the task had started


def cluster_nodes(ray: Any) -> list[dict[str, Any]]:
    """The cluster's alive nodes: id, host, address, resources (CPU, GPU, memory) and accelerator type."""
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        nodes.append({"node_id": node.get("NodeID"), "host": node.get("NodeManagerHostname"),
                      "ip": node.get("NodeManagerAddress"),
                      "resources": {k: res[k] for k in ("CPU", "GPU", "memory", "object_store_memory") if k in res},
                      "accelerator_type": next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")),
                                               None)})
    return nodes


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _bootstrap_address(ray: Any, address: str) -> str | None:
    """The ``host:port`` that ``address`` names (``auto``: the cluster this machine last started), or None if unknown."""
    if address.startswith("ray://"):
        return address[len("ray://"):]
    if address != "auto":
        return address
    find = getattr(getattr(getattr(ray, "_private", None), "services", None), "canonicalize_bootstrap_address_or_die", None)
    if find is None:
        return None  # Ray's lookup moved: let ray.init find it
    try:
        return find("auto")
    except ConnectionError as exc:
        raise ExecutorError(f"--address auto: {one_line(exc, first_line=True)}") from None


def check_reachable(ray: Any, address: str, timeout_s: float = 5.0) -> None:
    """One clear line when nothing answers at ``address`` (ray.init would otherwise wait minutes for a GCS)."""
    target = _bootstrap_address(ray, address)
    if target is None:
        return
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"--address {address!r}: give host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ExecutorError(f"--address {address}: no Ray cluster answers at {host}:{port} ({exc.strerror or exc}); "
                            "start one with `ray start --head` or check the address") from None


def connect(ray: Any, address: str | None) -> None:
    """Join the cluster at ``address`` (see :func:`check_reachable`), or start a local Ray instance (no dashboard)."""
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address is None:
            ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ExecutorError(f"--address {address or '(local instance)'}: {one_line(exc, first_line=True)}") from None


@dataclass
class RayExecutor:
    """Each case one Ray task declaring ``cpus_per_case`` CPUs and ``gpus_per_case`` GPUs; used as a context manager,
    which joins the cluster at ``address`` (None: start a local Ray instance, shut down on exit) and resolves
    ``device`` and the defaults against the cluster. If Ray is already initialised in this process, that is used.

    Defaults: ``gpus_per_case`` 1 on CUDA, else 0; ``cpus_per_case`` on a CPU sweep a whole node (the largest node's
    CPU count: no neighbour distorts a timing; smaller nodes take no case), on a CUDA sweep the node's CPUs divided
    among its GPUs (the smallest such share in the cluster). ``node_budget``: the default memory budget is taken on
    the node running each case. A case with no result ``grace_s`` seconds after its ``--timeout`` (counted from when
    the task started) is cancelled (``ray.cancel(force=True)``) and gets ``timeout``. ``on_placed(case, placement)``
    is called when the driver learns where a case started.
    """

    address: str | None = None
    device: str = "auto"
    cpus_per_case: float | None = None
    gpus_per_case: float | None = None
    node_budget: bool = False
    grace_s: float = STARTUP_LIMIT_S + 30.0
    poll_s: float = 0.5
    on_placed: Callable[[Case, Placement], None] | None = None
    nodes: list[dict[str, Any]] = field(default_factory=list, init=False)
    _owned: bool = field(default=False, init=False, repr=False)
    _task: Any = field(default=None, init=False, repr=False)

    # ---------------------------------------------------------------- set-up

    def __enter__(self) -> "RayExecutor":
        ray = import_ray()
        if self.address is not None:
            check_reachable(ray, self.address)
        if not ray.is_initialized():
            connect(ray, self.address)
            self._owned = True
        try:
            self.nodes = cluster_nodes(ray)
            self.device = self._resolve_device(self.device)
            self._plan_resources()
            self._task = ray.remote(**self.task_options())(ray_case_task)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._owned:
            import ray
            ray.shutdown()
            self._owned = False

    def _resolve_device(self, device: str) -> str:
        """``auto``: cuda:0 when the cluster has GPUs, else cpu. A task sees only the GPU(s) Ray gave it, as cuda:0."""
        has_gpu = any(n["resources"].get("GPU", 0) > 0 for n in self.nodes)
        if device == "auto":
            return "cuda:0" if has_gpu else "cpu"
        if device in ("cuda", "cuda:0"):
            if not has_gpu:
                raise ExecutorError(f"--device {device}: no node of the Ray cluster has a GPU ({self._nodes_text()})")
            return "cuda:0"
        if is_cuda(device):
            raise ExecutorError(f"--device {device}: under Ray each case runs on the GPU Ray gives it, which it sees "
                                "as cuda:0; use --device cuda")
        if device != "cpu":
            raise ExecutorError(f"--device {device!r}: choose auto, cpu or cuda")
        return device

    def _plan_resources(self) -> None:
        cuda = is_cuda(self.device)
        gpus = self.gpus_per_case if self.gpus_per_case is not None else (1 if cuda else 0)
        if cuda and gpus <= 0:
            raise ExecutorError("--gpus-per-case must be above 0 in a CUDA sweep: each case needs its GPU")
        cpus = self.cpus_per_case if self.cpus_per_case is not None else self._default_cpus(cuda, gpus)
        if cpus <= 0:
            raise ExecutorError(f"--cpus-per-case must be above 0, got {cpus:g}")
        self.cpus_per_case, self.gpus_per_case = _num(cpus), _num(gpus)
        if not self.slots():
            raise ExecutorError(f"no node of the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s) for one case "
                                f"({self._nodes_text()}); lower --cpus-per-case or --gpus-per-case")

    def _default_cpus(self, cuda: bool, gpus: float) -> float:
        cpus = [n["resources"].get("CPU", 0) for n in self.nodes]
        if not cuda:
            return max(cpus, default=1)
        shares = [math.floor(n["resources"].get("CPU", 0) * gpus / n["resources"]["GPU"])
                  for n in self.nodes if n["resources"].get("GPU", 0) > 0]
        return max(1, min(shares, default=1))

    def slots(self) -> int:
        """How many cases the cluster holds at once with these per-case resources."""
        def fits(res: dict[str, float]) -> int:
            by_cpu = int(res.get("CPU", 0) // self.cpus_per_case)
            return min(by_cpu, int(res.get("GPU", 0) // self.gpus_per_case)) if self.gpus_per_case else by_cpu
        return sum(fits(n["resources"]) for n in self.nodes)

    def _nodes_text(self) -> str:
        return ", ".join(f"{n['host']}: {_num(n['resources'].get('CPU', 0))} CPU, {_num(n['resources'].get('GPU', 0))} GPU"
                         for n in self.nodes) or "no alive node"

    def task_options(self) -> dict[str, Any]:
        """What each case's task declares. A GPU task gets a fresh worker (``max_calls=1``) so the fork server that
        starts the case's child is started under this task's ``CUDA_VISIBLE_DEVICES``."""
        return {"num_cpus": self.cpus_per_case, "num_gpus": self.gpus_per_case, "max_retries": 0,
                "max_calls": 1 if self.gpus_per_case else 0}

    def describe(self) -> dict[str, Any]:
        import ray
        return {"name": "ray", "ray": ray.__version__, "address": self.address or "local instance",
                "device": self.device, "task_options": self.task_options(), "slots": self.slots(),
                "mem_budget": "default on each node (80% of free RAM, 90% of the GPU's free memory)"
                              if self.node_budget else "as in options",
                "nodes": self.nodes, "resources": ray.cluster_resources()}

    def summary(self) -> str:
        import ray
        total = ray.cluster_resources()
        return (f"ray {ray.__version__}: {len(self.nodes)} node(s), {_num(total.get('CPU', 0))} CPU, "
                f"{_num(total.get('GPU', 0))} GPU; each case takes {self.cpus_per_case} CPU and {self.gpus_per_case} "
                f"GPU: up to {self.slots()} case(s) at a time, one per configuration")

    # ---------------------------------------------------------------- running

    def run(self, lanes: list[Lane], opts: RunOptions) -> Iterator[Finished]:
        import ray

        if self._task is None:
            raise RuntimeError("RayExecutor.run outside its `with` block")
        opts = dataclasses.replace(opts, plugins=tuple(str(Path(p).resolve()) for p in opts.plugins))
        board = ray.remote(num_cpus=0, max_restarts=-1)(StartBoard).remote()
        running: dict[Any, _Slot] = {}

        def submit(lane: Lane) -> None:
            case = next(lane, None)  # the sweep's lane: may write frontier rows, skip resumed cases
            if case is not None:
                running[self._task.remote(case, opts, board, self.node_budget)] = _Slot(case, lane)

        try:
            for lane in lanes:
                submit(lane)
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=self.poll_s)
                self._note_starts(ray, board, running)
                finished = [(ref, self._outcome(ray, ref, running[ref])) for ref in ready]
                finished += [(ref, self._cancel(ray, ref, slot, opts)) for ref, slot in running.items()
                             if ref not in ready and self._overdue(slot, opts)]
                for ref, result in finished:
                    slot = running.pop(ref)
                    yield slot.case, result
                    submit(slot.lane)
        finally:  # Ctrl-C, an error, or the consumer stopped: nothing outstanding keeps running
            for ref in running:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            with contextlib.suppress(Exception):
                ray.kill(board)

    def _note_starts(self, ray: Any, board: Any, running: dict[Any, _Slot]) -> None:
        if all(slot.placement is not None for slot in running.values()):
            return
        try:
            news = ray.get(board.take.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            return  # the board is gone: cases keep running, timed by their own runner
        by_key = {slot.case.key: slot for slot in running.values()}
        for key, placement in news:
            slot = by_key.get(key)
            if slot is not None and slot.placement is None:
                slot.placement, slot.started = placement, time.monotonic()
                if self.on_placed:
                    self.on_placed(slot.case, placement)

    def _overdue(self, slot: _Slot, opts: RunOptions) -> bool:
        return slot.started is not None and time.monotonic() - slot.started > opts.timeout + self.grace_s

    def _cancel(self, ray: Any, ref: Any, slot: _Slot, opts: RunOptions) -> CaseResult:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
        return self._failed(slot, Status.TIMEOUT, f"no result {opts.timeout + self.grace_s:g} s after the Ray task "
                                                  f"started ({slot.placement.where()}); cancelled")

    def _outcome(self, ray: Any, ref: Any, slot: _Slot) -> CaseResult:
        """The case's result, or the row of a task that did not return one: what died, named."""
        errors = ray.exceptions
        where = slot.placement.where() if slot.placement else "before it said where it ran"
        try:
            placement, result = ray.get(ref)
            return placement.stamp(result)
        except errors.RayTaskError as exc:  # the task itself raised (e.g. effbench is missing on that node)
            return self._failed(slot, Status.ERROR, f"the Ray task failed ({where}): "
                                                    f"{one_line(getattr(exc, 'cause', None) or exc, first_line=True)}")
        except errors.OutOfMemoryError:
            return self._failed(slot, Status.KILLED, f"Ray's memory monitor killed the worker running this case "
                                                     f"({where}): the node ran low on memory")
        except errors.WorkerCrashedError:
            return self._failed(slot, Status.KILLED, f"the Ray worker running this case died ({where})")
        except (errors.NodeDiedError, errors.LocalRayletDiedError):
            return self._failed(slot, Status.KILLED, f"the Ray node running this case died ({where})")
        except errors.RayError as exc:
            return self._failed(slot, Status.KILLED, f"Ray lost the task running this case ({where}): "
                                                     f"{one_line(exc, first_line=True)}")

    @staticmethod
    def _failed(slot: _Slot, status: Status, error: str) -> CaseResult:
        result = CaseResult(status=status, error=error)
        return slot.placement.stamp(result) if slot.placement else result
