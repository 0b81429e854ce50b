"""`effbench doctor`: on this machine every CPU reading agrees with dense attention's closed forms; a wrong reading
(planted by replacing what the sweep's code reads) fails the check named after it; the CUDA branch runs on fakes."""

import contextlib
import io
import tomllib
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch._subclasses.fake_tensor import FakeTensor

import effbench.measure.flops as flops_mod
import effbench.measure.memory as memory_mod
import effbench.workload as workload_mod
from effbench.doctor import (SELF_TEST_NS, SELF_TEST_SIZES, TOLERANCES, Verdict, dense_flops, dense_peak_bytes,
                             installed_extras, render_doctor, run_doctor)
from effbench.measure.memory import StorageTracker
from test_measure import FakeCuda, FakeEvent, FakeNvml

B, H, D = SELF_TEST_SIZES["batch"], SELF_TEST_SIZES["heads"], SELF_TEST_SIZES["head_dim"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def rendered(report) -> str:
    console = Console(file=io.StringIO(), width=260, record=True)
    render_doctor(report, console)
    return console.export_text()


def by_name(report, verdict=None) -> dict[str, list]:
    out: dict[str, list] = {}
    for c in report.checks:
        if verdict is None or c.verdict is verdict:
            out.setdefault(c.name, []).append(c)
    return out


# ------------------------------------------------------------------------ this machine

@NO_GPU
def test_doctor_on_this_cpu_every_reading_agrees():
    """The real path: the self-test runs in the sweep's child processes (run_case)."""
    report = run_doctor("cpu")
    assert report.ok, [(c.name, c.n, c.expected, c.measured) for c in report.failures]
    passed = by_name(report, Verdict.PASS)
    for name in ("tracker", "predicted", "rss", "flops"):
        assert sorted(c.n for c in passed[name]) == sorted(SELF_TEST_NS), name
    for n in SELF_TEST_NS:
        row = report.rows[n]
        assert row.peak_tensor_bytes == dense_peak_bytes(batch=B, heads=H, n=n, head_dim=D, itemsize=4)
        assert row.predicted_bytes == row.peak_tensor_bytes
        assert row.flops == 4 * B * H * n * n * D == dense_flops(batch=B, heads=H, n=n, head_dim=D)
        assert row.flops_source == "FlopCounterMode"
        assert row.readings == "predicted+tracker+rss+flops"  # the sweep's own record of what it read
    for name in ("cuda-allocator", "nvml", "nvml-process"):
        reading = report.reading(name)
        assert not reading.available and reading.reason == "no CUDA device"
    missing = by_name(report, Verdict.MISSING)
    assert set(missing) == {"cuda-allocator", "nvml"} and all(c.reason == "no CUDA device" for c in missing["nvml"])
    text = rendered(report)
    assert "reading: cuda-allocator │ missing" in text and "reading: nvml           │ missing" in text
    assert text.count("no CUDA device") >= 4
    assert "doctor: all 8 checks pass on cpu" in text


@NO_GPU
def test_doctor_asked_for_cuda_without_one_fails_on_the_device():
    report = run_doctor("cuda")
    assert not report.ok and [c.name for c in report.failures] == ["device"]
    assert "CUDA build of torch" in report.failures[0].fix and report.rows == {}
    assert "CPU build" in rendered(report) or torch.version.cuda is not None


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="choose auto, cpu or cuda"):
        run_doctor("tpu")


def test_extras_are_the_peers_extra_of_pyproject():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = installed_extras()
    assert list(extras) == pyproject["project"]["optional-dependencies"]["peers"]
    assert all(v is None or isinstance(v, str) for v in extras.values())


def test_tolerances():
    mib = 2**20
    assert TOLERANCES["rss"].accepts(100 * mib, 100 * mib) and TOLERANCES["rss"].accepts(163 * mib, 100 * mib)
    assert not TOLERANCES["rss"].accepts(50 * mib, 100 * mib)  # one of dense's two N×N tensors unseen
    assert TOLERANCES["cuda-allocator"].accepts(111 * mib, 100 * mib)
    assert not TOLERANCES["cuda-allocator"].accepts(113 * mib, 100 * mib)
    assert TOLERANCES["nvml"].accepts(0, 10 * mib) and not TOLERANCES["nvml"].accepts(300 * mib, 100 * mib)


# ------------------------------------------------------------------- planted wrong readings

def _wrong_tracker(monkeypatch):
    real = memory_mod.track

    def track(fn, tracker=None):
        t, result = real(fn, tracker)
        if not isinstance(result, FakeTensor):  # the real pass only, not the prediction
            t.peak += 4096
        return t, result

    monkeypatch.setattr(memory_mod, "track", track)


