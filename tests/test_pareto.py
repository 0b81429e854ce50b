"""The accuracy-vs-cost frontier (`effbench plot --verify`): the front on synthetic points, the matching of verify
rows with results configurations, the choice of N, the figure, pareto.md and the refusals. Nothing is measured."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from effbench import pareto, plot, results
from effbench.cases import Case
from effbench.cli import app
from effbench.sweep import case_row
from effbench.units import UsageError

MiB = 2**20


def test_pareto_mask_on_and_off_the_front():
    #           A    B    C    D    E    F    G    H
    cost = [1.0, 2.0, 3.0, 4.0, 2.0, 0.5, 5.0, math.nan]
    error = [0.5, 0.2, 0.3, 0.0, 0.2, 0.9, 0.0, 0.1]
    on = pareto.pareto_mask(cost, error)
    # C is beaten by B (cheaper and better), G by D (cheaper, equally exact), H has no cost; B and E are equal: both on
    assert on.tolist() == [True, True, False, True, True, True, False, False]
    assert pareto.pareto_mask([], []).tolist() == []
    assert pareto.pareto_mask([1.0], [0.3]).tolist() == [True]
    with pytest.raises(ValueError):
        pareto.pareto_mask([1.0, 2.0], [0.1])


def test_pareto_mask_matches_brute_force_on_random_points():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 40).astype(float)  # many ties
    on = pareto.pareto_mask(x, y)
    for i in range(len(x)):
        beaten = any(x[j] <= x[i] and y[j] <= y[i] and (x[j] < x[i] or y[j] < y[i]) for j in range(len(x)))
        assert on[i] == (not beaten)


# ------------------------------------------------------------------------------ from files

# time (ms) and peak memory (MiB) at N = 4096; at 1024 a quarter of each
COSTS = {("dense", ()): (1600, 1024), ("sdpa", ()): (800, 4), ("linear", ()): (5, 3),
         ("local", (("window", 32),)): (10, 2), ("local", (("window", 128),)): (30, 6),
         ("performer", (("features", 64),)): (20, 1.5), ("performer", (("features", 256),)): (40, 8)}
# error on MiniLM inputs (Gaussian: a tenth), keyed like COSTS; local window=511 and reformer have no results rows
ERRORS = {("linear", ""): 0.5, ("local", "window=32"): 0.2, ("local", "window=128"): 0.1,
          ("local", "window=511"): 1e-7, ("performer", "features=64"): 0.3, ("performer", "features=256"): 0.29,
          ("reformer", "rounds=1"): 0.18, ("dense", ""): 1e-7}
FRONT_TIME = {"linear", "local window=32", "local window=128", "sdpa"}
FRONT_MEMORY = {"performer features=64", "local window=32", "sdpa"}


def _results_csv(path: Path) -> Path:
    writer = results.ResultsWriter(path)
    for (mech, knobs), (ms, mib) in COSTS.items():
        for n, scale in ((1024, 0.25), (4096, 1.0)):
            row = case_row(Case(mechanism=mech, n=n, knobs=knobs))
            row.update(status="ok", run_id="synthetic", time_ms_median=ms * scale, time_ms_iqr=0.0, repeats=3,
                       peak_tensor_bytes=int(mib * MiB * scale))
            writer.append(row)
    return path


VERIFY_COLUMNS = ["mechanism", "check", "knob", "knob_value", "n", "causal", "error_rel", "passed", "knobs",
                  "inputs", "error_min", "error_max", "error_std", "samples", "gaussian_error_rel"]


def _verify_csv(path: Path, inputs: str = "minilm") -> Path:
    rows = []
    for (mech, knobs), err in ERRORS.items():
        knob, _, value = knobs.partition("=")
        extra = {"impl": "eager"} if mech == "local" else {"chunk": 64, "redraw": False} if mech == "performer" else {}
        text = ", ".join([knobs] * bool(knobs) + [f"{k}={v}" for k, v in extra.items()])
        e = err if inputs == "minilm" else err / 10
        rows.append({"mechanism": mech, "check": "fidelity", "knob": knob, "knob_value": value, "n": 512,
                     "causal": False, "error_rel": e, "passed": True, "knobs": text, "inputs": inputs,
                     "error_min": e / 2, "error_max": e * 2, "error_std": e / 4, "samples": 72})
    rows.append({"mechanism": "local", "check": "trend", "knob": "window", "n": 512, "causal": False,
                 "inputs": "gaussian", "passed": True})
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=VERIFY_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pareto")
    return _results_csv(d / "r.csv"), _verify_csv(d / "v_minilm.csv"), _verify_csv(d / "v_gauss.csv", "gaussian")


@pytest.fixture(scope="module")
def report(files, tmp_path_factory):
    r, v_minilm, v_gauss = files
    return plot.make_report(r, out_dir=tmp_path_factory.mktemp("out"), verify_csv=[v_gauss, v_minilm])


def test_front_from_files(report):
    fr = report.pareto
    assert fr.n == 4096 and fr.inputs == "minilm" and fr.verify_n == [512]  # equal counts at both N: the largest
    pts = fr.points.set_index("label")
    assert set(pts.index) == {"linear", "local window=32", "local window=128", "performer features=64",
                              "performer features=256"}  # window=511, reformer, dense: no point
    assert pts.at["local window=32", "error"] == pytest.approx(0.2)  # the MiniLM error, not the Gaussian one
    assert pts.at["local window=32", "time_ms"] == pytest.approx(10) and pts.at["linear", "memory_bytes"] == 3 * MiB
    assert set(fr.baselines["label"]) == {"dense", "sdpa"}
    front = fr.front
    assert set(front.loc[front["front_time"], "label"]) == FRONT_TIME
    assert set(front.loc[front["front_memory"], "label"]) == FRONT_MEMORY
    assert any("reformer" in n for n in fr.notes)  # its verify rows match no configuration: said


def test_figure_table_and_summary(report):
    out = report.out_dir
    assert (out / "pareto.png").is_file() and (out / "pareto.md").is_file()
    fig = report.figures["pareto"]
    assert [ax.get_xscale() for ax in fig.figure.axes[:2]] == ["log", "log"]
    assert {"time:front", "memory:front", "time:sdpa", "memory:local window=32"} <= set(fig.lines)
    # the time front's step line runs through its points, cheapest first, down to exact sdpa
    xs = list(fig.lines["time:front"].get_xdata())
    assert xs == sorted(xs) and xs[0] == pytest.approx(5) and xs[-1] == pytest.approx(800)
    md = (out / "pareto.md").read_text()
    assert "### The Pareto front" in md and "| sdpa | 0 (exact)" in md and "performer features=256" in md
    assert "## Accuracy vs cost at N = 4,096" in (out / "summary.md").read_text()
    console = Console(width=200, record=True)
    plot.render_report(report, console)
    assert "Pareto front at N=4,096" in console.export_text()


def test_error_vs_knob_keeps_to_gaussian_rows(report):
    lines = report.figures["error"].lines
    assert set(lines) == {"local:window:bidirectional", "performer:features:bidirectional", "reformer:rounds:bidirectional"}
    assert max(lines["performer:features:bidirectional"].get_ydata()) == pytest.approx(0.03)  # Gaussian errors


def test_chosen_n_and_gaussian_fallback(files, tmp_path):
    r, _, v_gauss = files
    rep = plot.make_report(r, out_dir=tmp_path / "o", verify_csv=v_gauss, pareto_n=1024)
    fr = rep.pareto
    assert fr.n == 1024 and fr.inputs == "gaussian"
    assert fr.points.set_index("label").at["linear", "error"] == pytest.approx(0.05)
    assert "N = 1,024 (--n)" in fr.n_choice


def test_refusals(files, tmp_path):
    r, v_minilm, _ = files
    with pytest.raises(UsageError, match="the results file has N = 1,024, 4,096"):
        plot.make_report(r, out_dir=tmp_path / "o", verify_csv=v_minilm, pareto_n=999)
    assert not (tmp_path / "o").exists()  # refused before anything is written
    with pytest.raises(UsageError, match="give --verify too"):
        plot.make_report(r, out_dir=tmp_path / "o", pareto_n=4096)
    res = CliRunner().invoke(app, ["plot", str(r), "--verify", str(v_minilm), "--n", "999", "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_no_matching_point_is_a_note(files, tmp_path):
    r, _, _ = files
    v = tmp_path / "v.csv"
    v.write_text("mechanism,check,knob,knob_value,n,causal,error_rel,knobs\n"
                 "local,fidelity,window,7,512,False,0.4,window=7\n")
    rep = plot.make_report(r, out_dir=tmp_path / "o", verify_csv=v)
    assert rep.pareto is None and "pareto" not in rep.figures
    assert any("pareto not drawn" in n for n in rep.notes)
