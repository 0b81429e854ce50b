"""Every way a case can end becomes a row; the sweep goes on; the OOM frontier holds."""

from pathlib import Path

import pytest

from effbench import results
from effbench.cases import Case
from effbench.plugins import load_plugin
from effbench.runner import RunOptions, run_case
from effbench.sweep import run_sweep

PLUGIN = str(Path(__file__).parent / "plugins" / "faulty.py")


@pytest.fixture(scope="module", autouse=True)
def planted():
    load_plugin(PLUGIN)


def _opts(**kw):
    base = dict(warmup=0, repeats=1, timeout=20, plugins=(PLUGIN,))
    base.update(kw)
    return RunOptions(**base)


def test_fault_rows_beside_an_ok_row(tmp_path):
    out = tmp_path / "r.csv"
    cases = [Case(mechanism=m, n=64, heads=2, head_dim=16)
             for m in ("plant-killed", "plant-hang", "plant-oom", "plant-cpu-oom", "plant-error", "sdpa")]
    report = run_sweep(cases, _opts(timeout=4), out)
    status = {r["mechanism"]: r for r in report.rows}
    assert status["plant-killed"]["status"] == "killed" and "SIGKILL" in status["plant-killed"]["error"]
    assert status["plant-hang"]["status"] == "timeout"
    assert status["plant-oom"]["status"] == "oom" and "OutOfMemoryError" in status["plant-oom"]["error"]
    cpu = status["plant-cpu-oom"]  # the CPU allocator raises RuntimeError, recognised by its message
    assert cpu["status"] == "oom" and "can't allocate memory" in cpu["error"] and "\n" not in cpu["error"]
    assert status["plant-error"]["status"] == "error"
    assert status["plant-error"]["error"] == "ValueError: something went wrong"  # one line
    ok = status["sdpa"]
    assert ok["status"] == "ok" and ok["peak_tensor_bytes"] > 0 and ok["flops"] == 4 * 2 * 64 * 64 * 16
    df = results.read_results(out)
    assert len(df) == 6 and set(df["status"]) == {"killed", "timeout", "oom", "error", "ok"}


def test_oom_frontier_records_larger_n_without_running(tmp_path):
    calls = []

    def fake_runner(case, opts):
        calls.append(case.n)
        return {"status": "oom", "error": "OutOfMemoryError: planted"} if case.n >= 2048 else {"status": "ok"}

    cases = [Case(mechanism="dense", n=n) for n in (4096, 1024, 2048, 8192)]
    report = run_sweep(cases, _opts(), tmp_path / "r.csv", runner=fake_runner)
    assert calls == [1024, 2048]
    by_n = {r["n"]: r for r in report.rows}
    assert by_n[2048]["status"] == "oom"
    for n in (4096, 8192):
        assert by_n[n]["status"] == "predicted_oom" and "OOM frontier" in by_n[n]["error"]


def test_unsupported_case_is_a_skipped_row():
    # the knob check runs in the child: an unknown knob value is reported, not raised
    r = run_case(Case(mechanism="dense", n=64, knobs=(("window", 3),)), _opts())
    assert r["status"] == "skipped" and "no knob" in r["error"]


def test_memory_budget_gives_predicted_oom_fast():
    r = run_case(Case(mechanism="dense", n=16384), _opts(mem_budget=2**30))
    assert r["status"] == "predicted_oom"
    assert r["predicted_bytes"] >= 2 * 8 * 16384**2 * 4
    assert "time_ms_median" not in r


def test_resume_keeps_the_oom_frontier(tmp_path):
    out = tmp_path / "r.csv"

    def first(case, opts):
        return {"status": "oom", "error": "OutOfMemoryError: planted"} if case.n >= 2048 else {"status": "ok"}

    run_sweep([Case(mechanism="dense", n=n) for n in (1024, 2048)], _opts(), out, runner=first)
    calls = []

    def second(case, opts):
        calls.append(case.n)
        return {"status": "ok"}

    report = run_sweep([Case(mechanism="dense", n=n) for n in (1024, 2048, 4096)], _opts(), out, resume=True,
                       runner=second)
    assert calls == [] and report.resumed == 2
    (row,) = report.rows
    assert row["n"] == 4096 and row["status"] == "predicted_oom" and "oom at n=2048" in row["error"]