def _wrong_rss(monkeypatch):
    real = memory_mod.rss_pass
    monkeypatch.setattr(memory_mod, "rss_pass", lambda fn: (lambda r: (r[0] // 2, r[1]))(real(fn)))


def _wrong_flops(monkeypatch):
    real = flops_mod.counting

    @contextlib.contextmanager
    def counting():
        with real() as found:
            yield found
        found.total *= 2

    monkeypatch.setattr(flops_mod, "counting", counting)


PLANTS = {"tracker": _wrong_tracker, "rss": _wrong_rss, "flops": _wrong_flops, None: lambda mp: None}


def _planted_doctor(conn, reading):
    """In a fresh child of the sweep's fork server: plant the wrong reading, run the doctor in that process.

    Not in the test process itself: after other tests its heap holds freed pages that are already resident, and
    RSS then reads 0 for dense's N×N tensors (seen after the contract suite), a real disagreement, not the plant."""
    mp = pytest.MonkeyPatch()
    PLANTS[reading](mp)
    report = run_doctor("cpu", isolate=False, ns=(2048,))
    conn.send((report, rendered(report)))
    conn.close()


def doctor_in_fresh_child(reading):
    from effbench.workers import context

    ctx = context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_planted_doctor, args=(child, reading), daemon=True)
    proc.start()
    child.close()
    try:
        assert parent.poll(120), "the doctor's child gave no report"
        return parent.recv()
    finally:
        proc.join(10)
        parent.close()


@NO_GPU
@pytest.mark.parametrize("reading", ["tracker", "rss", "flops"])
def test_a_wrong_reading_fails_the_check_named_after_it(reading):
    """Each fake replaces what the runner itself calls, so the doctor is seen to check the sweep's code path."""
    report, text = doctor_in_fresh_child(reading)
    assert not report.ok
    assert {c.name for c in report.failures} == {reading}, [(c.name, c.expected, c.measured) for c in report.failures]
    failure = report.failures[0]
    assert failure.n == 2048 and failure.fix and failure.fix.endswith(".")
    assert f"1 check(s) fail on cpu: {reading} (N=2048)" in text


@NO_GPU
def test_the_same_run_passes_without_a_planted_reading():
    report, text = doctor_in_fresh_child(None)
    assert report.ok and "doctor: all 4 checks pass on cpu" in text


# ------------------------------------------------------------------------ CUDA, on fakes

class TrackingCuda(FakeCuda):
    """An allocator whose peak is what the call really allocated: a StorageTracker from reset to the peak's read."""

    def reset_peak_memory_stats(self, device=None):
        super().reset_peak_memory_stats(device)
        self.tracker = StorageTracker().__enter__()

    def max_memory_allocated(self, device=None):
        super().max_memory_allocated(device)
        self.tracker.__exit__(None, None, None)
        return self.memory_allocated(device) + self.tracker.peak


class Nvml(FakeNvml):
    """One GPU, ``GPU-abcd``; the listing calls NVML's docs name for enumerating GPUs."""

    uuids = ["GPU-abcd"]

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetUUID(self, handle):
        return self.uuids[handle[1]] if isinstance(handle[1], int) else handle[1]

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU"  # old nvidia-ml-py returns bytes

    def nvmlSystemGetDriverVersion(self):
        return "555.42"

    def nvmlShutdown(self):
        pass


def _fake_cuda(monkeypatch, cuda, nvml):
    """torch.cuda and pynvml replaced; the workload built on the CPU (as in test_measure's runner test)."""
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats", "memory_allocated", "memory_reserved",
                 "max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    props = type("P", (), {"uuid": "abcd", "name": "Fake GPU", "total_memory": 16 * 2**30})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(memory_mod, "load_nvml", lambda: nvml)
    build, make_call = workload_mod.build_module, workload_mod.make_call
    monkeypatch.setattr(workload_mod, "build_module", lambda case, device=None: build(case, "cpu"))
    monkeypatch.setattr(workload_mod, "make_call", lambda case, module, device=None: make_call(case, module, "cpu"))


def test_cuda_branch_with_fakes_passes_when_the_allocator_agrees(monkeypatch):
    _fake_cuda(monkeypatch, TrackingCuda([]), Nvml())
    report = run_doctor("cuda:0", isolate=False, ns=(512,))
    assert report.ok, [(c.name, c.expected, c.measured) for c in report.failures]
    assert {c.name for c in report.checks if c.verdict is Verdict.PASS} == {"tracker", "predicted", "cuda-allocator",
                                                                              "nvml", "flops"}
    assert report.reading("time").source.startswith("CUDA events")
    assert not report.reading("rss").available and "CUDA allocator" in report.reading("rss").reason
    assert report.reading("nvml").available and report.reading("nvml").reason is None
    assert report.reading("nvml-process").available  # the fake driver lists this PID
    assert [(g.name, g.uuid, g.sweep_device) for g in report.gpus] == [("Fake GPU", "GPU-abcd", True)]
    assert report.environment["driver"] == "555.42"
    assert report.rows[512].readings == "predicted+tracker+cuda-allocator+nvml+flops"
    text = rendered(report)
    assert "GPU-abcd" in text and "the sweep's device" in text


def test_cuda_branch_with_fakes_fails_naming_the_allocator(monkeypatch):
    _fake_cuda(monkeypatch, FakeCuda([]), Nvml())  # scripted: a peak of 1000 bytes, whatever the call allocates
    report = run_doctor("cuda:0", isolate=False, ns=(512,))
    assert not report.ok
    assert [(c.name, c.measured) for c in report.failures] == [("cuda-allocator", 1000)]
    assert "PYTORCH_CUDA_ALLOC_CONF" in report.failures[0].fix
    assert "fail on cuda:0: cuda-allocator (N=512)" in rendered(report)


def test_cuda_gpu_not_found_by_uuid_and_pid_not_listed(monkeypatch):
    class Other(Nvml):
        uuids = ["GPU-other"]

        def nvmlDeviceGetHandleByUUID(self, uuid):
            raise RuntimeError("NVML_ERROR_NOT_FOUND")

        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            return []  # as inside a container: NVML reports host PIDs

    _fake_cuda(monkeypatch, TrackingCuda([]), Other())
    report = run_doctor("cuda:0", isolate=False, ns=(512,))
    assert report.ok and not any(g.sweep_device for g in report.gpus)
    nvml = report.reading("nvml")
    assert nvml.available and "not among NVML's GPUs" in nvml.reason  # the sampler falls back to the index
    proc = report.reading("nvml-process")
    assert not proc.available and "did not list this process's PID" in proc.reason
