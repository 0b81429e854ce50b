"""Measurement logic: exact tracker counts, FLOPs, and the CUDA/NVML paths driven by fakes."""

import threading

import pytest

import torch

from effbench.cases import Case
from effbench.measure.flops import count_flops
from effbench.measure.memory import NvmlSampler, StorageTracker, cuda_pass, tracked_peak
from effbench.measure.timing import time_cpu, time_cuda
from effbench.runner import predict
from effbench.workload import prepare


def test_tracker_counts_known_allocations_exactly():
    x = torch.zeros(1000)  # allocated before: not counted

    def work():
        a = torch.empty(256, dtype=torch.float32)  # 1024 B
        b = torch.empty(100, dtype=torch.float64)  # 800 B, peak 1824
        del a
        c = torch.empty(10, dtype=torch.int8)  # 10 B
        x.add_(1)  # in place: no new storage
        v = x.view(10, 100).t()  # a view: no new storage
        return b, c, v

    peak, _ = tracked_peak(work)
    assert peak == 1824


def test_tracker_releases_and_counts_peak_not_total():
    with StorageTracker() as t:
        for _ in range(5):
            y = torch.empty(1 << 20, dtype=torch.uint8)
            del y
    assert t.peak == 1 << 20 and t.current == 0 and t.allocations == 5


def test_dense_flops_match_formula():
    b, h, n, d = 2, 3, 64, 16
    for name in ("dense", "sdpa"):
        w = prepare(Case(mechanism=name, n=n, batch=b, heads=h, head_dim=d))
        flops, missing = count_flops(w.call)
        assert missing == []
        assert flops == 4 * b * h * n * n * d


def test_dense_memory_quadratic_sdpa_linear():
    from helpers import growth

    dense = growth("dense", [256, 512, 1024], heads=8, head_dim=64)
    sdpa = growth("sdpa", [256, 512, 1024], heads=8, head_dim=64)
    for (n0, m0, _), (n1, m1, _) in zip(dense, dense[1:]):
        assert 3.5 <= m1 / m0 <= 4.5
    for (n0, m0, _), (n1, m1, _) in zip(sdpa, sdpa[1:]):
        assert m1 / m0 <= 2.3
    # dense holds the scores and the probabilities: at least 2·B·H·N² float32
    assert dense[-1][1] >= 2 * 8 * 1024 * 1024 * 4


def test_prediction_equals_measured_tracker_peak():
    for name, mode in (("dense", "fwd"), ("sdpa", "fwd"), ("dense", "fwd+bwd")):
        case = Case(mechanism=name, n=384, heads=2, head_dim=32, mode=mode)
        w = prepare(case)
        w.call()
        measured, _ = tracked_peak(w.call)
        assert predict(case).predicted_bytes == measured


@pytest.mark.parametrize("name,mode,causal", [("longformer", "fwd", False), ("reformer", "fwd", True),
                                              ("performer", "fwd+bwd", True)])
def test_prediction_same_with_and_without_fake_dispatch_cache(monkeypatch, name, mode, causal):
    """Predictions run with FakeTensorMode's dispatch cache on (it answers the repeated ops of a blocked kernel):
    with a small block budget (dozens of blocks), a prediction with the cache, another one after it in the same
    process and one with the cache off all read the same bytes, ops and FLOPs, and equal the real tracked peak."""
    import mechanisms._budget as budget
    from effbench import runner

    monkeypatch.setattr(budget, "CPU_TEMP_BYTES", 96 * 1024)
    case = Case(mechanism=name, n=1031, batch=2, heads=2, head_dim=32, mode=mode, causal=causal)
    cached = [predict(case) for _ in range(2)]

    class Uncached(runner.FakeTensorMode):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.cache_enabled = False

    monkeypatch.setattr(runner, "FakeTensorMode", Uncached)
    uncached = predict(case)
    got = {(p.predicted_bytes, p.ops, p.flops[0], tuple(p.flops[1])) for p in (*cached, uncached)}
    assert len(got) == 1, got
    assert uncached.ops > 100  # many blocks: the cache had repeats to answer
    w = prepare(case)
    w.call()
    measured, _ = tracked_peak(w.call)
    assert uncached.predicted_bytes == measured


