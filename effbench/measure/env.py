"""The environment a sweep ran in, for the JSON sidecar: software, hardware, command, time."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .memory import load_nvml


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def gpu_info(nvml: Any = None) -> dict[str, Any]:
    """GPU, driver and NVML facts (empty-valued where there is no GPU or no NVML)."""
    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
                            "gpu": None, "gpu_memory_bytes": None, "driver": None, "nvml": False}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = int(props.total_memory)
    nvml = load_nvml() if nvml is None else nvml
    if nvml is not None:
        info["nvml"] = True
        try:
            driver = nvml.nvmlSystemGetDriverVersion()
            info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        except Exception:
            pass
    return info


def environment(command: list[str] | None = None) -> dict[str, Any]:
    from effbench import __version__

    env = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(command if command is not None else sys.argv),
        "effbench": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": mem_total(),
    }
    env.update(gpu_info())
    env.update(matmul_precision())
    return env


def matmul_precision() -> dict[str, Any]:
    """The float32 matmul precision in force, for the sidecar: fp32 numbers mean little without it (TF32 on an
    Ampere+ GPU rounds fp32 matmul inputs to 10 mantissa bits). ``torch.get_float32_matmul_precision()`` ("highest":
    full fp32, "high": TF32 allowed, "medium": bf16 allowed), the TF32 flags of cuBLAS and cuDNN, the reduced-precision
    reductions of fp16/bf16 GEMMs, and the newer per-backend ``fp32_precision`` settings ("none" = not set)."""
    b = torch.backends
    found: dict[str, Any] = {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": bool(b.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(b.cudnn.allow_tf32),
        "cuda_matmul_allow_fp16_reduced_precision_reduction": bool(b.cuda.matmul.allow_fp16_reduced_precision_reduction),
        "cuda_matmul_allow_bf16_reduced_precision_reduction": bool(b.cuda.matmul.allow_bf16_reduced_precision_reduction),
    }
    for name, obj in (("fp32_precision", b), ("cuda_matmul_fp32_precision", b.cuda.matmul),
                      ("cudnn_fp32_precision", b.cudnn), ("mkldnn_fp32_precision", b.mkldnn)):
        value = getattr(obj, "fp32_precision", None)
        if value is not None:
            found[name] = str(value)
    return found


def _meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes (None off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mem_total() -> int | None:
    """Bytes of RAM installed (Linux MemTotal)."""
    return _meminfo("MemTotal")


def mem_available() -> int | None:
    """Bytes of RAM available to new allocations (Linux MemAvailable)."""
    return _meminfo("MemAvailable")
