"""`effbench profile`'s engine: one case in the runner's child, its trace, op tables and exact memory timeline."""

import json
from pathlib import Path

import pytest
import torch

from effbench.cases import Case
from effbench.figure_base import save_figure
from effbench.measure.memory import StorageTracker, TimelineTracker, track, tracked_peak
from effbench.plugins import load_plugin
from effbench.profile import (ProfileOptions, count_ops, memory_snapshot, profile_in_process, read_csv,
                              record_timeline, run_profile)
from effbench.profile import run as run_mod
from effbench.profile import timeline as timeline_mod
from effbench.runner import RunOptions, run_case
from effbench.status import Status
from effbench.workload import prepare

B, H, N, D = 1, 2, 2048, 32
NN = B * H * N * N * 4  # one fp32 N×N score tensor: 32 MiB
OUT = B * H * N * D * 4  # one (B, H, N, D) fp32 tensor: the attention output
FAULTY = str(Path(__file__).parent / "plugins" / "faulty.py")


def _case(mech, **kw):
    return Case(mechanism=mech, n=kw.pop("n", N), batch=B, heads=H, head_dim=D, **kw)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    return run_profile(_case("dense"), out, warmup=1, repeats=2, threads=2, timeout=120)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return run_profile(_case("local"), out, warmup=1, repeats=1, threads=2, timeout=120)


def test_dense_peak_is_the_nn_scores_and_probabilities(dense):
    assert dense.status is Status.OK, dense.error
    assert dense.nn_bytes == NN
    # dense: s = (q·scale) @ kᵀ, p = softmax(s), out = p @ v. q·scale (OUT bytes) is freed once s exists; the peak
    # is reached by the second bmm, whose output appears while the scores and the probabilities are both alive.
    assert dense.nn_alive_at_peak == 2
    assert dense.peak.op in ("aten::_softmax", "aten::bmm")
    assert dense.peak.bytes == dense.nn_alive_at_peak * NN + OUT
    assert dense.peak.op == "aten::bmm" and dense.peak.output_shapes == ((B * H, N, D),)
    assert dense.peak.allocated == OUT
    assert dense.peak_ratio == pytest.approx(2 + OUT / NN)


def test_dense_timeline_max_is_the_sweep_rows_peak_tensor_bytes(dense):
    rows = read_csv(dense.out_dir / "memory_timeline.csv")
    assert list(rows[0]) == ["op_index", "op", "output_shape", "bytes_allocated", "live_bytes"]
    assert [r["op_index"] for r in rows] == list(range(len(rows))) and len(rows) == dense.ops_count
    live = [r["live_bytes"] for r in rows]
    assert max(live) == dense.peak.bytes and live.index(max(live)) == dense.peak.index
    # the two N×N tensors appear where the first bmm and the softmax allocate them
    big = [r for r in rows if r["bytes_allocated"] == NN]
    assert [r["op"] for r in big] == ["aten::bmm", "aten::_softmax"]
    assert big[0]["output_shape"] == f"{B * H}x{N}x{N}" and big[1]["output_shape"] == f"{B}x{H}x{N}x{N}"
    row = run_case(_case("dense"), RunOptions(warmup=0, repeats=1, time=False, measure_flops=False, predict=False,
                                              timeout=120))
    assert row.status is Status.OK
    assert max(live) == row.peak_tensor_bytes


def test_local_stays_far_below_the_nn_line(local):
    assert local.status is Status.OK, local.error
    assert local.nn_bytes == NN and local.nn_alive_at_peak == 0
    assert 0 < local.peak.bytes < 0.25 * NN
    rows = read_csv(local.out_dir / "memory_timeline.csv")
    assert max(r["live_bytes"] for r in rows) == local.peak.bytes
    assert all(r["bytes_allocated"] < NN for r in rows)


