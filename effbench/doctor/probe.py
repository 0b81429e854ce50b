"""What the doctor finds before measuring: the environment (torch and its build, driver, each GPU NVML finds by
UUID, CPU, RAM, the optional extras installed) and which readings a sweep will have on a device, and why not."""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import platform
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .. import __version__
from ..devices import is_cuda
from ..measure import env as env_mod
from ..measure import memory
from ..results import CaseResult

NO_CUDA = "no CUDA device"


@dataclass
class Gpu:
    index: int  # NVML's index (its own order, not CUDA's)
    name: str
    uuid: str
    memory_total: int
    sweep_device: bool = False  # the GPU the sweep's device is, matched by UUID


@dataclass
class Reading:
    """A column a sweep on this device will (``available``) or will not fill; ``source`` or ``reason`` says how/why."""

    name: str
    available: bool
    source: str = ""
    reason: str | None = None


# ---------------------------------------------------------------------- environment

def installed_extras(extra: str = "peers") -> dict[str, str | None]:
    """The packages of effbench's optional ``extra`` (from its installed metadata) and their installed versions."""
    try:
        requires = metadata.requires("effbench") or []
    except metadata.PackageNotFoundError:
        return {}
    out: dict[str, str | None] = {}
    for req in requires:
        spec, _, marker = req.partition(";")
        if re.search(r"extra\s*==\s*['\"]" + re.escape(extra) + r"['\"]", marker):
            name = re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0)
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = None
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_gpus(nvml: Any, uuid: str | None) -> list[Gpu]:
    """Every GPU NVML sees, by NVML index; the one whose UUID is ``uuid`` marked as the sweep's device."""
    gpus = []
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        gpu_uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        gpus.append(Gpu(index=i, name=_text(nvml.nvmlDeviceGetName(handle)), uuid=gpu_uuid,
                        memory_total=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                        sweep_device=uuid is not None and gpu_uuid == uuid))
    return gpus


def environment(threads: int | None, nvml: Any, nvml_error: str | None) -> dict[str, Any]:
    build = ("CPU build" if torch.version.cuda is None and getattr(torch.version, "hip", None) is None
             else f"ROCm {torch.version.hip}" if torch.version.cuda is None else f"CUDA {torch.version.cuda}")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info = env_mod.gpu_info(nvml) if nvml is not None else {"driver": None, "nvml": False}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "effbench": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torch_build": build, "cuda_version": torch.version.cuda, "cudnn": cudnn,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "driver": info.get("driver"), "nvml": nvml is not None, "nvml_error": nvml_error,
        "cpu": env_mod.cpu_name(), "cpu_count": os.cpu_count(), "cpu_usable": usable,
        "torch_threads": threads or torch.get_num_threads(),
        "memory_total_bytes": env_mod.mem_total(), "memory_available_bytes": env_mod.mem_available(),
    }


def load_nvml() -> tuple[Any, str | None]:
    """NVML through the sweep's own loader, and why not when it is not loadable."""
    nvml = memory.load_nvml()
    if nvml is not None:
        return nvml, None
    if importlib.util.find_spec("pynvml") is None:
        return None, "nvidia-ml-py (pynvml) is not installed"
    return None, "nvmlInit failed: no NVIDIA driver (libnvidia-ml) here"


def _in_container() -> bool:
    if os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"):
        return True
    try:
        with open("/proc/1/cgroup") as fh:
            return any(word in fh.read() for word in ("docker", "kubepods", "containerd", "lxc"))
    except OSError:
        return False


def _rss_probe() -> str | None:
    """Why ``memory.rss_pass`` would read nothing here (None: it works): it resets VmHWM through clear_refs."""
    if memory._read_status_kib("VmHWM") is None:
        return "no VmHWM in /proc/self/status (not Linux)"
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return "/proc/self/clear_refs is not writable, so peak RSS cannot be reset"
    return None


# ------------------------------------------------------------------------- readings

def readings(device: str, nvml: Any, nvml_error: str | None, gpus: list[Gpu], uuid: str | None) -> list[Reading]:
    """What ``runner._measure`` will record on ``device`` (its stages, in order), each missing one with its reason."""
    cuda = is_cuda(device) and torch.cuda.is_available()
    not_cuda = NO_CUDA if not torch.cuda.is_available() else f"the device is {device}: run with --device cuda"
    out = [Reading("predicted", True, "FakeTensorMode + the tracker, nothing allocated"),
           Reading("time", True, "CUDA events, synchronised (not self-tested: no closed form)" if cuda
                   else "time.perf_counter per call (not self-tested: no closed form)"),
           Reading("tracker", True, "StorageTracker (TorchDispatchMode), exact")]
    if cuda:
        out.append(Reading("rss", False, reason="on a CUDA device a sweep reads the CUDA allocator instead of RSS"))
    else:
        why = _rss_probe()
        out.append(Reading("rss", why is None, "VmHWM after /proc/self/clear_refs" if why is None else "", why))
    out.append(Reading("cuda-allocator", True, "max_memory_allocated − before") if cuda
               else Reading("cuda-allocator", False, reason=not_cuda))
    if not cuda:
        out.append(Reading("nvml", False, reason=not_cuda))
    elif nvml is None:
        out.append(Reading("nvml", False, reason=nvml_error))
    elif any(g.sweep_device for g in gpus):
        out.append(Reading("nvml", True, f"device memory used − idle baseline, GPU {uuid}"))
    else:
        out.append(Reading("nvml", True, f"NVML index {torch.device(device).index or 0} (fallback)",
                           f"{uuid or 'the GPU'} is not among NVML's GPUs: the sweep falls back to NVML's index, "
                           "which may be another GPU"))
    out.append(Reading("nvml-process", False, reason=not_cuda if not cuda else nvml_error))  # known after the self-test
    out.append(Reading("flops", True, "FlopCounterMode (on the prediction's fake tensors)"))
    return out


def settle_process_reading(readings: list[Reading], rows: dict[int, CaseResult]) -> None:
    """The per-process NVML reading exists only if the driver listed this PID during the self-test."""
    nvml = next(r for r in readings if r.name == "nvml")
    proc = next(r for r in readings if r.name == "nvml-process")
    if not nvml.available:
        return
    if any(r.nvml_process_peak_bytes is not None for r in rows.values()):
        proc.available, proc.source, proc.reason = True, "this PID's usedGpuMemory", None
    else:
        proc.reason = ("the driver did not list this process's PID during the self-test"
                       + (" (usual inside a container: NVML reports host PIDs)" if _in_container() else ""))
