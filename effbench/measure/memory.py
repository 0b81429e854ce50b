"""Peak-memory readings.

- :class:`StorageTracker`: a ``TorchDispatchMode`` that follows every tensor storage
  *allocated during the call* from the op that creates it until Python frees it, and
  keeps the peak of their summed ``nbytes``. Exact and repeatable on any device, and
  it works unchanged under ``FakeTensorMode`` (which is how ``predict`` reads a peak
  without allocating anything). It sees storages, not allocator caching or a fused
  kernel's private scratch space: that is what RSS and the CUDA allocator add.
  :class:`TimelineTracker` is the same tracker recording live bytes after every op
  (``effbench profile``'s memory timeline); its maximum is the tracker's peak.
- :func:`rss_pass`: peak resident set size of this process during a call, from
  Linux's VmHWM after resetting it through ``/proc/self/clear_refs``.
- :func:`cuda_pass`: the allocator's peak, as PyTorch's memory-management notes say:
  empty the cache, reset peak stats, synchronise, run, synchronise, read
  ``max_memory_allocated``/``max_memory_reserved`` minus what was held before.
- :class:`NvmlSampler`: device memory used, polled by NVML in a background thread,
  minus the idle baseline taken before the pass.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch._subclasses.fake_tensor import FakeTensor

from ..errors import one_line
from torch.utils._pytree import tree_flatten


def _tensors(obj: Any, out: list) -> list:
    """The tensors in an op's arguments or outputs (tensors, and tuples, lists and dicts of them: what aten ops take
    and return), appended to ``out``. A dispatch mode sees every op, and this walk is a fifth of what pytree's
    ``tree_flatten`` costs per op; at N = 1M a prediction dispatches ~10⁴ ops twice."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                out.append(item)
            elif isinstance(item, (tuple, list, dict)):
                _tensors(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, out)
    return out


def _storages(tensors: list) -> list:
    out = []
    for t in tensors:
        try:
            out.append(t.untyped_storage())
        except (RuntimeError, NotImplementedError):  # sparse/nested layouts have no single storage
            pass
    return out


def _fake_twins(inputs: list, outputs: list) -> list:
    """Under a FakeTensorMode (a prediction), a real argument (a module's parameter or buffer) enters the
    op as its memoised fake twin: the twin's storage is the argument's, not a new allocation."""
    mode = next((t.fake_mode for t in outputs if isinstance(t, FakeTensor)), None)
    if mode is None:
        return []
    return [mode.from_tensor(t).untyped_storage() for t in inputs if not isinstance(t, FakeTensor)]


def hold_fake_twins(root: Any, mode: Any) -> list:
    """Fake twins of every real tensor ``root`` holds (a module's parameters and buffers, and tensors kept in its
    attributes: dicts, lists, tuples and dataclass-like objects of them, submodules included), made once by
    ``mode`` and returned: keep the list alive for the prediction.

    FakeTensorMode memoises a real tensor's twin only while the twin is alive, so a real bias used by every block
    would otherwise be converted again (twice, with :func:`_fake_twins`) in every op that takes it: a millisecond
    each, the largest cost of a prediction at N = 1M. Held, each is converted once and the tracker's
    accounting is unchanged (the twin's storage is the one a conversion would make)."""
    held, seen, todo = [], set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not isinstance(obj, FakeTensor) and obj.layout == torch.strided:
                held.append(mode.from_tensor(obj))
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif isinstance(obj, torch.nn.Module) or hasattr(obj, "__dataclass_fields__"):
            todo.extend(vars(obj).values())
    return held


# Metadata queries that launch no kernel: a FakeTensor answers ``t.device`` by dispatching ``prim.device``, where a
# real tensor answers in C++ without a dispatch, so counting it would make a prediction's op count differ from the
# real call's (by 40% at N = 1M). Not counted as ops, not tracked.
METADATA_OPS = frozenset({torch.ops.prim.device.default, torch.ops.prim.layout.default})


