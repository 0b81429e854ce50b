"""The CLI through typer's CliRunner: happy paths and one clean line for every bad input."""

from pathlib import Path

import pytest
from helpers import cli_fails
from typer.testing import CliRunner

from effbench import results
from effbench.cli import app

runner = CliRunner()
_fails = cli_fails
PLUGIN = str(Path(__file__).parent / "plugins" / "faulty.py")


def test_list_shows_registry():
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0
    assert "dense" in r.output and "sdpa" in r.output


def test_list_with_plugin():
    r = runner.invoke(app, ["list", "--plugin", PLUGIN])
    assert r.exit_code == 0 and "plant-oom" in r.output


@pytest.mark.parametrize("args,needles", [
    (["sweep", "--mech", "nope"], ["unknown mechanism 'nope'", "dense"]),
    (["sweep", "--mech", "dense", "--n", "12x"], ["--n", "'12x' is not a whole number"]),
    (["sweep", "--mech", "dense", "--n", "0"], ["below the minimum"]),
    (["sweep", "--mech", "dense", "--n", "-5"], ["--n: -5 is below the minimum 1"]),
    (["sweep", "--mech", "dense", "--dtype", "float8"], ["--dtype 'float8' is not one of"]),
    (["sweep", "--mech", "dense", "--mode", "bwd"], ["--mode 'bwd'"]),
    (["sweep", "--mech", "dense", "--device", "cuda"], ["no CUDA GPU"]),
    (["sweep", "--mech", "dense", "--device", "tpu"], ["choose auto, cpu or cuda"]),
    (["sweep", "--mech", "dense", "--mem-budget", "lots"], ["--mem-budget 'lots' does not parse"]),
    (["sweep", "--mech", "dense", "--window", "8"], ["--window given but no selected mechanism takes it"]),
    (["sweep", "--mech", "dense", "--batch", "0"], ["--batch must be a positive integer"]),
    (["sweep", "--mech", "dense", "--knob", "oops"], ["NAME=V1,V2"]),
    (["sweep", "--plugin", "/no/such/plugin.py"], ["plugin file not found"]),
    (["estimate", "--mech", "dense", "--n", "a,b"], ["not a whole number"]),
    (["estimate", "--mech", "dense", "--timeout", "-1"], ["--timeout must be positive"]),
    (["sweep", "--mech", "dense", "--timeout", "0"], ["--timeout must be positive"]),
    (["sweep", "--mech", "dense", "--min-time", "-1"], ["--min-time must be positive"]),
    (["sweep", "--mech", "dense", "--threads", "0"], ["--threads must be at least 1, got 0"]),
    (["verify", "--mech", "dense", "--threads", "-1"], ["--threads must be at least 1, got -1"]),
    (["sweep", "--mech", "dense", "--repeats", "0"], ["--repeats must be at least 1, got 0"]),
    (["sweep", "--mech", "dense", "--warmup", "-1"], ["--warmup must be 0 or more, got -1"]),
])
def test_bad_input_one_line_exit_2(args, needles):
    _fails(args, *needles)


def test_resume_refuses_foreign_file(tmp_path):
    other = tmp_path / "x.csv"
    other.write_text("a,b\n1,2\n")
    _fails(["sweep", "--mech", "dense", "--n", "16", "--out", str(other), "--resume"], "not an effbench results CSV")


def test_sweep_writes_rows_and_sidecar(tmp_path):
    out = tmp_path / "r.csv"
    r = runner.invoke(app, ["sweep", "--mech", "dense,sdpa", "--n", "64,128", "--heads", "2", "--head-dim", "16",
                            "--repeats", "2", "--warmup", "0", "--out", str(out), "--causal"])
    assert r.exit_code == 0, r.output
    df = results.read_results(out)
    assert len(df) == 4 and (df["status"] == "ok").all() and df["causal"].all()
    assert (df["time_ms_median"] > 0).all() and (df["repeats"] == 2).all()
    assert (df["flops"] == 4 * 2 * df["n"] ** 2 * 16).all()
    assert set(df["flops_source"]) == {"FlopCounterMode"}
    assert (df["ops"] > 0).all() and df.groupby("mechanism")["ops"].nunique().eq(1).all()  # same ops at 64 and 128
    side = results.sidecar_path(out).read_text()
    assert '"torch"' in side and '"command"' in side and '"nvml": false' in side
    assert '"float32_matmul_precision": "highest"' in side and '"cuda_matmul_allow_tf32": false' in side
    assert "written to" in r.output


