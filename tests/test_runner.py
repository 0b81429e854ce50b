"""Every way a case can end becomes a row; the sweep goes on; the OOM frontier holds."""

from pathlib import Path

import pytest

from effbench import results
from effbench.cases import Case
from effbench.plugins import load_plugin
from effbench.results import CaseResult
from effbench.runner import RunOptions, run_case
from effbench.status import Status
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
    status = {r.mechanism: r for r in report.rows}
    assert status["plant-killed"]["status"] == "killed" and "SIGKILL" in status["plant-killed"]["error"]
    assert status["plant-hang"]["status"] == "timeout"
    assert status["plant-oom"]["status"] == "oom" and "OutOfMemoryError" in status["plant-oom"]["error"]
    cpu = status["plant-cpu-oom"]  # the CPU allocator raises RuntimeError, recognised by its message
    assert cpu["status"] == "oom" and "can't allocate memory" in cpu["error"] and "\n" not in cpu["error"]
    assert status["plant-error"]["status"] == "error"
    assert status["plant-error"]["error"] == "ValueError: something went wrong"  # one line
    ok = status["sdpa"]
    assert ok.status is Status.OK and ok["peak_tensor_bytes"] > 0 and ok["flops"] == 4 * 2 * 64 * 64 * 16
    assert 0 < ok.get("wall_s") < 20  # the child's wall time is a column, not dropped
    df = results.read_results(out)
    assert len(df) == 6 and set(df["status"]) == {"killed", "timeout", "oom", "error", "ok"}
    assert set(df["status"]) == {Status.KILLED, Status.TIMEOUT, Status.OOM, Status.ERROR, Status.OK}
    assert df["wall_s"].notna().all()


def test_oom_frontier_records_larger_n_without_running(tmp_path):
    calls = []

    def fake_runner(case, opts):
        calls.append(case.n)
        return (CaseResult(status=Status.OOM, error="OutOfMemoryError: planted") if case.n >= 2048
                else CaseResult(status=Status.OK))

    cases = [Case(mechanism="dense", n=n) for n in (4096, 1024, 2048, 8192)]
    report = run_sweep(cases, _opts(), tmp_path / "r.csv", runner=fake_runner)
    assert calls == [1024, 2048]
    by_n = {r.n: r for r in report.rows}
    assert by_n[2048]["status"] == "oom"
    for n in (4096, 8192):
        assert by_n[n]["status"] == "predicted_oom" and "OOM frontier" in by_n[n]["error"]


def test_unsupported_case_is_a_skipped_row():
    # the knob check runs in the child: an unknown knob value is reported, not raised
    r = run_case(Case(mechanism="dense", n=64, knobs=(("window", 3),)), _opts())
    assert r.status is Status.SKIPPED and "no knob" in r.error


def test_memory_budget_gives_predicted_oom_fast():
    r = run_case(Case(mechanism="dense", n=16384), _opts(mem_budget=2**30))
    assert r.status == "predicted_oom"
    assert r.predicted_bytes >= 2 * 8 * 16384**2 * 4
    assert r.time_ms_median is None


def test_resume_keeps_the_oom_frontier(tmp_path):
    out = tmp_path / "r.csv"

    def first(case, opts):
        return (CaseResult(status=Status.OOM, error="OutOfMemoryError: planted") if case.n >= 2048
                else CaseResult(status=Status.OK))

    run_sweep([Case(mechanism="dense", n=n) for n in (1024, 2048)], _opts(), out, runner=first)
    calls = []

    def second(case, opts):
        calls.append(case.n)
        return CaseResult(status=Status.OK)

    report = run_sweep([Case(mechanism="dense", n=n) for n in (1024, 2048, 4096)], _opts(), out, resume=True,
                       runner=second)
    assert calls == [] and report.resumed == 2
    (row,) = report.rows
    assert row.n == 4096 and row.status is Status.PREDICTED_OOM and "oom at n=2048" in row.get("error")


def test_results_and_rows_refuse_unknown_fields():
    r = CaseResult(status="ok")
    assert r.status is Status.OK
    with pytest.raises(AttributeError):
        r.input_bytes = 1  # not a result column
    with pytest.raises(results.ResultsError, match="predict_error"):
        r.update(predict_error="x", flops=3)
    assert r.flops is None  # nothing set when one name is unknown
    with pytest.raises(ValueError, match="unknown status"):
        CaseResult(status="fine")


def test_an_unknown_field_reported_by_a_stage_fails_the_case_by_name(monkeypatch):
    from effbench import runner

    monkeypatch.setattr(runner, "_report_build", lambda w, report: report({"input_bytes": 5}))
    r = runner.measure_in_process(Case(mechanism="dense", n=16, heads=1, head_dim=8), _opts(predict=False))
    assert r.status is Status.ERROR and r.error == "ResultsError: not result columns: input_bytes"


@pytest.mark.parametrize("mechanism", ["plant-lazy", "plant-lazy-dict"])
def test_prediction_of_a_mechanism_that_builds_state_on_its_first_call(monkeypatch, mechanism):
    """A prediction tracks the first forward call and keeps it only when it left nothing behind; a mechanism that
    builds a table on its first call is tracked again, so the prediction is a warm call's peak, the one measured."""
    from effbench import runner

    tracked = []
    original = runner._tracked_and_counted

    def counting(call, backward):
        tracked.append(backward)
        return original(call, backward)

    monkeypatch.setattr(runner, "_tracked_and_counted", counting)
    case = Case(mechanism=mechanism, n=257, batch=2, heads=2, head_dim=16)
    row = runner.measure_in_process(case, _opts(warmup=1))
    assert row.status == Status.OK, row.error
    assert len(tracked) == 2  # the cold call was the warm-up
    output = 2 * 2 * 257 * 16 * 4
    assert row.predicted_bytes == row.peak_tensor_bytes == output  # the table (257·64 floats) is not in the peak
    tracked.clear()
    assert runner.predict(Case(mechanism="sdpa", n=257, batch=2, heads=2, head_dim=16)).predicted_bytes > 0
    assert len(tracked) == 1  # a call that leaves nothing behind is its own warm-up
