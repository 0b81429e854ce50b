"""`effbench profile` and `effbench doctor` through the CLI: files written, exit codes, one-line errors."""

import json

from typer.testing import CliRunner

from effbench.cli import app

runner = CliRunner()


def test_profile_writes_trace_ops_and_timeline(tmp_path):
    out = tmp_path / "prof"
    r = runner.invoke(app, ["profile", "--mech", "dense", "--n", "256", "--heads", "2", "--head-dim", "16",
                            "--repeats", "1", "--out", str(out)], terminal_width=200)
    assert r.exit_code == 0, r.output
    for name in ("trace.json", "ops.md", "memory_timeline.csv", "memory_timeline.png", "memory_timeline.svg"):
        assert (out / name).is_file(), name
    trace = json.loads((out / "trace.json").read_text())
    assert any(str(e.get("name", "")).startswith("aten::") for e in trace["traceEvents"])
    assert "tracked peak" in r.output and "one N×N score tensor" in r.output


def test_profile_of_an_unsupported_case_is_a_skipped_report_and_exit_1(tmp_path):
    r = runner.invoke(app, ["profile", "--mech", "linformer", "--causal", "--n", "128", "--out", str(tmp_path / "p")])
    assert r.exit_code == 1 and "skipped" in r.output and "not causal" in r.output
    assert not (tmp_path / "p" / "trace.json").exists()


def test_profile_bad_input_is_one_line():
    for args, needle in ((["profile", "--mech", "dense,local", "--n", "64"], "profile runs one case"),
                         (["profile", "--mech", "nope"], "unknown mechanism 'nope'"),
                         (["profile", "--mech", "dense", "--n", "64,128"], "profile runs one case"),
                         (["profile", "--timeout", "-1"], "--timeout must be positive")):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert needle in " ".join(r.output.split()) and "Traceback" not in r.output


def test_doctor_on_this_machine_passes():
    r = runner.invoke(app, ["doctor", "--device", "cpu"], terminal_width=220)
    assert r.exit_code == 0, r.output
    assert "tracker" in r.output and "flops" in r.output and "no CUDA device" in r.output