class StorageTracker(TorchDispatchMode):
    """Live bytes of tensor storage allocated inside the context, and their peak.

    A storage counts as new when an op returns it and it is neither an argument's
    storage (views, in-place and ``out=`` ops alias their inputs) nor one already
    counted. It stops counting when Python releases the storage. ``ops`` counts the aten ops dispatched inside
    it (one kernel launch each on a GPU) in ``dispatched``: a sweep row's ``ops`` column.
    """

    def __init__(self):
        super().__init__()
        self.dispatched = 0
        self.current = 0
        self.peak = 0
        self.allocations = 0
        self._live: dict[int, int] = {}  # id(storage) -> nbytes
        self._lock = threading.Lock()

    def _free(self, key: int) -> None:
        with self._lock:
            self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA_OPS:
            return func(*args, **kwargs)
        self.dispatched += 1
        out = func(*args, **kwargs)
        # Keyed by the C++ StorageImpl (``_cdata``), and the input storages held until the outputs are checked:
        # keyed by id() of short-lived Python wrappers, an output could take a just-freed input wrapper's address
        # and be taken for that input, so the count depended on the allocator's address reuse.
        ins, outs = _tensors(kwargs, _tensors(args, [])), _tensors(out, [])
        held = _storages(ins) + _fake_twins(ins, outs)
        inputs = {s._cdata for s in held}
        for st in _storages(outs):
            key = st._cdata
            if key in inputs or key in self._live:
                continue
            nbytes = st.nbytes()
            if nbytes == 0:
                continue
            with self._lock:
                self._live[key] = nbytes
                self.current += nbytes
                self.allocations += 1
                self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._free, key)
        return out


@dataclass(frozen=True)
class OpRecord:
    """One op of a tracked call: its name (``aten::bmm``), the shapes of its tensor outputs, the bytes of new
    storage it returned, and the live tracked bytes right after it (what :class:`StorageTracker` counts)."""

    index: int
    op: str
    output_shapes: tuple[tuple[int, ...], ...]
    bytes_allocated: int
    live_bytes: int


def _tensor_shapes(out: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))


class TimelineTracker(StorageTracker):
    """A :class:`StorageTracker` that also records an :class:`OpRecord` after every op it sees (in ``ops``).

    Counting is the base class's, unchanged: the live bytes after an op are ``current`` at that moment, so
    ``max(r.live_bytes for r in ops) == peak``. ``peak_index`` is the first op at which the peak was reached and
    ``peak_live`` the sizes (bytes, largest first) of the storages alive then. Only shapes and sizes are kept,
    never a tensor: holding one would keep its storage alive and change what is measured."""

    def __init__(self):
        super().__init__()
        self.ops: list[OpRecord] = []
        self.peak_index: int | None = None
        self.peak_live: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in METADATA_OPS:
            return func(*args, **(kwargs or {}))
        before = set(self._live)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        with self._lock:
            new = sum(n for k, n in self._live.items() if k not in before)
            record = OpRecord(index=len(self.ops), op=func._schema.name, output_shapes=_tensor_shapes(out),
                              bytes_allocated=new, live_bytes=self.current)
            self.ops.append(record)
            if self.peak_index is None or record.live_bytes > self.ops[self.peak_index].live_bytes:
                self.peak_index = record.index
                self.peak_live = sorted(self._live.values(), reverse=True)
        return out


def track(fn: Callable[[], Any], tracker: StorageTracker | None = None) -> tuple[StorageTracker, Any]:
    """Run ``fn`` under ``tracker`` (a new :class:`StorageTracker` by default); return (the tracker, result).

    Python's cyclic garbage collector is paused during the call: otherwise it runs whenever enough
    objects have been allocated since its last run, which depends on everything that ran before,
    and a temporary caught in a reference cycle would be freed at a different op from run to run.
    With it paused the peak is the same in every run (and the prediction equals the measurement)."""
    tracker = StorageTracker() if tracker is None else tracker
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with tracker:
            result = fn()
    finally:
        if was_enabled:
            gc.enable()
    return tracker, result


