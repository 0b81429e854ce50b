"""`effbench plot` from small synthetic results files: exact slopes, crossover N*, budget N, OOM markers,
Markdown tables, CUDA fallback, the verify figure and refusals. Nothing is measured; no sweep runs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from effbench import figure_base, fits, plot, results
from effbench.cases import Case
from effbench.sweep import case_row
from effbench.units import UsageError

NS = [256, 512, 1024, 2048, 4096]
C_DENSE = 1e-6  # dense time = C·N² ms
D_LINEAR = 1e-3  # linear time = D·N ms  -> crossover N* = D/C = 1000
GiB = 2**30


def _row(mech: str, n: int, status: str = "ok", *, knobs=(), causal=False, **values):
    row = case_row(Case(mechanism=mech, n=n, knobs=tuple(knobs), causal=causal))
    row.update(status=status, run_id="synthetic", **values)
    return row


def _ok(mech: str, n: int, time_ms: float, mem: float, **kw):
    return _row(mech, n, time_ms_median=time_ms, time_ms_iqr=0.0, repeats=5, peak_tensor_bytes=int(mem), **kw)


def _write(path: Path, rows) -> Path:
    writer = results.ResultsWriter(path)
    for r in rows:
        writer.append(r)
    return path


def synthetic_rows():
    """dense ∝ N² (oom at 8k, predicted_oom at 16k), sdpa time ∝ N², linear ∝ N, local at two windows
    (one timing out at 4k), transformer-xl skipped (bidirectional)."""
    rows = []
    for n in NS:
        rows.append(_ok("dense", n, C_DENSE * n * n, 16 * n * n))
        rows.append(_ok("sdpa", n, 0.4 * C_DENSE * n * n, 64 * n))
        rows.append(_ok("linear", n, D_LINEAR * n, 1000 * n))
        rows.append(_ok("local", n, 2e-4 * n, 500 * n, knobs=[("window", 32)]))
        if n < 4096:
            rows.append(_ok("local", n, 4e-4 * n, 900 * n, knobs=[("window", 64)]))
        rows.append(_row("transformer-xl", n, "skipped", error="transformer-xl is causal only"))
    rows.append(_row("local", 4096, "timeout", knobs=[("window", 64)], error="timed out after 300 s"))
    rows.append(_row("dense", 8192, "oom", error="OutOfMemoryError"))
    rows.append(_row("dense", 16384, "predicted_oom", predicted_bytes=16 * 16384**2,
                     error="predicted 4.0 GiB > budget"))
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = _write(tmp_path_factory.mktemp("plot") / "results.csv", synthetic_rows())
    return plot.make_report(path, formats=("png", "svg"), budget_bytes=80 * GiB)


def _label(report, mech: str) -> str:
    cfg = report.analysis.configs
    return cfg.loc[cfg["mechanism"].eq(mech), "label"].iloc[0]


def _slope(report, label: str, metric: str) -> pd.Series:
    s = report.slopes
    return s[s["label"].eq(label) & s["metric"].eq(metric)].iloc[0]


# ------------------------------------------------------------------------------ slopes

def test_exact_slopes_are_fitted_back(report):
    for label, metric, expected, verdict in [("dense", "memory", 2, "≈N²"), ("dense", "time", 2, "≈N²"),
                                             ("sdpa", "memory", 1, "≈N"), ("linear[chunk=64]", "time", 1, "≈N"),
                                             ("linear[chunk=64]", "memory", 1, "≈N"),
                                             ("local[window=32]", "memory", 1, "≈N")]:
        row = _slope(report, label, metric)
        assert row["slope"] == pytest.approx(expected, abs=1e-9), (label, metric)
        assert row["slope_se"] == pytest.approx(0, abs=1e-9)
        assert row["points"] == len(NS) and row["verdict"] == verdict
    assert _slope(report, "dense", "memory")["quantity"] == "peak_tensor_bytes"
    skipped = _slope(report, "transformer-xl[memory=128,segment=128]", "time")
    assert skipped["points"] == 0 and "no fit" in skipped["verdict"]


def test_slopes_csv_holds_the_fits(report):
    s = pd.read_csv(report.out_dir / "slopes.csv")
    dense = s[(s["label"] == "dense") & (s["metric"] == "memory")].iloc[0]
    assert dense["slope"] == pytest.approx(2, abs=1e-9) and dense["n_min"] == 256 and dense["n_max"] == 4096


def test_fit_standard_error_matches_the_matrix_formula():
    n = np.array([256, 512, 1024, 2048, 4096], dtype=float)
    y = 3 * n**1.5 * np.array([1.1, 0.9, 1.05, 0.97, 1.02])
    fit = fits.fit_loglog(n, y)
    X = np.column_stack([np.ones_like(n), np.log(n)])
    beta, res, *_ = np.linalg.lstsq(X, np.log(y), rcond=None)
    cov = res[0] / (len(n) - 2) * np.linalg.inv(X.T @ X)
    assert fit.slope == pytest.approx(beta[1], rel=1e-12)
    assert fit.slope_se == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-9)
    two = fits.fit_loglog([256, 512], [1.0, 4.0])
    assert two.slope == pytest.approx(2) and math.isnan(two.slope_se)
    assert fits.fit_loglog([256], [1.0]) is None
    assert [fits.verdict(b) for b in (0.5, 1.0, 1.5, 2.0)] == ["sub-linear", "≈N", "in between", "≈N²"]


# ------------------------------------------------------------------------------ crossovers

def _cross(report, label: str, baseline: str, metric: str) -> pd.Series:
    c = report.crossovers
    return c[c["label"].eq(label) & c["baseline"].eq(baseline) & c["metric"].eq(metric)].iloc[0]


def test_crossover_time_linear_vs_dense_is_d_over_c(report):
    row = _cross(report, "linear[chunk=64]", "dense", "time")
    assert row["n_star"] == pytest.approx(D_LINEAR / C_DENSE, rel=1e-9)
    assert row["kind"] == "above" and "cheaper above N* ≈ 1,000" in row["verdict"]


def test_crossover_outside_range_and_parallel(report):
    mem = _cross(report, "linear[chunk=64]", "dense", "memory")  # 1000·N vs 16·N²: meet at N = 62.5 < 256/2
    assert mem["kind"] == "always" and math.isnan(mem["n_star"]) and mem["n_cross"] == pytest.approx(62.5)
    assert "always cheaper in range" in mem["verdict"] and "not within range" in mem["verdict"]
    sdpa = _cross(report, "sdpa", "dense", "time")  # both ∝ N², sdpa 0.4× dense
    assert sdpa["kind"] == "always" and math.isnan(sdpa["n_star"])
    never = _cross(report, "linear[chunk=64]", "sdpa", "memory")  # 1000·N vs 64·N: never
    assert never["kind"] == "never" and "never cheaper in range" in never["verdict"]
    assert not report.crossovers["mechanism"].eq("transformer-xl").any() or \
        report.crossovers.loc[report.crossovers["mechanism"].eq("transformer-xl"), "kind"].eq("n/a").all()


def test_crossover_just_outside_range_is_reported():
    mech = fits.Fit(slope=1, intercept=math.log(1.0), slope_se=0, points=3, n_min=100, n_max=1000)
    base = fits.Fit(slope=2, intercept=math.log(1 / 1500), slope_se=0, points=3, n_min=100, n_max=1000)
    result = fits.crossover(mech, base)  # N* = 1500, within 2× of the range's top
    assert result.n_star == pytest.approx(1500) and "just outside" in result.text
    far = fits.crossover(mech, fits.Fit(2, math.log(1 / 5000), 0, 3, 100, 1000))
    assert far.kind == "never" and math.isnan(far.n_star) and far.n_cross == pytest.approx(5000)


# ------------------------------------------------------------------------------ budget

def _budget(rep, label: str) -> pd.Series:
    return rep.budget[rep.budget["label"].eq(label)].iloc[0]


def test_budget_n_extrapolated_from_measured_and_predicted(report):
    linear = _budget(report, "linear[chunk=64]")
    assert linear["n_max"] == (80 * GiB) // 1000 and linear["extrapolated"]  # 85,899,345.92 -> rounded down
    assert _budget(report, "sdpa")["n_max"] == 80 * GiB // 64  # exactly 2**30·80/64: not one less by float noise
    dense = _budget(report, "dense")  # 16·N² bytes; the predicted_oom row at 16k is part of the trend
    assert dense["n_max"] == math.isqrt(80 * GiB // 16) and dense["extrapolated"]
    assert dense["predicted_points"] == 1 and dense["largest_measured_n"] == 4096
    assert "extrapolated" in dense["verdict"]


def test_budget_within_range_is_not_extrapolated(tmp_path):
    path = _write(tmp_path / "r.csv", [_ok("linear", n, D_LINEAR * n, 1000 * n) for n in NS])
    rep = plot.make_report(path, budget_bytes=1000 * 3000)
    row = _budget(rep, "linear[chunk=64]")
    assert row["n_max"] == 3000 and not row["extrapolated"] and row["largest_measured_n"] == 2048
    assert "Largest N under 2.9 MiB" in rep.markdown and "within measured N 256–4,096" in rep.markdown
    assert plot.make_report(path, budget_bytes="3000000").budget["n_max"].iloc[0] == 3000


# ------------------------------------------------------------------------------ figures

def test_failed_cases_are_marked_where_they_would_have_been(report):
    mem = report.figures["memory"]
    got = {(m.label, m.status, m.n, m.y) for m in mem.markers}
    assert ("dense", "oom", 8192, None) in got  # top edge
    assert ("dense", "predicted_oom", 16384, float(16 * 16384**2)) in got  # at its predicted bytes
    assert ("local[window=64]", "timeout", 4096, None) in got
    ax = mem.figure.axes[0]
    by_gid = {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}
    edge = by_gid["oom:dense:edge"]
    assert list(edge.get_xdata()) == [8192] and list(edge.get_ydata()) == [1]  # y in axes coordinates
    assert list(by_gid["predicted_oom:dense"].get_xdata()) == [16384]
    assert by_gid["predicted_oom:dense"].get_ydata()[0] == 16 * 16384**2
    time_markers = {(m.label, m.status, m.n, m.y) for m in report.figures["time"].markers}
    assert ("dense", "predicted_oom", 16384, None) in time_markers and ("dense", "oom", 8192, None) in time_markers
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("oom (") for t in legend) and any(t.startswith("predicted_oom (") for t in legend)


def test_lines_labels_references_and_axes(report):
    mem, tim = report.figures["memory"], report.figures["time"]
    assert set(mem.lines) == {"dense", "sdpa", "linear[chunk=64]", "local[window=32]", "local[window=64]"}
    assert list(mem.lines["dense"].get_xdata()) == NS
    legend = [t.get_text() for t in mem.figure.axes[0].get_legend().get_texts()]
    assert "dense (mem ∝ N^2.00±0.00)" in legend and "linear[chunk=64] (mem ∝ N^1.00±0.00)" in legend
    assert "∝ N (reference)" in legend and "∝ N² (reference)" in legend
    assert any(t.startswith("local[window=64] (time ∝ N^1.00") for t in
               (x.get_text() for x in tim.figure.axes[0].get_legend().get_texts()))
    ax = mem.figure.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "peak_tensor_bytes" in ax.get_ylabel() and "ms" in tim.figure.axes[0].get_ylabel()
    assert figure_base.tick_bytes(4 * 2**20) == "4 MiB" and figure_base.tick_n(32768) == "32k"
    assert figure_base.tick_ms(1000) == "1,000"


def test_files_written_in_the_default_directory(report):
    assert report.out_dir == report.csv_path.with_name("results_plots")
    names = {p.name for p in report.files}
    assert {"memory_vs_n.png", "memory_vs_n.svg", "time_vs_n.png", "time_vs_n.svg", "summary.md", "slopes.csv",
            "crossovers.csv", "budget.csv"} <= names
    assert all(p.exists() and p.stat().st_size > 0 for p in report.files)
    assert "cuda_memory_vs_n.png" not in names and any("no CUDA" in n for n in report.notes)


# ------------------------------------------------------------------------------ tables

def test_markdown_textbook_table_rows(report):
    md = (report.out_dir / "summary.md").read_text()
    assert md == report.markdown
    assert "| N | N² (scores) | dense | sdpa | linear | local | transformer-xl |" in md
    assert "| 1,024 | 1,048,576 | 16.0 MiB | 64.0 KiB | 1,000.0 KiB | 500.0 KiB | skipped |" in md
    assert "| 8,192 | 67,108,864 | oom |" in md
    assert "| 16,384 | 268,435,456 | predicted_oom (≈4.0 GiB) |" in md
    assert "| 4,096 | 16,777,216 | 16.8 | 6.71 | 4.10 | 0.82 | skipped |" in md  # time table, ms
    assert "`local[window=32]`" in md  # representative: the window with the most ok rows
    assert "| local[window=64] | B=1 H=8 D=64 float32 cpu fwd bidirectional | 4,096 | timeout |" in md  # full table
    assert "cheaper above N* ≈ 1,000" in md and "![memory_vs_n](memory_vs_n.png)" in md
    tb = report.summary["memory"]
    assert list(tb.columns) == ["N", "N² (scores)", "dense", "sdpa", "linear", "local", "transformer-xl"]
    assert list(tb["N"]) == ["256", "512", "1,024", "2,048", "4,096", "8,192", "16,384"]


def test_render_report_prints_tables(report):
    console = Console(record=True, width=140)
    plot.render_report(report, console)
    text = console.export_text()
    for needle in ("Peak memory per call", "Time per call", "Fitted log-log slopes", "N^2.00±0.00",
                   "cheaper above N* ≈ 1,000", "Largest N under 80.0 GiB", "local[window=32]",
                   "linear[chunk=64] is", "summary.md"):
        assert needle in text, needle
    narrow = Console(record=True, width=60)
    plot.render_report(report, narrow)
    assert "transposed to fit" in narrow.export_text()


# ------------------------------------------------------------------------------ other inputs

def test_cuda_rows_fall_back_to_the_allocator_and_get_their_own_figure(tmp_path):
    rows = []
    for n in NS:
        for mech, mem in (("dense", 16 * n * n), ("linear", 1000 * n)):
            row = _row(mech, n, time_ms_median=1e-3 * n, time_ms_iqr=0.0, peak_alloc_bytes=mem,
                       peak_reserved_bytes=2 * mem, nvml_peak_bytes=2 * mem + 2**20)
            row["device"] = "cuda"
            rows.append(row)
    rep = plot.make_report(_write(tmp_path / "gpu.csv", rows), out_dir=tmp_path / "out")
    assert _slope(rep, "dense", "memory")["quantity"] == "peak_alloc_bytes"
    assert _slope(rep, "dense", "memory")["slope"] == pytest.approx(2, abs=1e-9)
    assert "CUDA allocator peak" in rep.figures["memory"].figure.axes[0].get_ylabel()
    cuda = rep.figures["cuda"]
    assert len(cuda.figure.axes) == 3 and (tmp_path / "out" / "cuda_memory_vs_n.png").exists()


def test_labels_show_what_varies(tmp_path):
    rows = [_ok("local", n, 1e-3 * n, 100 * n, knobs=[("window", 32)], causal=c) for n in NS for c in (False, True)]
    rows += [_ok("dense", n, 1e-6 * n * n, 16 * n * n) for n in NS]
    rep = plot.make_report(_write(tmp_path / "r.csv", rows), out_dir=tmp_path / "o")
    labels = set(rep.analysis.configs["label"])
    assert labels == {"dense bidir", "local[window=32] bidir", "local[window=32] causal"}
    cross = rep.crossovers
    causal = cross[cross["label"].eq("local[window=32] causal") & cross["baseline"].eq("dense")]
    assert causal["kind"].eq("n/a").all()  # no causal dense rows to compare with


def test_highlights_compare_causal_only_mechanisms_with_causal_dense(tmp_path):
    rows = [_ok("dense", n, 1e-6 * n * n, 16 * n * n) for n in NS]
    rows += [_ok("dense", n, 2e-6 * n * n, 32 * n * n, causal=True) for n in NS]
    rows += [_ok("linear", n, 1e-3 * n, 1000 * n) for n in NS]
    rows += [_ok("transformer-xl", n, 1e-3 * n, 2000 * n, causal=True) for n in NS]
    lines = plot.make_report(_write(tmp_path / "r.csv", rows), out_dir=tmp_path / "o").highlights
    xl = [line for line in lines if line.startswith("transformer-xl")]
    # at N=4096 causal dense: 2e-6·N² ms and 32·N² B against 1e-3·N ms and 2000·N B
    assert xl == ["transformer-xl[memory=128,segment=128] causal is 8.2× faster and uses 65.5× less memory "
                  "than dense (causal) at N=4,096"]
    assert any(line.startswith("linear[chunk=64] bidir is 4.1× faster") and line.endswith("than dense at N=4,096")
               for line in lines)


VERIFY_COLUMNS = ["mechanism", "check", "knob", "knob_value", "n", "causal", "error_rel", "cosine", "max_abs_err",
                  "tolerance", "passed", "detail"]


def _verify_csv(path: Path, with_sweeps: bool = True) -> Path:
    rows = [{"mechanism": "dense", "check": "impl-output", "n": 777, "causal": False, "max_abs_err": 1e-7,
             "tolerance": 1e-5, "passed": True}]
    if with_sweeps:
        rows += [{"mechanism": "performer", "check": "fidelity", "knob": "features", "knob_value": m, "n": 777,
                  "causal": c, "error_rel": 0.8 / math.sqrt(m), "cosine": 0.99} for m in (16, 64, 256, 1024)
                 for c in (False, True)]
        rows += [{"mechanism": "reformer", "check": "fidelity", "knob": "rounds", "knob_value": r, "n": 777,
                  "causal": False, "error_rel": 0.3 / r} for r in (1, 2, 4, 8)]
        rows += [{"mechanism": "reformer", "check": "trend", "knob": "rounds", "n": 777, "passed": True}]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=VERIFY_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def test_error_vs_knob_figure_from_verify_output(tmp_path):
    path = _write(tmp_path / "r.csv", [_ok("dense", n, 1e-6 * n * n, 16 * n * n) for n in NS])
    rep = plot.make_report(path, out_dir=tmp_path / "o", verify_csv=_verify_csv(tmp_path / "v.csv"))
    err = rep.figures["error"]
    assert (tmp_path / "o" / "error_vs_knob.png").exists()
    assert set(err.lines) == {"performer:features:bidirectional", "performer:features:causal",
                              "reformer:rounds:bidirectional"}
    assert list(err.lines["performer:features:causal"].get_xdata()) == [16, 64, 256, 1024]
    ax = err.figure.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert any(line.get_gid() == "reference:1/sqrt(m)" for line in ax.get_lines())
    rep2 = plot.make_report(path, out_dir=tmp_path / "o2", verify_csv=_verify_csv(tmp_path / "v2.csv", False))
    assert "error" not in rep2.figures and any("error_vs_knob not drawn" in n for n in rep2.notes)
    with pytest.raises(results.ResultsError, match="verify file not found"):
        plot.make_report(path, out_dir=tmp_path / "o3", verify_csv=tmp_path / "missing.csv")
    with pytest.raises(results.ResultsError, match="not an effbench verify CSV"):
        plot.make_report(path, out_dir=tmp_path / "o3", verify_csv=path)


def test_refuses_foreign_files_and_files_without_ok_rows(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(results.ResultsError, match="not an effbench results CSV"):
        plot.make_report(other)
    empty = _write(tmp_path / "bad.csv", [_row("dense", 256, "oom"), _row("dense", 512, "skipped")])
    with pytest.raises(results.ResultsError, match="no ok rows"):
        plot.make_report(empty)
    with pytest.raises(UsageError, match="--format"):
        plot.make_report(_write(tmp_path / "ok.csv", [_ok("dense", 256, 1, 1)]), formats="png,bogus")
    assert not (tmp_path / "bad_plots").exists() and not (tmp_path / "ok_plots").exists()


def test_same_csv_gives_byte_identical_figures(tmp_path):
    path = _write(tmp_path / "r.csv", synthetic_rows())
    for d in ("a", "b"):
        plot.make_report(path, out_dir=tmp_path / d, formats=("svg", "png"))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "memory_vs_n.svg" in names and "memory_vs_n.png" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert b"<dc:date>" not in (tmp_path / "a" / "memory_vs_n.svg").read_bytes()
