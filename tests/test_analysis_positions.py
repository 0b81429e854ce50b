"""Position encodings (mechanisms declaring ``comparable = "position"``) in `effbench plot`: their own figure and
table, never an attention figure, crossover, budget row or highlight; comparability read from the registry, not
from ``family``. Also the shared helpers in effbench.units. Synthetic files only; nothing is measured."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from effbench import analysis, plot, results
from effbench.cases import Case
from effbench.sweep import case_row
from effbench.units import NOISY_IQR, fmt_bytes, is_noisy

NS = [256, 1024, 4096, 16384]
D = 512  # heads · head_dim of the default case
GiB = 2**30


def _ok(mech: str, n: int, time_ms: float, mem: float, params: float = 0, **case):
    row = case_row(Case(mechanism=mech, n=n, **case))
    row.update(status="ok", run_id="synthetic", time_ms_median=time_ms, time_ms_iqr=0.0, repeats=5,
               peak_tensor_bytes=int(mem), param_bytes=int(params))
    return row


def _write(path: Path, rows) -> Path:
    writer = results.ResultsWriter(path)
    for r in rows:
        writer.append(r)
    return path


def _rows():
    """dense ∝ N², linear ∝ N, and two position encodings: the learned table (4·N·D parameter bytes) and the
    axial one (4·2·√N·D/2 = 4·√N·D bytes), both far cheaper than dense."""
    rows = []
    for n in NS:
        rows.append(_ok("dense", n, 1e-6 * n * n, 16 * n * n))
        rows.append(_ok("linear", n, 1e-3 * n, 1000 * n))
        rows.append(_ok("learned-pe", n, 1e-5 * n, 4 * n * D, params=4 * n * D))
        rows.append(_ok("axial-pe", n, 2e-5 * n, 8 * n * D, params=4 * math.sqrt(n) * D))
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = _write(tmp_path_factory.mktemp("pe") / "results.csv", _rows())
    return plot.make_report(path, formats=("png", "svg"), budget_bytes=80 * GiB)


def _labels(report, mechanism: str) -> set[str]:
    cfg = report.analysis.configs
    return set(cfg.loc[cfg["mechanism"].eq(mechanism), "label"])


def test_comparable_is_read_from_the_registry(report):
    cfg = report.analysis.configs.set_index("mechanism")
    assert cfg.at["axial-pe", "comparable"] == "position" and cfg.at["learned-pe", "comparable"] == "position"
    assert cfg.at["dense", "comparable"] == "attention" and cfg.at["linear", "comparable"] == "attention"
    assert analysis.comparable_of("no-such-mechanism") == "attention"


def test_position_encodings_are_absent_from_attention_results(report):
    pe = _labels(report, "axial-pe") | _labels(report, "learned-pe")
    assert pe and not report.crossovers["label"].isin(pe).any()
    assert not report.budget["label"].isin(pe).any()
    assert not any(line.startswith(("axial-pe", "learned-pe")) for line in report.highlights)
    assert any(line.startswith("linear") for line in report.highlights)
    assert not report.analysis.representatives["mechanism"].isin(["axial-pe", "learned-pe"]).any()
    for name in ("memory", "time"):
        assert not set(report.figures[name].lines) & pe, name
    assert list(report.summary["memory"].columns) == ["N", "N² (scores)", "dense", "linear"]
    md = report.markdown.split("## Position encodings")[0]
    assert "axial-pe" not in md and "learned-pe" not in md  # every attention section comes before it
    highlights = report.markdown.split("## Highlights")[1].split("## ")[0]
    assert "linear" in highlights and "-pe" not in highlights


def test_position_figure_has_parameters_and_memory_with_slopes(report):
    fig = report.figures["positions"]
    assert (report.out_dir / "positions_vs_n.png").exists() and (report.out_dir / "positions_vs_n.svg").exists()
    assert set(fig.lines) == {"params:axial-pe[shape1=0,shape2=0,split=0]", "params:learned-pe",
                              "memory:axial-pe[shape1=0,shape2=0,split=0]", "memory:learned-pe"}
    assert list(fig.lines["params:learned-pe"].get_ydata()) == [4 * n * D for n in NS]
    params_ax, memory_ax = fig.figure.axes[:2]
    assert params_ax.get_xscale() == "log" and params_ax.get_yscale() == "log" and memory_ax.get_yscale() == "log"
    legend = [t.get_text() for t in params_ax.get_legend().get_texts()]
    assert "learned-pe (params ∝ N^1.00±0.00)" in legend
    assert "axial-pe[shape1=0,shape2=0,split=0] (params ∝ N^0.50±0.00)" in legend
    assert "∝ √N (reference)" in legend
    mem_legend = [t.get_text() for t in memory_ax.get_legend().get_texts()]
    assert "learned-pe (mem ∝ N^1.00±0.00)" in mem_legend
    texts = [t.get_text() for t in params_ax.texts]
    assert any("axial-pe: 128.0× fewer" in t and "than learned-pe" in t and "N=16,384" in t for t in texts)


def test_position_numbers_and_table(report):
    pos = report.analysis.positions
    cfg = report.analysis.configs.set_index("config")
    assert cfg.at[pos.reference, "mechanism"] == "learned-pe"  # the fastest-growing parameter count
    ratios = pos.ratios.set_index("n")
    assert list(ratios.index) == NS
    assert ratios["params_ratio"].tolist() == pytest.approx([n / math.sqrt(n) for n in NS])  # N·D / √N·D
    assert ratios["memory_ratio"].tolist() == pytest.approx([0.5] * len(NS))
    fit = pos.fits[(pos.reference, "params")]
    assert fit.slope == pytest.approx(1, abs=1e-9)
    table = report.tables.positions
    assert list(table.columns) == ["N", "learned-pe params", "learned-pe peak memory", "axial-pe params",
                                   "axial-pe peak memory", "learned-pe ÷ axial-pe (params)",
                                   "learned-pe ÷ axial-pe (memory)"]
    row = table[table["N"].eq("4,096")].iloc[0]
    assert row["learned-pe params"] == "8.0 MiB" and row["axial-pe params"] == "128.0 KiB"
    assert row["learned-pe ÷ axial-pe (params)"] == "64.0×" and row["learned-pe ÷ axial-pe (memory)"] == "0.50×"
    md = report.markdown
    assert "## Position encodings" in md
    assert "| 4,096 | 8.0 MiB | 8.0 MiB | 128.0 KiB | 16.0 MiB | 64.0× | 0.50× |" in md
    assert "![positions_vs_n](positions_vs_n.png)" in md


def test_render_report_prints_the_position_table(report):
    from rich.console import Console

    console = Console(record=True, width=200)
    plot.render_report(report, console)
    text = console.export_text()
    assert "Position encodings: parameters and peak memory per call" in text and "64.0×" in text


def test_family_position_is_not_a_capability(tmp_path):
    """A mechanism the registry does not know (a plugin not loaded) is attention, whatever its family says."""
    rows = [_ok("dense", n, 1e-6 * n * n, 16 * n * n) for n in NS]
    for n in NS:
        row = _ok("linear", n, 1e-3 * n, 1000 * n)
        row.update(mechanism="my-plugin-pe", family="position", case_key=f"plugin{n}")
        rows.append(row)
    rep = plot.make_report(_write(tmp_path / "r.csv", rows), out_dir=tmp_path / "o")
    assert rep.crossovers["mechanism"].eq("my-plugin-pe").any()
    assert rep.analysis.positions is None and "positions" not in rep.figures
    assert "## Position encodings" not in rep.markdown
    assert any(line.startswith("my-plugin-pe") for line in rep.highlights)


def test_a_file_of_position_encodings_only_still_plots(tmp_path):
    rows = [r for r in _rows() if r["mechanism"].endswith("-pe")]
    rep = plot.make_report(_write(tmp_path / "r.csv", rows), out_dir=tmp_path / "o")
    assert "positions" in rep.figures and rep.crossovers.empty and rep.highlights == []
    assert "## Position encodings" in rep.markdown


def test_units_helpers():
    assert NOISY_IQR == 0.10
    assert is_noisy(10.0, 1.01) and not is_noisy(10.0, 1.0) and not is_noisy(None, 1.0)
    assert not is_noisy(float("nan"), 1.0) and not is_noisy(0.0, 1.0) and not is_noisy(10.0, None)
    assert fmt_bytes(4 * 2**20) == "4.0 MiB" and fmt_bytes(4 * 2**20, compact=True) == "4 MiB"
    assert fmt_bytes(1.5 * GiB, compact=True) == "1.5 GiB" and fmt_bytes(512, compact=True) == "512 B"
    assert fmt_bytes(1000 * 2**10) == "1,000.0 KiB" and fmt_bytes(None) == "—" and fmt_bytes(pd.NA) == "—"


def test_same_csv_gives_byte_identical_position_figures(tmp_path):
    path = _write(tmp_path / "r.csv", _rows())
    for d in ("a", "b"):
        plot.make_report(path, out_dir=tmp_path / d, formats=("svg", "png"))
    for name in ("positions_vs_n.svg", "positions_vs_n.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
