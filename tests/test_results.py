"""The results file: round trip, torn lines, header widening, refusing foreign files, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from effbench import results
from effbench.cases import Case
from effbench.results import CaseResult
from effbench.status import Status
from effbench.sweep import case_row, make_row

PLUGIN = str(Path(__file__).parent / "plugins" / "faulty.py")


def _row(n, **kw):
    row = case_row(Case(mechanism="dense", n=n))
    row.update(status="ok", time_ms_median=1.5, time_ms_iqr=0.25, repeats=3, peak_tensor_bytes=n * n * 8,
               flops=4 * n * n * 64 * 8, error=None, run_id="r1")
    row.update(kw)
    return row


def test_round_trip(tmp_path):
    path = tmp_path / "r.csv"
    w = results.ResultsWriter(path)
    w.append(_row(256))
    w.append(_row(512, status="error", error='ValueError: a "quoted", comma'))
    df = results.read_results(path)
    assert list(df["n"]) == [256, 512]
    assert df["peak_tensor_bytes"].iloc[1] == 512 * 512 * 8
    assert df["causal"].iloc[0] is False or df["causal"].iloc[0] == False  # noqa: E712
    assert df["error"].iloc[1] == 'ValueError: a "quoted", comma'
    assert df["time_ms_median"].iloc[0] == 1.5
    assert set(results.columns()) <= set(df.columns)


def test_torn_last_line_is_ignored_and_cut_before_append(tmp_path):
    path = tmp_path / "r.csv"
    w = results.ResultsWriter(path)
    w.append(_row(256))
    with open(path, "a") as fh:
        fh.write("deadbeef,dense,exact,51")  # killed mid-write
    assert len(results.read_results(path)) == 1
    w2 = results.ResultsWriter(path)
    w2.append(_row(1024))
    df = results.read_results(path)
    assert list(df["n"]) == [256, 1024]


def test_header_widened_without_touching_rows(tmp_path):
    path = tmp_path / "r.csv"
    w = results.ResultsWriter(path)
    w.append(_row(256))
    w2 = results.ResultsWriter(path, extra_knobs=["my_plugin_knob"])
    row = _row(512)
    row["my_plugin_knob"] = 7
    w2.append(row)
    df = results.read_results(path)
    assert list(df["n"]) == [256, 512]
    assert df["my_plugin_knob"].isna().iloc[0] and df["my_plugin_knob"].iloc[1] == 7


def test_foreign_files_refused(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(results.ResultsError, match="not an effbench results CSV"):
        results.read_results(other)
    with pytest.raises(results.ResultsError, match="not found"):
        results.read_results(tmp_path / "missing.csv")
    with pytest.raises(results.ResultsError, match="not an effbench"):
        results.ResultsWriter(other)


def test_sigkilled_sweep_resumes_to_the_same_rows_without_duplicates(tmp_path):
    out = tmp_path / "r.csv"
    args = [sys.executable, "-m", "effbench", "sweep", "--plugin", PLUGIN, "--mech", "plant-slow,sdpa",
            "--n", "16,32,64,128", "--heads", "1", "--head-dim", "8", "--repeats", "1", "--warmup", "0",
            "--device", "cpu", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 4:  # header + 3 rows
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = results.read_results(out)
    assert 3 <= len(before) < 8
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = results.read_results(out)
    assert len(after) == 8 and after["case_key"].is_unique
    assert (after["status"] == "ok").all()
    # the rows written before the kill are untouched
    assert after.iloc[: len(before)].drop(columns=[]).equals(before)
    # a second resume runs nothing
    again = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert len(results.read_results(out)) == 8


def test_unreadable_sidecar_is_kept_aside_not_lost(tmp_path):
    out = tmp_path / "r.csv"
    side = results.sidecar_path(out)
    side.write_text('{"runs": [{"run_id": "old"')  # torn JSON
    results.append_run(out, {"run_id": "new"})
    data = json.loads(side.read_text())
    assert [r["run_id"] for r in data["runs"]] == ["new"] and "r.json.bad" in data["note"]
    assert side.with_name(side.name + ".bad").read_text() == '{"runs": [{"run_id": "old"'
    assert not side.with_name(side.name + ".tmp").exists()


def test_knob_columns_come_back_with_their_types(tmp_path):
    from effbench.cases import Case
    from effbench.sweep import case_row

    writer = results.ResultsWriter(tmp_path / "r.csv", extra_knobs={"window", "redraw", "features"})
    for case in (Case(mechanism="local", n=64, knobs=(("window", 8),)),
                 Case(mechanism="performer", n=64, knobs=(("features", 16), ("redraw", True))),
                 Case(mechanism="dense", n=64)):
        writer.append({**case_row(case), "status": "ok"})
    df = results.read_results(tmp_path / "r.csv").set_index("mechanism")
    assert str(df["window"].dtype) == "Int64" and df.at["local", "window"] == 8  # not 8.0
    assert str(df["redraw"].dtype) == "boolean" and bool(df.at["performer", "redraw"]) is True
    assert pd.isna(df.at["dense", "window"]) and pd.isna(df.at["dense", "redraw"])


def test_typed_rows_write_every_result_column_and_read_back(tmp_path):
    path = tmp_path / "r.csv"
    row = make_row(Case(mechanism="local", n=64, knobs=(("window", 8),)),
                   CaseResult(status=Status.OK, time_ms_median=2.0, wall_s=0.5, run_id="r1"))
    assert (row.mechanism, row.n, row.status) == ("local", 64, Status.OK)
    assert row.get("window") == 8 and row.get("wall_s") == 0.5 and row.get("rounds") is None
    with pytest.raises(KeyError):
        row["rounds"]  # not a knob of local
    with pytest.raises(AttributeError):
        row.result.input_bytes = 1
    results.ResultsWriter(path).append(row)
    df = results.read_results(path)
    assert df["wall_s"].iloc[0] == 0.5 and df["status"].iloc[0] == Status.OK and df["window"].iloc[0] == 8
    assert results.done_statuses(path) == {row.case_key: Status.OK}


def test_a_file_without_wall_s_is_widened_and_an_unknown_status_refused(tmp_path):
    path = tmp_path / "r.csv"
    old = [c for c in results.columns() if c != "wall_s"]
    path.write_text(",".join(old) + "\n")
    w = results.ResultsWriter(path)
    assert w.columns[-1] == "wall_s"
    w.append(make_row(Case(mechanism="dense", n=8), CaseResult(status=Status.OK, wall_s=1.25)))
    assert results.read_results(path)["wall_s"].iloc[0] == 1.25
    w.append({"case_key": "x", "mechanism": "dense", "n": 9, "status": "fine"})
    with pytest.raises(results.ResultsError, match="unknown status 'fine'"):
        results.read_results(path)
