"""`effbench plot` on decode rows: the decode figures, the affine state fit and its largest N under a budget,
the state at 4K…1M, the per-token comparison, and prefill outputs that never see a decode row.

Synthetic rows (``case_row`` of decode cases) with exact formulas: dense's cache is 2·B·kv·(N + steps + 4)·D·4
bytes, local's and linear's states are constant. One test runs a tiny real decode sweep."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from rich.console import Console

from effbench import decode_analysis, fits, plot, results
from effbench.cases import Case, expand
from effbench.runner import RunOptions
from effbench.sweep import case_row, run_sweep

NS = [1024, 2048, 4096, 8192]
STEPS = 8
B, H, D, ITEM = 1, 8, 64, 4
LOCAL_STATE = 1_054_728  # local (window 256): a ring buffer, the same at every N
LINEAR_STATE = 133_120
COPY_GBPS = 10.0
GiB = 2**30
PREFILL_NS = [256, 512, 1024, 2048, 4096]


def dense_state(n: int, kv: int = H) -> int:
    """2 (K and V) · B · kv_heads · (N + steps + 4) · D · itemsize."""
    return 2 * B * kv * (n + STEPS + 4) * D * ITEM


def _decode_row(mech: str, n: int, state: int, ms: float, *, knobs=(), status="ok", **values):
    row = case_row(Case(mechanism=mech, n=n, knobs=tuple(knobs), causal=True, phase="decode", decode_steps=STEPS))
    if status != "ok":
        row.update(status=status, run_id="synthetic", **values)
        return row
    row.update(status="ok", run_id="synthetic", state_bytes=state, state_bytes_analytic=state,
               predicted_state_bytes=state, time_ms_per_token=ms, time_ms_iqr=0.1 * ms, repeats=STEPS,
               peak_tensor_bytes=4096, read_bytes=state, read_gbps=round(state / (ms * 1e-3) / 1e9, 4), **values)
    return row


def decode_rows(gqa: bool = False):
    """dense (state ∝ N, time 1e-4·N ms), local and linear (constant states, 0.05 and 0.08 ms), linformer skipped;
    with ``gqa`` a second dense at kv_heads=2."""
    rows = []
    for n in NS:
        rows.append(_decode_row("dense", n, dense_state(n), 1e-4 * n))
        rows.append(_decode_row("local", n, LOCAL_STATE, 0.05))
        rows.append(_decode_row("linear", n, LINEAR_STATE, 0.08))
        rows.append(_decode_row("linformer", n, 0, 0, status="skipped", error="linformer has no decode form"))
        if gqa:
            rows.append(_decode_row("dense", n, dense_state(n, kv=2), 0.5e-4 * n, knobs=[("kv_heads", 2)]))
    return rows


def prefill_rows():
    rows = []
    for n in PREFILL_NS:
        for mech, t, mem in (("dense", 1e-6 * n * n, 16 * n * n), ("linear", 1e-3 * n, 1000 * n)):
            row = case_row(Case(mechanism=mech, n=n))
            row.update(status="ok", run_id="synthetic", time_ms_median=t, time_ms_iqr=0.0, repeats=5,
                       peak_tensor_bytes=int(mem))
            rows.append(row)
    return rows


def _write(path: Path, rows, copy: float | None = COPY_GBPS) -> Path:
    writer = results.ResultsWriter(path)
    for r in rows:
        writer.append(r)
    if copy is not None:
        results.append_run(path, {"run_id": "synthetic", "copy_gbps": copy, "copy_device": "cpu",
                                  "copy_method": "synthetic"})
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = _write(tmp_path_factory.mktemp("decode") / "dec.csv", decode_rows())
    return plot.make_report(path, formats=("png",), budget_bytes=GiB)


def _config(rep, mech: str) -> str:
    cfg = rep.decode.configs
    return cfg.loc[cfg["mechanism"].eq(mech), "config"].iloc[0]


def _label(rep, mech: str) -> str:
    cfg = rep.decode.configs
    return cfg.loc[cfg["mechanism"].eq(mech), "label"].iloc[0]


# ------------------------------------------------------------------------------ figures

def test_decode_figures_are_written(report):
    names = {p.name for p in report.files}
    assert {"decode_state_vs_n.png", "decode_time_vs_n.png", "decode_fits.csv", "decode_budget.csv",
            "summary.md"} <= names
    assert "memory_vs_n.png" not in names and report.analysis is None  # a decode-only file: no prefill outputs
    state = report.figures["decode_state"]
    dense, local = _label(report, "dense"), _label(report, "local")
    assert list(state.lines[dense].get_xdata()) == NS
    assert list(state.lines[dense].get_ydata()) == [dense_state(n) for n in NS]
    assert {ax.get_title() for ax in state.figure.axes} == {"state grows with N", "constant state"}
    legends = [t.get_text() for ax in state.figure.axes for t in ax.get_legend().get_texts()]
    assert any(t.startswith(dense) and "∝ N^1.00" in t and "48.0 KiB + 4.0 KiB·N" in t for t in legends)
    assert any(t.startswith(local) and "∝ N^0.00" in t for t in legends)
    for ax in state.figure.axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    extrapolated = [ln for ax in state.figure.axes for ln in ax.get_lines() if ln.get_gid() == f"extrapolated:{dense}"]
    assert extrapolated and extrapolated[0].get_xdata()[-1] == pytest.approx(2**20)


def test_time_figure_has_iqr_bars_slopes_and_the_copy_bandwidth(report):
    tim = report.figures["decode_time"]
    dense = _label(report, "dense")
    line = tim.lines[f"time:{dense}"]
    assert list(line.get_ydata()) == pytest.approx([1e-4 * n for n in NS])
    ax_t = line.axes
    assert ax_t.get_xscale() == "log" and ax_t.get_yscale() == "log"
    assert any(isinstance(c, ErrorbarContainer) for c in ax_t.containers)
    copy = tim.lines["copy:cpu"]
    assert list(copy.get_ydata()) == [COPY_GBPS, COPY_GBPS]
    assert copy.get_label().startswith("copy bandwidth (measured)")
    assert list(tim.lines[f"read:{dense}"].get_ydata()) == pytest.approx(
        [dense_state(n) / (1e-4 * n * 1e-3) / 1e9 for n in NS], rel=1e-4)
    legend = [t.get_text() for ax in tim.figure.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert f"{dense} (time ∝ N^1.00±0.00)" in legend
    assert not any(t.get_gid() == "no-copy-bandwidth" for ax in tim.figure.axes for t in ax.texts)


def test_without_copy_bandwidth_the_figure_says_so(tmp_path):
    rep = plot.make_report(_write(tmp_path / "d.csv", decode_rows(), copy=None), out_dir=tmp_path / "o")
    texts = [t for ax in rep.figures["decode_time"].figure.axes for t in ax.texts if t.get_gid() == "no-copy-bandwidth"]
    assert texts and "no copy bandwidth" in texts[0].get_text()
    assert not any(k.startswith("copy:") for k in rep.figures["decode_time"].lines)
    assert any("no sidecar" in n for n in rep.notes) and "No copy bandwidth" in rep.markdown


# ------------------------------------------------------------------------------ the affine fit and the budget

def test_affine_fit_is_exact_and_a_constant_is_constant():
    fit = fits.fit_affine(NS, [dense_state(n) for n in NS])
    assert fit.per_n == pytest.approx(2 * B * H * D * ITEM, rel=1e-12)
    assert fit.intercept == pytest.approx(2 * B * H * (STEPS + 4) * D * ITEM, rel=1e-9)
    assert not fit.constant and (fit.n_min, fit.n_max, fit.points) == (1024, 8192, 4)
    flat = fits.fit_affine(NS, [LOCAL_STATE] * 4)
    assert flat.constant and flat.per_n == 0 and flat.intercept == LOCAL_STATE
    assert fits.fit_affine([1024, 1024], [1, 2]) is None
    assert fits.affine_budget_n(flat, 10**6) == (0, "the state alone exceeds the budget at every N")


def test_budget_gives_the_exact_n_max_and_unbounded(report):
    b = report.decode.budget.set_index("mechanism")
    per_n, fixed = 2 * B * H * D * ITEM, 2 * B * H * (STEPS + 4) * D * ITEM
    assert b.at["dense", "n_max"] == (GiB - fixed) // per_n == 262_132 and b.at["dense", "extrapolated"]
    assert b.at["local", "unbounded"] and pd.isna(b.at["local", "n_max"])
    assert b.at["linear", "unbounded"]
    table = report.decode_tables.budget.set_index("configuration")
    assert table.at[_label(report, "dense"), "largest N"] == "262,132"
    assert table.at[_label(report, "local"), "largest N"] == "unbounded"
    md = report.markdown
    assert "### Largest context that fits in 1.0 GiB" in md
    assert "B=1 H=8 kv_heads=8 D=64 float32 cpu" in md  # the setting the table holds for
    # one byte short of a whole N rounds down; a budget between whole N as well
    da = decode_analysis.analyse_decode(results.read_results(report.csv_path), GiB - 1)
    assert da.budget.set_index("mechanism").at["dense", "n_max"] == 262_131


def test_kv_heads_is_in_the_label_and_scales_the_cache(tmp_path):
    rep = plot.make_report(_write(tmp_path / "d.csv", decode_rows(gqa=True)), out_dir=tmp_path / "o",
                           budget_bytes=GiB)
    cfg = rep.decode.configs
    dense = cfg[cfg["mechanism"].eq("dense")].set_index("kv_heads")
    assert set(dense["label"]) == {"dense[kv_heads=2]", "dense[kv_heads=8]"}
    b = rep.decode.budget.set_index("label")
    assert b.at["dense[kv_heads=2]", "n_max"] == (GiB - 2 * 2 * 12 * D * ITEM) // (2 * 2 * D * ITEM)
    # kv_heads varies: the tables say per row which B, H, kv_heads, D and dtype they hold for
    assert "| configuration | B H kv_heads D dtype | state = a + b·N |" in rep.markdown
    assert "| dense[kv_heads=2] | B=1 H=8 kv_heads=2 D=64 float32 | 12.0 KiB + 1.0 KiB·N |" in rep.markdown


# ------------------------------------------------------------------------------ the state at 4K … 1M

def test_state_table_is_the_affine_formula_with_the_extrapolation_mark(report):
    at = report.decode.state_at
    dense = at[at["config"].eq(_config(report, "dense"))].set_index("n")
    for n in decode_analysis.STATE_AT_N:
        assert dense.at[n, "state_bytes"] == pytest.approx(dense_state(n), rel=1e-12)
        assert dense.at[n, "extrapolated"] == (n > max(NS))
    local = at[at["config"].eq(_config(report, "local"))]
    assert (local["state_bytes"] == LOCAL_STATE).all()
    table = report.decode_tables.state_at.set_index("configuration")
    assert list(table.columns[-4:]) == ["N=4,096", "N=32,768", "N=131,072", "N=1,048,576"]
    row = table.loc[_label(report, "dense")]
    assert row["N=4,096"] == "16.0 MiB" and row["N=32,768"] == "128.0 MiB †" and row["N=1,048,576"] == "4.0 GiB †"
    assert row["state = a + b·N"] == "48.0 KiB + 4.0 KiB·N"
    md = report.markdown
    assert f"| {_label(report, 'dense')} | 48.0 KiB + 4.0 KiB·N | N^1.00±0.00 | 16.0 MiB | 128.0 MiB † |" in md
    assert "† extrapolated: outside the measured N 1,024–8,192" in md
    fitted = pd.read_csv(report.out_dir / "decode_fits.csv").set_index("mechanism")
    assert fitted.at["dense", "state_bytes_at_1048576"] == pytest.approx(dense_state(2**20))
    assert fitted.at["dense", "state_slope"] == pytest.approx(1, abs=0.01)
    assert fitted.at["local", "state_slope"] == pytest.approx(0, abs=1e-12)


def test_render_report_prints_the_decode_tables_and_the_comparison(report):
    console = Console(record=True, width=200)
    plot.render_report(report, console)
    text = console.export_text()
    for needle in ("Decode: cache / state bytes by context N", "4.0 GiB †", "Decode: largest context that fits",
                   "unbounded", "Copy bandwidth (measured, from the sidecar): 10.00 GB/s", "decode_state_vs_n.png"):
        assert needle in text, needle


def test_comparison_line_uses_the_best_constant_state_at_the_largest_common_n(report):
    local = _label(report, "local")
    line = f"at N=8,192 {local} decodes a token in 0.05 ms, dense in 0.82 ms (16.4× faster)"
    assert report.highlights[0].startswith(line)
    assert f"- {line}" in report.markdown


# ------------------------------------------------------------------------------ phases kept apart

def test_prefill_outputs_ignore_decode_rows(tmp_path):
    only = plot.make_report(_write(tmp_path / "p.csv", prefill_rows(), copy=None), out_dir=tmp_path / "p")
    mixed = plot.make_report(_write(tmp_path / "m.csv", prefill_rows() + decode_rows()), out_dir=tmp_path / "m")
    assert set(mixed.analysis.rows["phase"]) == {"prefill"}
    assert set(mixed.decode.rows["phase"]) == {"decode"}
    assert mixed.analysis.points["n"].max() == max(PREFILL_NS)  # no decode N (8192) among the prefill points
    assert set(mixed.figures["memory"].lines) == set(only.figures["memory"].lines) == {"dense", "linear[chunk=64]"}
    for key in ("memory", "time"):
        pd.testing.assert_frame_equal(mixed.summary[key], only.summary[key])
    pd.testing.assert_frame_equal(mixed.slopes, only.slopes)
    pd.testing.assert_frame_equal(mixed.tables.full, only.tables.full)
    assert mixed.highlights[: len(only.highlights)] == only.highlights
    assert "decode_state_vs_n.png" in {p.name for p in mixed.files}
    assert "The file also has 16 decode row(s)" in mixed.markdown and "## Decode: all configurations" in mixed.markdown


def test_no_decode_rows_no_decode_outputs(tmp_path):
    rep = plot.make_report(_write(tmp_path / "p.csv", prefill_rows()), out_dir=tmp_path / "o", budget_bytes=GiB)
    names = {p.name for p in rep.files}
    assert rep.decode is None and rep.decode_tables is None
    assert not any(name.startswith("decode_") for name in names)
    assert not any(k.startswith("decode") for k in rep.figures)
    assert "Decode" not in rep.markdown and not any(p.name.startswith("decode") for p in (tmp_path / "o").iterdir())


def test_decode_rows_that_all_failed_give_a_note_and_no_decode_outputs(tmp_path):
    rows = prefill_rows() + [_decode_row("linformer", n, 0, 0, status="skipped", error="no decode form") for n in NS]
    rep = plot.make_report(_write(tmp_path / "m.csv", rows), out_dir=tmp_path / "o")
    assert rep.decode is None and any("4 decode row(s), none ok" in n for n in rep.notes)
    with pytest.raises(results.ResultsError, match="no ok rows"):
        plot.make_report(_write(tmp_path / "bad.csv", rows[-4:]))


# ------------------------------------------------------------------------------ a real sweep

def test_a_tiny_real_decode_sweep_plots(tmp_path):
    from effbench.measure.bandwidth import copy_bandwidth

    cases = expand(["dense", "local"], [64, 128, 256], phase="decode", decode_steps=2, heads=2, head_dim=16,
                   axes={"window": [32]})
    out = tmp_path / "real.csv"
    run_sweep(cases, RunOptions(repeats=2, measure_flops=False, predict=False), out,
              run_info=copy_bandwidth("cpu", nbytes=8 * 2**20, repeats=3))
    rep = plot.make_report(out, out_dir=tmp_path / "o", budget_bytes=2**20)
    assert (tmp_path / "o" / "decode_state_vs_n.png").exists() and (tmp_path / "o" / "decode_time_vs_n.png").exists()
    b = rep.decode.budget.set_index("mechanism")
    per_n, fixed = 2 * 1 * 2 * 16 * 4, 2 * 1 * 2 * (2 + 4) * 16 * 4  # dense: 2·B·kv·(N + steps + 4)·D·4
    assert b.at["dense", "n_max"] == (2**20 - fixed) // per_n and b.at["local", "unbounded"]
    assert rep.decode.affine[_config(rep, "local")].constant
    assert "copy:cpu" in rep.figures["decode_time"].lines
    assert math.isfinite(rep.decode.fits[(_config(rep, "dense"), "state")].slope)
