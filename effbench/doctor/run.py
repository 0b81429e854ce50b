"""`run_doctor`: the environment, the readings a device will have, and the self-test run through the sweep's code."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..cases import Case
from ..devices import is_cuda, resolve_device
from ..errors import one_line
from ..measure import memory
from ..results import CaseResult
from ..runner import RunOptions, measure_in_process, run_case
from . import probe
from .checks import CHECKED, SELF_TEST_NS, SELF_TEST_SIZES, Check, Verdict, row_checks
from .probe import NO_CUDA, Gpu, Reading


@dataclass
class DoctorReport:
    """What ``effbench doctor`` found: ``ok`` is False when any check fails (a missing reading is not a failure)."""

    device: str
    environment: dict[str, Any]
    gpus: list[Gpu]
    extras: dict[str, str | None]  # package -> installed version, None when not installed
    readings: list[Reading]
    checks: list[Check]
    rows: dict[int, CaseResult] = field(default_factory=dict)  # the self-test rows, by N

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.verdict is Verdict.FAIL]

    @property
    def ok(self) -> bool:
        return not self.failures

    def reading(self, name: str) -> Reading:
        """The reading called ``name`` (KeyError if there is none)."""
        for r in self.readings:
            if r.name == name:
                return r
        raise KeyError(name)


def _self_test(device: str, threads: int | None, isolate: bool, ns: Sequence[int]) -> dict[int, CaseResult]:
    opts = RunOptions(time=False, timeout=120.0, threads=threads)
    measure = run_case if isolate else measure_in_process
    return {n: measure(Case(mechanism="dense", n=n, device=device, **SELF_TEST_SIZES), opts) for n in ns}


def run_doctor(device: str = "auto", *, threads: int | None = None, isolate: bool = True,
               ns: Sequence[int] = SELF_TEST_NS) -> DoctorReport:
    """The environment, the readings a sweep will have on ``device`` and the self-test of them (``effbench.doctor.checks``).

    ``device``: auto, cpu, cuda or cuda:<index> (anything else raises ValueError); a CUDA device torch cannot see
    gives the environment and one failing ``device`` check. ``threads`` sets torch's intra-op threads in the
    self-test's child, as ``sweep --threads`` does. ``isolate`` False runs the self-test in this process
    (:func:`effbench.runner.measure_in_process`) and ``ns`` changes its lengths: for tests and debugging. RSS is only
    comparable in a fresh process at N >= 2048 (``effbench.doctor.checks``): in a process that has run other work,
    freed pages that are still resident serve the N×N tensors and RSS can read 0.
    """
    if device != "cpu" and not is_cuda(device) and device != "auto":
        raise ValueError(f"device {device!r}: choose auto, cpu or cuda[:index]")
    no_device = is_cuda(device) and not torch.cuda.is_available()
    device = device if no_device else resolve_device(device)
    nvml, nvml_error = probe.load_nvml()
    try:
        uuid = memory.cuda_uuid(device) if is_cuda(device) and not no_device else None
        try:
            gpus = probe.nvml_gpus(nvml, uuid) if nvml is not None else []
        except Exception as exc:  # a driver that fails mid-listing: the sweep's sampler would fail the same way
            gpus, nvml_error = [], f"listing GPUs failed: {one_line(exc)}"
        environment = probe.environment(threads, nvml, nvml_error)
    finally:
        if nvml is not None:
            with contextlib.suppress(Exception):  # as the runner does: a failing shutdown is no reading's business
                nvml.nvmlShutdown()
    readings = probe.readings(device, nvml, nvml_error, gpus, uuid)
    report = DoctorReport(device=device, environment=environment, gpus=gpus, extras=probe.installed_extras(),
                          readings=readings, checks=[])
    if no_device:
        report.checks.append(Check("device", None, device, NO_CUDA, "—", Verdict.FAIL, "text",
                                   fix=f"torch ({environment['torch_build']}) sees no GPU: install a CUDA build of "
                                       "torch, check the driver with nvidia-smi and CUDA_VISIBLE_DEVICES, or use --device cpu."))
        return report
    available = {r.name: r for r in readings}
    report.checks += [Check(r.name, None, None, None, "—", Verdict.MISSING, reason=r.reason)
                      for r in readings if r.name in CHECKED and not r.available]
    report.rows = _self_test(device, threads, isolate, ns)
    for n, row in report.rows.items():
        report.checks += row_checks(n, row, available, device)
    probe.settle_process_reading(readings, report.rows)
    order = {name: i for i, name in enumerate(("device", "case") + CHECKED)}
    report.checks.sort(key=lambda c: (order.get(c.name, 99), c.n or 0))
    return report