def test_fake_twins_held_for_every_real_tensor_a_module_keeps():
    """Real tensors a module keeps in buffers, parameters and attributes (dicts, lists, dataclasses) get one fake
    twin each, memoised for as long as the list is held."""
    from dataclasses import dataclass

    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from effbench.measure.memory import hold_fake_twins

    @dataclass
    class Plan:
        bias: torch.Tensor
        rows: list

    m = torch.nn.Linear(3, 2)
    m.register_buffer("buf", torch.zeros(4))
    m.plans = {1: Plan(torch.ones(5), [torch.ones(6), 7])}
    m.child = torch.nn.Linear(2, 2, bias=False)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    twins = hold_fake_twins(m, mode)
    assert sorted(t.numel() for t in twins) == [2, 4, 4, 5, 6, 6]  # bias, buffer, child weight, plan, list, weight
    assert all(isinstance(t, FakeTensor) for t in twins)
    assert mode.from_tensor(m.plans[1].bias) is next(t for t in twins if t.numel() == 5)


def test_prediction_of_huge_dense_allocates_nothing():
    pred = predict(Case(mechanism="dense", n=131072))
    # scores + probabilities, fp32, B=1, H=8: 2 · 8 · 131072² · 4 bytes = 1 TiB
    assert pred.predicted_bytes >= 512 * 2**30
    assert predict(Case(mechanism="sdpa", n=131072)).predicted_bytes < 2**30


class FakeCuda:
    """Records the order of torch.cuda calls; memory numbers are scripted."""

    def __init__(self, log):
        self.log = log

    def synchronize(self, device=None):
        self.log.append("synchronize")

    def empty_cache(self):
        self.log.append("empty_cache")

    def reset_peak_memory_stats(self, device=None):
        self.log.append("reset_peak_memory_stats")

    def memory_allocated(self, device=None):
        self.log.append("memory_allocated")
        return 100

    def memory_reserved(self, device=None):
        self.log.append("memory_reserved")
        return 200

    def max_memory_allocated(self, device=None):
        self.log.append("max_memory_allocated")
        return 1100

    def max_memory_reserved(self, device=None):
        self.log.append("max_memory_reserved")
        return 2200


def test_cuda_pass_order_and_baseline():
    log = []
    reading, out = cuda_pass(lambda: log.append("run") or "result", "cuda:0", cuda=FakeCuda(log))
    assert out == "result"
    assert (reading.peak_alloc_bytes, reading.peak_reserved_bytes) == (1000, 2000)
    run = log.index("run")
    assert log.index("reset_peak_memory_stats") < log.index("memory_allocated") < run
    assert log.index("empty_cache") < log.index("reset_peak_memory_stats")
    assert "synchronize" in log[:run] and log[run + 1] == "synchronize"
    assert log.index("max_memory_allocated") > run + 1 and log.index("max_memory_reserved") > run + 1


def test_nvml_sampler_starts_after_empty_cache_and_stops_after_sync():
    """The idle baseline must be read after empty_cache: cached blocks of earlier passes would raise it."""
    log = []

    class LoggingSampler:
        def __enter__(self):
            log.append("sampler_enter")
            return self

        def __exit__(self, *exc):
            log.append("sampler_exit")

    cuda_pass(lambda: log.append("run"), "cuda:1", cuda=FakeCuda(log), sampler=LoggingSampler())
    run = log.index("run")
    assert log.index("empty_cache") < log.index("memory_reserved") < log.index("sampler_enter") < run
    assert log[run + 1] == "synchronize" and log[run + 2] == "sampler_exit"
    assert log.index("sampler_exit") < log.index("max_memory_allocated")


class FakeNvml:
    """Device memory 'used' is 500 B when idle, 800 B while the pass runs; this process holds 50/250."""

    def __init__(self):
        self.running = False
        self.sampled_while_running = threading.Event()

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if not uuid.startswith("GPU-"):
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return ("handle", uuid)

    def nvmlDeviceGetMemoryInfo(self, handle):
        if self.running:
            self.sampled_while_running.set()
        return type("Mem", (), {"used": 800 if self.running else 500, "total": 10_000, "free": 0})()

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        import os
        return [type("P", (), {"pid": os.getpid(), "usedGpuMemory": 250 if self.running else 50})(),
                type("P", (), {"pid": -1, "usedGpuMemory": 9999})()]