def test_trace_ops_md_and_figures_are_written(dense):
    names = [p.name for p in dense.files]
    assert names == ["memory_timeline.csv", "memory_timeline.png", "memory_timeline.svg", "trace.json", "ops.md"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in dense.files)
    events = json.loads((dense.out_dir / "trace.json").read_text())["traceEvents"]
    ops = {e.get("name") for e in events}
    assert {"aten::bmm", "aten::_softmax"} <= ops
    assert sum(e.get("name") == "effbench::call" for e in events if e.get("ph") == "X") == dense.repeats == 2
    md = (dense.out_dir / "ops.md").read_text()
    assert "## Top ops by self CPU time" in md and "## Top ops by memory allocated (self CPU memory)" in md
    assert "| aten::_softmax |" in md and "2 of them alive at the peak" in md
    assert (dense.out_dir / "memory_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (dense.out_dir / "memory_snapshot.pickle").exists()  # CUDA only


def test_op_tables(dense):
    assert (dense.time_key, dense.memory_key) == ("self_cpu_ms", "self_cpu_bytes")
    t = [r["self_cpu_ms"] for r in dense.ops_by_time]
    assert t == sorted(t, reverse=True) and 0 < len(t) <= 20
    assert dense.ops_by_time[0]["op"] in ("aten::bmm", "aten::_softmax")
    by_mem = {r["op"]: r for r in dense.ops_by_memory}
    # per call, the profiler sees the same allocations as the tracker: softmax one N×N, the two bmms N×N + out
    assert by_mem["aten::_softmax"]["self_cpu_bytes"] == NN and by_mem["aten::_softmax"]["calls"] == 1
    assert by_mem["aten::bmm"]["self_cpu_bytes"] == NN + OUT and by_mem["aten::bmm"]["calls"] == 2
    assert "effbench::call" not in by_mem


def test_unsupported_case_is_skipped_and_writes_nothing(tmp_path):
    rep = run_profile(_case("linformer", n=256, causal=True), tmp_path, timeout=60)
    assert rep.status is Status.SKIPPED and rep.error and "causal" in rep.error.lower()
    assert rep.files == [] and not (tmp_path / "trace.json").exists() and list(tmp_path.iterdir()) == []


def test_failures_come_back_as_statuses(tmp_path):
    load_plugin(FAULTY)

    def prof(mech, **kw):
        return run_profile(Case(mechanism=mech, n=64, heads=2, head_dim=16), tmp_path / mech, warmup=0,
                           plugins=(FAULTY,), **kw)

    killed = prof("plant-killed", timeout=30)
    assert killed.status is Status.KILLED and "SIGKILL" in killed.error
    hang = prof("plant-hang", timeout=2)
    assert hang.status is Status.TIMEOUT and "timeout" in hang.error
    oom = prof("plant-cpu-oom", timeout=30)
    assert oom.status is Status.OOM and "can't allocate memory" in oom.error
    assert oom.nn_bytes == 64 * 64 * 2 * 4  # stages report as they finish: reported before the call failed


def test_predicted_oom_with_a_budget(tmp_path):
    rep = run_profile(_case("dense", n=16384), tmp_path, mem_budget=2**30, timeout=60)
    assert rep.status is Status.PREDICTED_OOM and "budget" in rep.error and rep.files == []


# ------------------------------------------------------------------- in process: the pieces

SMALL = Case(mechanism="dense", n=128, heads=2, head_dim=16)


def test_timeline_tracker_counts_exactly_as_the_storage_tracker():
    q = torch.randn(1, 1, 8, 8)
    # the first dispatch-mode pass in a cold process can read more (lazy set-up); the fork server warms its
    # children the same way, so every tracker pass below is a warm one, as in a sweep's child
    tracked_peak(lambda: torch.softmax(q @ q.transpose(-1, -2), -1) @ q)
    for case in (SMALL, Case(mechanism="local", n=300, heads=2, head_dim=16, knobs=(("window", 37),)),
                 Case(mechanism="dense", n=96, heads=2, head_dim=16, mode="fwd+bwd")):
        w = prepare(case)
        w.call()
        rec, _ = track(w.call, TimelineTracker())
        plain, _ = track(w.call, StorageTracker())
        assert rec.peak == plain.peak == tracked_peak(w.call)[0] == max(r.live_bytes for r in rec.ops)
        assert rec.allocations == plain.allocations
        assert record_timeline(w.call).ops == rec.ops  # the same call twice: the same timeline
        assert count_ops(w.call).total == len(rec.ops)


def test_figure_is_byte_stable(tmp_path):
    w = prepare(SMALL)
    w.call()
    nn = timeline_mod.nn_bytes(SMALL)
    assert nn == 2 * 128 * 128 * 4
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        paths.append(save_figure(timeline_mod.draw(SMALL, record_timeline(w.call), nn), tmp_path / name,
                                 ["png", "svg"]))
    first, second = paths
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
    svg = first[1].read_text()
    assert "one N×N score tensor" in svg and "aten::bmm" in svg


class FakeCudaMemory:
    def __init__(self, log):
        self.log = log

    def _record_memory_history(self, enabled="all", **kw):
        self.log.append(("record", enabled, kw.get("max_entries")))

    def _dump_snapshot(self, filename="dump_snapshot.pickle"):
        self.log.append(("dump", filename))
        Path(filename).write_bytes(b"fake snapshot")


def test_memory_snapshot_follows_the_cuda_memory_notes(tmp_path):
    log = []
    fake = type("Cuda", (), {"memory": FakeCudaMemory(log)})()
    path = memory_snapshot(lambda: log.append("call"), tmp_path / "s.pickle", cuda=fake)
    assert log == [("record", "all", 100_000), "call", ("dump", str(tmp_path / "s.pickle")), ("record", None, None)]
    assert path.read_bytes() == b"fake snapshot"
    log.clear()

    def fails():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        memory_snapshot(fails, tmp_path / "t.pickle", cuda=fake)
    assert log == [("record", "all", 100_000), ("record", None, None)]  # recording stopped, nothing dumped


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_cuda_profile_path_with_a_fake_torch_cuda(tmp_path, monkeypatch):
    """The whole CUDA path on the CPU: torch.cuda faked, the workload built on the CPU (as tests/test_measure.py
    does for the sweep). The snapshot is taken around one call, after the trace; the tables sort on CUDA columns."""
    import effbench.workload as workload_mod

    log = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: log.append(f"set_device {torch.device(d)}"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: log.append("synchronize"))
    fake_memory = FakeCudaMemory(log)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", fake_memory._record_memory_history)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", fake_memory._dump_snapshot)
    real_prepare = workload_mod.prepare
    monkeypatch.setattr(workload_mod, "prepare", lambda case, device=None: real_prepare(case, "cpu"))
    calls = []
    real_snapshot = run_mod.memory_snapshot
    monkeypatch.setattr(run_mod, "memory_snapshot",
                        lambda call, path: real_snapshot(lambda: calls.append("snap") or call(), path))

    case = Case(mechanism="dense", n=64, heads=2, head_dim=16, device="cuda:1")
    rep = profile_in_process(case, tmp_path, ProfileOptions(warmup=1, repeats=1))
    assert rep.status is Status.OK, rep.error
    assert log[0] == "set_device cuda:1" and "synchronize" in log
    assert log[-3:] == [("record", "all", 100_000), ("dump", str(tmp_path / "memory_snapshot.pickle")),
                        ("record", None, None)] and calls == ["snap"]
    assert [p.name for p in rep.files][-1] == "memory_snapshot.pickle"
    assert (rep.time_key, rep.memory_key) == ("self_cuda_ms", "self_cuda_bytes")
    assert "## Top ops by self CUDA time" in (tmp_path / "ops.md").read_text()