def tracked_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn`` under a :class:`StorageTracker` (through :func:`track`: GC paused); return (peak bytes, result)."""
    tracker, result = track(fn)
    return tracker.peak, result


# ---------------------------------------------------------------------------- RSS

def _read_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_pass(fn: Callable[[], Any]) -> tuple[int | None, Any]:
    """Peak RSS during ``fn`` minus RSS before it, in bytes (None where Linux's /proc is absent)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _read_status_kib("VmRSS")
    result = fn()
    peak = _read_status_kib("VmHWM")
    if not reset or before is None or peak is None:
        return None, result
    return max(0, (peak - before) * 1024), result


# --------------------------------------------------------------------------- CUDA

@dataclass
class CudaReading:
    peak_alloc_bytes: int
    peak_reserved_bytes: int


def cuda_pass(fn: Callable[[], Any], device: torch.device | str, cuda: Any = None,
              sampler: "NvmlSampler | None" = None) -> tuple[CudaReading, Any]:
    """Allocator peak of ``fn`` on ``device``, above what was allocated/reserved before it.

    Order (PyTorch's memory-management notes): synchronise, ``empty_cache`` (so cached blocks
    of earlier passes neither hide the call's own reservations nor count as its peak),
    ``reset_peak_memory_stats``, read the bytes held before, run, synchronise, read the peaks.
    ``sampler`` (an :class:`NvmlSampler`) is entered only after the cache is emptied, so its idle
    baseline is the device without cached blocks, and left after the final synchronise.
    ``cuda`` defaults to ``torch.cuda``; tests pass a fake to check the order of calls.
    """
    cuda = torch.cuda if cuda is None else cuda
    gc.collect()
    cuda.synchronize(device)
    cuda.empty_cache()
    cuda.reset_peak_memory_stats(device)
    alloc_before = cuda.memory_allocated(device)
    reserved_before = cuda.memory_reserved(device)
    with sampler if sampler is not None else contextlib.nullcontext():
        result = fn()
        cuda.synchronize(device)
    reading = CudaReading(
        peak_alloc_bytes=cuda.max_memory_allocated(device) - alloc_before,
        peak_reserved_bytes=cuda.max_memory_reserved(device) - reserved_before,
    )
    return reading, result


# --------------------------------------------------------------------------- NVML

def load_nvml() -> Any | None:
    """The ``pynvml`` module (from nvidia-ml-py), initialised, or None when NVML is unavailable."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return None


def cuda_uuid(device: torch.device | str) -> str | None:
    """NVML's name of a CUDA device, ``"GPU-<uuid>"``: NVML indexes devices in its own order and ignores
    CUDA_VISIBLE_DEVICES, so torch's device index may name another GPU there; the UUID does not."""
    try:
        return f"GPU-{torch.cuda.get_device_properties(torch.device(device)).uuid}"
    except Exception:  # very old drivers/torch: no uuid
        return None


@dataclass
class NvmlSampler:
    """Poll device memory used (and this process's, where the driver reports it) every ``interval_s``.

    Use as a context manager around the memory pass; ``peak_bytes`` is the highest
    device reading minus the idle baseline read on entry (``None`` if NVML failed).
    The device is looked up by ``uuid`` when given (``nvmlDeviceGetHandleByUUID``), else by
    NVML ``index``. A failing NVML call never fails the case: the sampler stops, keeps what it
    read and records the error in ``error``. ``process_peak`` needs the driver to report this
    process's PID; inside a container NVML reports host PIDs, so it stays ``None`` there.
    """

    nvml: Any
    index: int = 0
    uuid: str | None = None
    interval_s: float = 0.002
    pid: int = field(default_factory=os.getpid)
    baseline: int | None = None
    peak_used: int | None = None
    process_peak: int | None = None
    samples: int = 0
    error: str | None = None
    _handle: Any = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _device(self) -> Any:
        if self._handle is None and self.uuid is not None:
            with contextlib.suppress(Exception):  # a driver that does not know the UUID: fall back to the index
                self._handle = self.nvml.nvmlDeviceGetHandleByUUID(self.uuid)
        if self._handle is None:
            self._handle = self.nvml.nvmlDeviceGetHandleByIndex(self.index)
        return self._handle

    def _read(self) -> tuple[int, int | None]:
        handle = self._device()
        used = int(self.nvml.nvmlDeviceGetMemoryInfo(handle).used)
        mine = None
        try:
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == self.pid and proc.usedGpuMemory is not None:
                    mine = int(proc.usedGpuMemory)
        except Exception:  # not supported on every driver / in containers
            mine = None
        return used, mine

    def _loop(self) -> None:
        while not self._stop.is_set() and self._sample():
            self._stop.wait(self.interval_s)

    def _sample(self) -> bool:
        """One reading; False (and ``error`` set) when NVML failed."""
        try:
            used, mine = self._read()
        except Exception as exc:
            self.error = self.error or one_line(exc)
            return False
        self.samples += 1
        self.peak_used = used if self.peak_used is None else max(self.peak_used, used)
        if mine is not None:
            self.process_peak = mine if self.process_peak is None else max(self.process_peak, mine)
        return True

    def __enter__(self) -> "NvmlSampler":
        try:
            self.baseline, _ = self._read()
        except Exception as exc:
            self.error = one_line(exc)
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._sample()  # one last reading after the pass

    @property
    def peak_bytes(self) -> int | None:
        if self.baseline is None or self.peak_used is None:
            return None
        return max(0, self.peak_used - self.baseline)