def test_estimate_prints_predictions(tmp_path):
    out = tmp_path / "e.csv"
    r = runner.invoke(app, ["estimate", "--mech", "dense,sdpa", "--n", "131072", "--out", str(out)])
    assert r.exit_code == 0, r.output
    df = results.read_results(out).set_index("mechanism")
    assert df.loc["dense", "predicted_bytes"] >= 512 * 2**30
    assert df.loc["sdpa", "predicted_bytes"] < 2**30
    assert "TiB" in r.output


def test_predicted_oom_under_budget(tmp_path):
    out = tmp_path / "r.csv"
    r = runner.invoke(app, ["sweep", "--mech", "dense", "--n", "16384", "--mem-budget", "1GiB", "--out", str(out)])
    assert r.exit_code == 0, r.output
    df = results.read_results(out)
    assert list(df["status"]) == ["predicted_oom"]


def test_plot_reads_a_sweep_and_refuses_other_files(tmp_path):
    out = tmp_path / "r.csv"
    r = runner.invoke(app, ["sweep", "--mech", "dense,local", "--n", "256,512,1024", "--heads", "1", "--head-dim", "16",
                            "--window", "16", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    figs = tmp_path / "figs"
    r = runner.invoke(app, ["plot", str(out), "--out", str(figs), "--format", "png,svg", "--budget", "1GiB"])
    assert r.exit_code == 0, r.output
    for name in ("memory_vs_n.png", "memory_vs_n.svg", "time_vs_n.png", "summary.md", "slopes.csv"):
        assert (figs / name).exists(), name
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    _fails(["plot", str(other)], "not an effbench results CSV")
    _fails(["plot", str(tmp_path / "missing.csv")], "not found")
    _fails(["plot", str(out), "--budget", "much"], "--budget 'much' does not parse")
    _fails(["plot", str(out), "--format", "gif9"], "gif9")


def test_axis_options_come_from_the_knobs():
    """One --<axis> option on sweep and estimate per axis a registered knob declares: no list in the CLI."""
    import mechanisms

    axes = mechanisms.axis_knobs()
    assert {"window", "rounds", "features", "segment"} <= set(axes)
    for command in ("sweep", "estimate"):
        r = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert r.exit_code == 0
        for axis in axes:
            assert f"--{axis.replace('_', '-')}" in r.output, (command, axis)


def test_an_axis_feeds_only_its_mechanisms(tmp_path):
    out = tmp_path / "e.csv"
    r = runner.invoke(app, ["estimate", "--mech", "local,dense", "--n", "512", "--window", "16,32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    df = results.read_results(out)
    assert sorted(df[df.mechanism == "local"]["window"].tolist()) == [16, 32]
    assert len(df[df.mechanism == "dense"]) == 1


def test_tables_stay_one_row_per_line_in_a_log_file(tmp_path):
    """Output redirected to a file is laid out wide, not wrapped at rich's default 80 columns."""
    import subprocess
    import sys

    log = tmp_path / "list.log"
    with log.open("w") as fh:
        subprocess.run([sys.executable, "-m", "effbench", "list"], stdout=fh, check=True, timeout=120)
    lines = log.read_text().splitlines()
    row = next(line for line in lines if "transformer-xl" in line)
    assert "O(N·(L+M)·D)" in row and "segment=128 (--segment)" in row and "memory=128 (--memory)" in row
    assert max(len(line) for line in lines) > 80


@pytest.mark.parametrize("args,needle", [
    (["sweep", "--batch", "abc"], "Invalid value for '--batch'"),
    (["verify", "--n", "abc"], "Invalid value for '--n'"),
    (["sweep", "--mech", "dense", "--bogus"], "No such option: --bogus"),
])
def test_malformed_options_are_one_line_from_the_console_script(args, needle):
    """Typer's own parse errors (not a domain error) also end as one line and exit 2 from `effbench`."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "effbench", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], run.stderr
    assert "Traceback" not in run.stderr