def test_nvml_sampler_subtracts_idle_baseline():
    nvml = FakeNvml()

    def workload():
        nvml.running = True
        assert nvml.sampled_while_running.wait(5)
        nvml.running = False

    with NvmlSampler(nvml, index=0, interval_s=0.001) as sampler:
        workload()
    assert sampler.baseline == 500
    assert sampler.peak_bytes == 300
    assert sampler.process_peak == 250
    assert sampler.samples >= 2


class FakeEvent:
    clock = [0.0]
    durations = iter([])

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self, stream=None):
        self.t = FakeEvent.clock[0]

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.t - self.t


def test_cpu_timing_calls_exactly_warmup_plus_repeats():
    calls = []
    t = time_cpu(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7  # torch's Timer.timeit(1) would have made 2 + 5·3 calls
    assert t.repeats == 5 and len(t.samples_ms) == 5 and t.timer == "perf_counter"
    assert t.median_ms > 0 and t.iqr_ms >= 0


def test_cuda_event_timing_median_and_iqr():
    samples_ms = iter([10.0, 30.0, 20.0, 40.0, 50.0])
    log = []

    class Cuda(FakeCuda):
        Event = FakeEvent

    def fn():
        FakeEvent.clock[0] += next(samples_ms)  # the work "takes" this many ms between the two records

    t = time_cuda(fn, warmup=0, repeats=5, cuda=Cuda(log), flush_l2=False)
    assert t.timer == "cuda-events+l2-warm" and t.repeats == 5
    assert abs(t.median_ms - 30.0) < 1e-9
    assert abs(t.iqr_ms - 20.0) < 1e-9  # quartiles 20 and 40


def test_cuda_l2_flush_runs_before_each_sample_outside_the_events():
    """The flush comes before each sample's start event (so a flush that 'takes' 1000 ms is not in any sample), and
    not during warm-up; the timer label says L2 was flushed."""
    samples_ms = iter([10.0, 30.0, 20.0])
    order = []

    class Cuda(FakeCuda):
        Event = FakeEvent

    def flush():
        order.append("flush")
        FakeEvent.clock[0] += 1000.0

    def fn():
        order.append("call")
        FakeEvent.clock[0] += next(samples_ms, 5.0)

    t = time_cuda(fn, warmup=1, repeats=3, cuda=Cuda([]), flush=flush)
    assert order == ["call"] + ["flush", "call"] * 3  # the warm-up call is not flushed before
    assert t.timer == "cuda-events+l2-flush" and t.samples_ms == [30.0, 20.0, 5.0]


def test_l2_flush_buffer_is_larger_than_l2():
    """Twice the device's L2_cache_size, at least 256 MiB (triton's do_bench buffer); built on the given device (meta
    here: nothing allocated)."""
    from effbench.measure.timing import l2_flush, l2_flush_bytes

    def cuda_with(l2):
        return type("C", (), {"get_device_properties": staticmethod(lambda d: type("P", (), {"L2_cache_size": l2})())})()

    assert l2_flush_bytes(cuda=cuda_with(40 << 20)) == 256 << 20  # A100: 40 MiB
    assert l2_flush_bytes(cuda=cuda_with(200 << 20)) == 400 << 20
    assert l2_flush_bytes(cuda=type("C", (), {"get_device_properties": staticmethod(lambda d: object())})()) == 256 << 20
    flush = l2_flush("meta", cuda_with(200 << 20))
    assert flush.__self__.numel() * 4 == 400 << 20 and flush.__self__.dtype == torch.int32


def test_nvml_sampler_finds_the_device_by_uuid_then_index():
    nvml = FakeNvml()
    s = NvmlSampler(nvml, index=3, uuid="GPU-1234")
    assert s._device() == ("handle", "GPU-1234")  # NVML's own index order may differ from CUDA's
    assert NvmlSampler(nvml, index=3, uuid="bogus")._device() == ("handle", 3)  # unknown UUID: fall back
    assert NvmlSampler(nvml, index=2)._device() == ("handle", 2)


def test_nvml_failure_mid_pass_keeps_readings_and_never_raises():
    class Flaky(FakeNvml):
        calls = 0

        def nvmlDeviceGetMemoryInfo(self, handle):
            Flaky.calls += 1
            if Flaky.calls > 2:
                raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
            return type("Mem", (), {"used": 500 + 100 * Flaky.calls})()

    with NvmlSampler(Flaky(), interval_s=0.001) as sampler:
        deadline = 200
        while sampler.error is None and deadline:
            threading.Event().wait(0.005)
            deadline -= 1
    assert sampler.error == "RuntimeError: NVML_ERROR_GPU_IS_LOST"
    assert sampler.baseline == 600 and sampler.peak_bytes == 100  # what it read before NVML failed

    class Dead(FakeNvml):
        def nvmlDeviceGetMemoryInfo(self, handle):
            raise RuntimeError("NVML_ERROR_UNINITIALIZED")

    with NvmlSampler(Dead()) as dead:
        pass
    assert dead.peak_bytes is None and dead.error.startswith("RuntimeError")


def test_runner_cuda_branch_end_to_end_with_fakes(monkeypatch):
    """The runner's whole CUDA path on the CPU: torch.cuda and pynvml replaced by fakes, the workload built on
    the CPU. Checks the device is made current, every reading lands in its column, and NVML is shut down."""
    import effbench.measure.memory as memory_mod
    import effbench.workload as workload_mod
    from effbench.runner import RunOptions, _measure

    log = []
    fake = FakeCuda(log)
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats", "memory_allocated", "memory_reserved",
                 "max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: log.append(f"set_device {torch.device(d)}"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"uuid": "abcd"})())
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    import effbench.measure.timing as timing_mod
    monkeypatch.setattr(timing_mod, "l2_flush", lambda device, cuda: lambda: log.append(f"l2 flush {device}"))

    class Nvml(FakeNvml):
        def nvmlShutdown(self):
            log.append("nvmlShutdown")

    nvml = Nvml()
    monkeypatch.setattr(memory_mod, "load_nvml", lambda: nvml)
    real_prepare = workload_mod.prepare
    monkeypatch.setattr(workload_mod, "prepare", lambda case, device=None: real_prepare(case, "cpu"))

    row = {}
    case = Case(mechanism="sdpa", n=64, heads=2, head_dim=16, device="cuda:1")
    _measure(case, RunOptions(warmup=1, repeats=3, predict=False), row.update)
    assert row["status"] == "ok"
    assert log[0] == "set_device cuda:1"
    assert (row["peak_alloc_bytes"], row["peak_reserved_bytes"]) == (1000, 2000)  # from FakeCuda's script
    assert row["timer"] == "cuda-events+l2-flush" and row["repeats"] == 3
    assert log.count("l2 flush cuda:1") == 3  # once before each timed sample
    assert row["ops"] > 0  # the ops the tracked call dispatched
    assert row["nvml_peak_bytes"] == 0 and row["readings"] == "time+tracker+cuda-allocator+nvml+flops"
    assert row["peak_tensor_bytes"] > 0 and row["flops"] == 4 * 2 * 64 * 64 * 16
    assert log[-1] == "nvmlShutdown" and "rss_peak_bytes" not in row

    log.clear()
    warm = {}
    _measure(case, RunOptions(warmup=1, repeats=3, predict=False, flush_l2=False), warm.update)  # --no-flush-l2
    assert warm["timer"] == "cuda-events+l2-warm" and not any(e.startswith("l2 flush") for e in log)


def test_matmul_precision_is_what_torch_has_in_force():
    """The sidecar's matmul precision follows torch's setting (here changed and restored)."""
    from effbench.measure.env import matmul_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert matmul_precision()["float32_matmul_precision"] == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    got = matmul_precision()
    assert got["float32_matmul_precision"] == before
    assert got["cuda_matmul_allow_tf32"] is bool(torch.backends.cuda.matmul.allow_tf32)
